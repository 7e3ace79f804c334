"""Every benchmark still runs (tiny sizes) and says what it measured: guards against rot.
Nothing here asserts a time; the figures live in docs/performance.md."""
import os
import subprocess
import sys

import pytest

from devstack.stack import ROOT

pytestmark = pytest.mark.integration


def run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_middleware_benchmark_compares_the_four_variants():
    out = run("bench_middleware.py", "--requests", "50", "--rounds", "1")
    for name in ("bare Flask", "prometheus-flask-exporter", "api-token-exporter (full)",
                 "api-token-exporter (observe-only)"):
        assert f"| {name} |" in out


def test_asgi_benchmark_compares_the_four_variants():
    out = run("bench_asgi.py", "--requests", "50", "--rounds", "1")
    for name in ("bare FastAPI", "prometheus-fastapi-instrumentator", "api-token-exporter (full)",
                 "api-token-exporter (observe-only)"):
        assert f"| {name} |" in out


def test_scrape_benchmark_checks_identical_output_first():
    out = run("bench_scrape.py", "--tokens", "50", "--repeat", "1")
    assert "| 50 | 882 |" in out           # 17 series per token plus 32 fixed ones


def test_rate_limit_benchmark_counts_one_round_trip():
    out = run("bench_ratelimit.py", "--requests", "100", "--rounds", "1")
    ours = next(line for line in out.splitlines() if line.startswith("| api-token-exporter redis://"))
    assert ours.split("|")[3].strip() == "1"


def test_load_benchmark_reconciles_exactly():
    out = run("bench_load.py", "--requests-per-token", "5", "--tokens", "2", "--clients", "2")
    assert out.count("| yes: 10 of 10 |") == 2


def test_import_benchmark_imports_every_row():
    out = run("bench_import.py", "--rows", "2000", "--days", "2")
    assert "| whole import (+ OpenMetrics text, promtool blocks) |" in out and "2,000 rows" in out


def test_proxy_benchmark_compares_three_ways_and_reconciles():
    out = run("bench_proxy.py", "--requests", "40", "--rounds", "1", "--streams", "2", "--clients", "4")
    for name in ("upstream, direct", "pass-through proxy with requests", "api-token-exporter proxy"):
        assert f"| {name} |" in out
    assert out.count("{200: 80}") == 3 and "counted on /metrics (all)" in out


def test_geo_benchmark_measures_every_path():
    out = run("bench_geo.py", "--lookups", "2000", "--rounds", "1", "--networks", "200")
    assert "100% of them in the MaxMind DB" in out
    for name in ("iptocc.country_code alone", "CountryResolver (iptocc), addresses seen before",
                 "CountryResolver (MaxMind DB), every address new", "client_ip, no trusted proxies, every address new"):
        assert f"| {name} |" in out
