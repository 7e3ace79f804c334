"""Every benchmark still runs (tiny sizes) and measures what it names: each variant it compares
is there, its figures are numbers in a plausible range and agree with each other (an "added"
column is the difference it claims, a speed-up the ratio of its two times, a count the requests
sent). Nothing here asserts how fast anything is; the figures live in docs/performance.md."""
import math
import os
import re
import subprocess
import sys

import pytest

from support import CHECKOUT, needs, require_binary

pytestmark = pytest.mark.integration


def run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(CHECKOUT, "benchmarks", script), *args],
                            capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rows(out: str, *first_headers: str):
    """The rows of the Markdown table whose first columns are ``first_headers``: [{header: cell}]."""
    lines = out.splitlines()
    pattern = "".join(rf"\|\s*{re.escape(h)}\s*" for h in first_headers) + r"\|"
    start = next(i for i, l in enumerate(lines) if re.match(pattern, l))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    found = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        found.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return found


def table(out: str, first_header: str):
    """The Markdown table whose first column is ``first_header``: {first cell: {header: cell}}."""
    return {row[first_header]: row for row in rows(out, first_header)}


def number(cell: str) -> float:
    value = float(cell.replace(",", "").replace("+", "").rstrip("x"))
    assert math.isfinite(value), cell
    return value


def within_rounding(shown: float, numerator: float, denominator: float, step: float) -> bool:
    """``shown`` is numerator / denominator of two figures each rounded to ``step``."""
    low = (numerator - step / 2) / (denominator + step / 2)
    high = (numerator + step / 2) / max(denominator - step / 2, 1e-12)
    return low * 0.95 <= shown <= high * 1.05


def check_added_over(rows, base: str, per: str, added: str, names):
    """Each variant's "added" figure is its time less the base's, and times are plausible."""
    assert set(rows) == {base, *names}
    assert rows[base][added] == "—"
    base_time = number(rows[base][per])
    for name in (base, *names):
        assert 1 <= number(rows[name][per]) <= 100_000, (name, rows[name])
    for name in names:
        assert abs(number(rows[name][added]) - (number(rows[name][per]) - base_time)) <= 0.15, rows[name]


def test_middleware_benchmark_compares_the_four_variants():
    rows = table(run("bench_middleware.py", "--requests", "50", "--rounds", "1"), "variant")
    check_added_over(rows, "bare Flask", "µs per request", "added over bare Flask (µs)",
                     ("prometheus-flask-exporter", "api-token-exporter (full)", "api-token-exporter (observe-only)"))


def test_asgi_benchmark_compares_the_four_variants():
    rows = table(run("bench_asgi.py", "--requests", "50", "--rounds", "1"), "variant")
    check_added_over(rows, "bare FastAPI", "µs per request", "added over bare FastAPI (µs)",
                     ("prometheus-fastapi-instrumentator", "api-token-exporter (full)",
                      "api-token-exporter (observe-only)"))


def test_scrape_benchmark_checks_identical_output_first():
    # 1,000 tokens: a render of 50 took under the half millisecond the table rounds to 0.000 s
    row = table(run("bench_scrape.py", "--tokens", "1000", "--repeat", "1"), "tokens")["1,000"]
    assert number(row["lines"]) == 17 * 1000 + 33        # 17 series per token plus 33 fixed ones
    client, ours = number(row["generate_latest (s)"]), number(row["store render (s)"])
    assert 0 < ours and 0 < client < 60
    assert within_rounding(number(row["speed-up"]), client, ours, 0.001)       # of times rounded to ms
    assert 0 < number(row["store bytes/series"]) < number(row["client bytes/series"])


@needs("redis")
def test_rate_limit_benchmark_counts_one_round_trip():
    rows = table(run("bench_ratelimit.py", "--requests", "100", "--rounds", "1"), "variant")
    assert number(rows["api-token-exporter redis://"]["round trips per request"]) == 1
    assert number(rows["limits RedisStorage"]["round trips per request"]) > 1     # the reference, per window
    for name, row in rows.items():
        assert 0.1 <= number(row["µs per request"]) <= 100_000, name


@needs("redis", "server")
def test_load_benchmark_reconciles_exactly():
    rows = table(run("bench_load.py", "--requests-per-token", "5", "--tokens", "2", "--clients", "2"), "variant")
    assert set(rows) == {"bare Flask", "middleware, memory://", "middleware, redis://"}
    for name, row in rows.items():
        assert number(row["requests"]) == 10 and row["status codes"] == "{200: 10}", row
        assert 0 < number(row["p50 ms"]) <= number(row["p99 ms"]) and number(row["req/s"]) > 0
        if name != "bare Flask":
            assert row["sent = counted on /metrics"] == "yes: 10 of 10"


@needs("server")
def test_throughput_benchmark_loads_each_variant_under_gunicorn_and_counts_every_request():
    require_binary("wrk")
    out = run("bench_throughput.py", "--rounds", "1", "--seconds", "1", "--connections", "2",
              "--workers", "1", "--threads", "2")
    rows = table(out, "variant")
    assert set(rows) == {"bare Flask", "api-token-exporter (full)", "prometheus-flask-exporter"}
    assert rows["bare Flask"]["of bare Flask's (median of rounds)"] == "1.000"
    for name, row in rows.items():
        assert number(row["requests/s (median)"]) > 0, row
        if name != "bare Flask":     # the cost is what the ratio leaves
            ratio = number(row["of bare Flask's (median of rounds)"])
            assert abs(number(row["cost"].rstrip(" %")) - (1 - ratio) * 100) <= 0.1, row
    assert "counted every one" in out, out


def test_import_benchmark_imports_every_row():
    out = run("bench_import.py", "--rows", "2000", "--days", "2")
    assert "2,000 rows" in out
    rows = table(out, "phase")
    for phase in ("read, validate, aggregate (dry run)", "whole import (+ OpenMetrics text, promtool blocks)"):
        seconds, rate = number(rows[phase]["seconds"]), number(rows[phase]["rows per second"])
        assert seconds >= 0 and within_rounding(rate, 2000, seconds, 0.1)         # of a time rounded to 0.1 s
    out = run("bench_import.py", "--rows", "2000", "--days", "2", "--against", CHECKOUT, "--rounds", "1")
    rows = table(out, "package")                # against this checkout itself: both import every row
    assert set(rows) == {"this checkout", CHECKOUT}, rows
    for row in rows.values():
        for phase in ("dry run", "whole import"):
            seconds, rate = number(row[f"{phase} (s)"]), number(row[f"{phase}, rows per second"])
            assert seconds >= 0 and within_rounding(rate, 2000, seconds, 0.1), row


@needs("server")
def test_proxy_benchmark_compares_four_ways_and_reconciles():
    out = run("bench_proxy.py", "--requests", "40", "--rounds", "1", "--streams", "2", "--clients", "4")
    rows = table(out, "variant")
    assert set(rows) == {"upstream, direct", "pass-through proxy with requests", "api-token-exporter proxy",
                         "api-token-exporter proxy under gthread"}
    direct = number(rows["upstream, direct"]["p50 ms (1 client)"])
    for name, row in rows.items():
        assert row["status codes"] == "{200: 80}", row
        assert 0 < number(row["p50 ms (1 client)"]) <= number(row["p99 ms"]) and number(row["req/s (parallel)"]) > 0
        if name != "upstream, direct":
            added = number(row["p50 added"].replace(" ms", ""))
            assert added == pytest.approx(number(row["p50 ms (1 client)"]) - direct, abs=0.02), row
    assert out.count("counted on /metrics (all)") == 2


@needs("server")
def test_slow_clients_benchmark_holds_them_beside_the_model_it_replaced():
    out = run("bench_slow_clients.py", "--held", "4", "--requests", "24")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("event loop (as served)", "0"), ("event loop (as served)", "4"), ("gthread, 4 threads", "0"),
        ("gthread, 4 threads", "4")]
    assert [r[2].strip() for r in rows[:2]] == ["24 of 24"] * 2      # nobody waits behind the held ones


def test_geo_benchmark_measures_every_path():
    out = run("bench_geo.py", "--lookups", "2000", "--rounds", "1", "--networks", "200")
    assert "100% of them in the MaxMind DB" in out
    rows = table(out, "path")
    for name in ("iptocc.country_code alone", "CountryResolver (iptocc), addresses seen before",
                 "CountryResolver (MaxMind DB), every address new", "client_ip, no trusted proxies, every address new"):
        micro, rate = number(rows[name]["µs per call"]), number(rows[name]["calls per second"])
        assert 0 < micro < 10_000 and micro * rate == pytest.approx(1e6, rel=0.1), rows[name]   # the same figure twice


@needs("prometheus", "slow")
def test_series_memory_benchmark_measures_every_group_and_rule():
    """A real Prometheus, tiny: the rules add at most 12 series per token (docs/scaling.md),
    every group is timed in the run and every rule costed alone on a quiet Prometheus."""
    require_binary("prometheus")
    require_binary("promtool")
    result = subprocess.run([sys.executable, os.path.join(CHECKOUT, "benchmarks", "bench_series_memory.py"),
                             "--checkout", CHECKOUT, "--tokens", "20", "--history", "--scrape-interval", "5",
                             "--longest-interval", "20", "--sample-seconds", "5"],
                            capture_output=True, text=True, timeout=600, cwd=CHECKOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout

    import yaml
    shipped = set()
    for path in os.listdir(os.path.join(CHECKOUT, "prometheus", "rules")):
        with open(os.path.join(CHECKOUT, "prometheus", "rules", path)) as fh:
            shipped |= {g["name"] for g in yaml.safe_load(fh)["groups"]}
    groups = rows(out, "checkout", "rule group", "shipped interval", "interval in the run")
    assert {g["rule group"] for g in groups} == shipped | {"all groups"}
    total = next(g for g in groups if g["rule group"] == "all groups")
    # 12 per token, and a few per target or for the whole API (spread over 20 tokens here)
    assert 20 <= number(total["per token"]) * 20 <= 12 * 20 + 8, total
    for g in groups[:-1]:
        assert number(g["slowest evaluation s"]) >= 0 and number(g["series recorded"]) >= 0, g
    costs = rows(out, "checkout", "rule group", "shipped interval", "seconds per evaluation")
    assert {g["rule group"] for g in costs} == shipped | {"all groups"}
    per_group = [g for g in costs if g["rule group"] != "all groups"]
    every = next(g for g in costs if g["rule group"] == "all groups")
    assert abs(sum(number(g["MiB allocated per second"]) for g in per_group)
               - number(every["MiB allocated per second"])) <= 0.05 * len(per_group) + 0.01
    assert number(every["MiB allocated per evaluation"]) > 0, every
    runs = {r["run"]: r for r in rows(out, "checkout", "run", "head series")}
    assert number(runs["20 tokens, rules"]["head series"]) > number(runs["20 tokens, no rules"]["head series"])
