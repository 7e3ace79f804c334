"""`api-token-exporter import`: past usage records into a real Prometheus as TSDB blocks. The
analytics API must then give exactly the imported per-token, per-day totals, and live traffic
afterwards must add to them, counted once."""
import collections
import csv
import datetime as dt
import json
import math
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, strategies as st
import requests
from werkzeug.serving import make_server

from api_token_exporter.analytics import importer as history, rule_backfill
from api_token_exporter.core.keystore import add_key
from api_token_exporter.core.pricing import Pricing
from api_token_exporter.web.server import create_app
from devstack.stack import find_binary, free_port, prometheus_config, start_prometheus
from api_token_exporter.core.usage import LLMUsage
from api_token_exporter.core.validation import ValidationError
from support import needs

SEED_COLUMNS = ["id", "user_id", "api_key_id", "endpoint", "method", "status_code", "response_time",
                "created_at", "service", "model", "prompt_tokens", "completion_tokens"]
TOKENS = ["17", "23", "42", "51"]                     # APIUsage.api_key_id values
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4o-mini"),
          ("internal", "llama-3-70b-ft")]            # self-hosted, no price: counted, unpriced


def seed_rows(n, start, end, rnd, cached=False):
    """APIUsage rows; with ``cached``, a cached_tokens column (part of prompt_tokens) as well."""
    rows = []
    for i in range(n):
        t = start + rnd.random() * (end - start)
        row = {"id": i + 1, "user_id": 1, "api_key_id": rnd.choice(TOKENS),
               "endpoint": rnd.choice(["/api/v1/items", "/api/v1/items/{id}", "/api/v1/chat"]),
               "method": rnd.choice(["GET", "GET", "POST"]), "status_code": rnd.choice([200] * 8 + [404, 500]),
               "response_time": round(rnd.uniform(0.001, 3.0), 4),
               "created_at": dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None).isoformat(),
               "service": "", "model": "", "prompt_tokens": "", "completion_tokens": ""}
        if rnd.random() < 0.3:
            service, model = rnd.choice(MODELS)
            row.update(service=service, model=model, prompt_tokens=rnd.randint(1, 2000),
                       completion_tokens=rnd.randint(1, 1000))
        if cached:
            row["cached_tokens"] = rnd.randint(0, row["prompt_tokens"]) if row["model"] else ""
        rows.append(row)
    return rows


def oracle(rows, pricing):
    """Per (token, UTC day): requests, LLM tokens, LLM requests and cost (nano-USD, as stored)."""
    days = collections.defaultdict(lambda: collections.Counter())
    for r in rows:
        day = r["created_at"][:10]
        c = days[(r["api_key_id"], day)]
        c["requests"] += 1
        if r["model"]:
            c["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
            c["prompt"] += r["prompt_tokens"]
            c["completion"] += r["completion_tokens"]
            c["llm_requests"] += 1
            price = pricing.price(r["service"], r["model"])
            if price:
                usage = LLMUsage(r["service"], r["model"], r["prompt_tokens"], r["completion_tokens"],
                                 r.get("cached_tokens") or 0)
                c["nano"] += int(round(price.cost(usage) * 1e9))
    return days


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, SEED_COLUMNS + (["cached_tokens"] if "cached_tokens" in rows[0] else []))
        writer.writeheader()
        writer.writerows(rows)


# -- rows and samples ------------------------------------------------------------------------------
def test_rows_are_refused_with_a_reason():
    cols = history.DEFAULT_COLUMNS
    good = {"api_key_id": "17", "endpoint": "/a", "method": "get", "status_code": "201",
            "response_time": "0.25", "created_at": "2026-11-30T10:00:00"}
    row = history.parse_row(good, cols, 1.0)
    assert (row.token, row.route, row.method, row.code, row.duration) == ("17", "/a", "GET", 201, 0.25)
    assert row.time == dt.datetime(2026, 11, 30, 10, tzinfo=dt.timezone.utc).timestamp()   # naive = UTC
    assert history.parse_row(dict(good, created_at="1796112000"), cols, 1.0).time == 1796112000
    assert history.parse_row(dict(good, response_time="250"), cols, 0.001).duration == 0.25
    for change, reason in (({"api_key_id": ""}, "token: missing (column 'api_key_id')"),
                           ({"status_code": "abc"}, "code: not a number"),
                           ({"status_code": "42"}, "not an HTTP status"),
                           ({"endpoint": "items"}, "path template"),
                           ({"created_at": "yesterday"}, "must be an ISO 8601 date or time"),
                           ({"response_time": "-1"}, "duration must be at least 0"),
                           ({"model": "gpt-4"}, "service and model go together"),
                           ({"api_key_id": "atk_secret with spaces"}, "a key id, not the key")):
        with pytest.raises(ValidationError, match=re.escape(reason)):
            history.parse_row(dict(good, **change), cols, 1.0)


def test_heartbeats_keep_every_gap_under_the_baseline_lookback():
    times = history.sample_times({0, 1, 500, 2000}, 60)
    bins = [b for b, _ in times]
    assert bins == sorted(bins) and [b for b, changed in times if changed] == [0, 1, 500, 2000]
    assert max(b2 - b1 for b1, b2 in zip(bins, bins[1:])) * 60 <= history.HEARTBEAT
    assert history.sample_times({5}, 60) == [(5, True)]


# -- into a real Prometheus ----------------------------------------------------------------------
def serve(app):
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


@pytest.fixture(scope="module")
@needs("prometheus")
def imported(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    tmp = tmp_path_factory.mktemp("history")
    now = time.time()
    cutover = now - 600
    rnd = random.Random(7)
    rows = seed_rows(10_000, now - 9 * 86400, cutover, rnd, cached=True)
    bad = [dict(rows[0], id=10_001, api_key_id=""), dict(rows[1], id=10_002, status_code="oops"),
           dict(rows[2], id=10_003, created_at=dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat())]
    llm_row = next(r for r in rows if r["model"])
    bad.append(dict(llm_row, id=10_004, cached_tokens=llm_row["prompt_tokens"] + 1))    # more than the prompt
    source = tmp / "usage.csv"
    write_csv(source, rows[:5000] + bad + rows[5000:])
    data = tmp / "prom" / "data"
    out = subprocess.run(
        [sys.executable, "-m", "api_token_exporter.cli", "import", str(source), "--prometheus-data", str(data),
         "--until", str(cutover), "--rejected", str(tmp / "rejected.csv"), "--progress"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    keys_file = str(tmp / "keys.yml")
    raw = {t: add_key(keys_file, t, tenant=f"tenant-{t}") for t in TOKENS}
    exporter_port = free_port()
    prom = start_prometheus(str(tmp / "prom"), prometheus_config(
        {"api-token-exporter": [f"127.0.0.1:{exporter_port}"]}, None, str(tmp / "no-rules"),
        scrape_interval="1s", evaluation_interval="1s"))
    exporter = create_app(keys_file=keys_file, ingest_token="ingest-secret", admin_token="admin-secret",
                          prometheus_url=prom.url, analytics_cache_seconds=0)
    server = make_server("127.0.0.1", exporter_port, exporter, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"rows": rows, "stderr": out.stderr, "prom": prom, "raw": raw,
               "url": f"http://127.0.0.1:{exporter_port}", "rejected": (tmp / "rejected.csv").read_text(),
               "now": now}
    finally:
        server.shutdown()
        prom.stop()


@pytest.mark.integration
@needs("prometheus")
def test_an_import_into_a_running_prometheus_backfills_the_recording_rules(tmp_path):
    """import --prometheus-url: once Prometheus has loaded the imported blocks, the recording
    rules are evaluated over the imported range, so the hourly counts and the anomaly baselines
    answer right after the import, without waiting for live time."""
    now = time.time() // 3600 * 3600
    rows = seed_rows(3000, now - 2 * 86400, now - 600, random.Random(11))
    source = tmp_path / "usage.csv"
    write_csv(source, rows)
    prom = start_prometheus(str(tmp_path / "prom"), prometheus_config({}, None, str(tmp_path / "no-rules")))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "api_token_exporter.cli", "import", str(source), "--until", str(now),
             "--prometheus-data", str(tmp_path / "prom" / "data"), "--prometheus-url", prom.url],
            capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        assert "recording rules backfilled from" in done.stderr, done.stderr

        def query(expr, at):
            r = requests.get(prom.url + "/api/v1/query", params={"query": expr, "time": at}, timeout=60)
            assert r.status_code == 200, r.text
            return {s["metric"].get("token"): float(s["value"][1]) for s in r.json()["data"]["result"]}
        hour = now - 24 * 3600            # the hour that ended a day before the cut-over
        counted = query("token:apitoken_requests:increase1h", hour)
        for token in TOKENS:
            rows_in_hour = sum(1 for r in rows if r["api_key_id"] == token
                               and hour - 3600 < history.parse_time(r["created_at"]) <= hour)
            assert counted.get(token, 0) == pytest.approx(rows_in_hour, rel=0.25, abs=3), (token, counted)
        baselines = query("token:apitoken_anomaly_requests:mad1d", now - 900)
        assert set(TOKENS) <= set(baselines), baselines
    finally:
        prom.stop()


def usage(world, token):
    r = requests.get(world["url"] + "/api/analytics/usage", headers={"X-API-Key": world["raw"][token]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.integration
def test_import_reports_what_it_did(imported):
    err = imported["stderr"]
    assert "imported 10000 of 10004 rows" in err and "4 rows rejected" in err
    assert "read 10004 rows (4 rejected)" in err                      # progress
    rejected = list(csv.DictReader(imported["rejected"].splitlines()))
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected[:3]] == [      # the header is line 1
        ("5002", "token"), ("5003", "code"), ("5004", "time")]
    assert "cut-over" in rejected[2]["reason"]
    assert rejected[3]["line"] == "5005" and "is more than input_tokens" in rejected[3]["reason"]


@pytest.mark.integration
def test_analytics_give_exactly_the_imported_totals_per_token_and_day(imported):
    expected = oracle(imported["rows"], Pricing.load())
    for token in TOKENS:
        daily = {d["date"]: d for d in usage(imported, token)["trends"]["daily"]}
        days = sorted(day for (t, day) in expected if t == token)
        assert len(days) >= 9
        for day in days:
            want = expected[(token, day)]
            got = daily[day]
            assert (got["requests"], got["tokens"]) == (want["requests"], want["tokens"]), (token, day)
            assert got["cost"] == pytest.approx(want["nano"] / 1e9, abs=2e-6), (token, day)
    token = TOKENS[0]
    start = min(day for (t, day) in expected if t == token)
    r = requests.get(imported["url"] + "/analytics/tokens", params={"start": start + "T00:00:00Z"},
                     headers={"X-API-Key": imported["raw"][token]}, timeout=60)
    assert r.status_code == 200, r.text
    for entry in r.json()["byDay"]:
        want = expected.get((token, entry["date"]), collections.Counter())
        assert (entry["promptTokens"], entry["completionTokens"], entry["requestCount"]) == \
            (want["prompt"], want["completion"], want["llm_requests"]), entry["date"]


@pytest.mark.integration
def test_live_traffic_adds_to_the_imported_history_once(imported):
    token = TOKENS[1]
    before = usage(imported, token)["summary"]
    events = [{"token": token, "route": "/api/v1/items", "status": 200, "duration_ms": 5}] * 7
    r = requests.post(imported["url"] + "/v1/events", json={"events": events}, timeout=10,
                      headers={"Authorization": "Bearer ingest-secret"})
    assert r.json()["accepted"] == 7
    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline and after["allTime"]["requests"] != before["allTime"]["requests"] + 7:
        time.sleep(1)
        after = usage(imported, token)["summary"]
    assert after["allTime"]["requests"] == before["allTime"]["requests"] + 7
    assert after["today"]["requests"] == before["today"]["requests"] + 7
    expected = oracle(imported["rows"], Pricing.load())
    assert before["allTime"]["requests"] == sum(c["requests"] for (t, _), c in expected.items() if t == token)


_DUMPED = re.compile(r'^\{__name__="((?:[^"\\]|\\.)*)"(?:, (.*))?\} (\S+) (-?\d+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_OPENMETRICS = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+) (\S+)$')


def _recorded(lines, pattern, millis):
    """{(name, labels): {time: value}} from `promtool tsdb dump` or OpenMetrics lines."""
    out = collections.defaultdict(dict)
    for line in lines:
        found = pattern.match(line)
        if found:
            name, labels, value, at = found.groups()
            key = (name, tuple(sorted(_LABEL.findall(labels or ""))))
            out[key][float(at) / 1000 if millis else float(at)] = float(value)
    return out


@pytest.mark.integration
def test_the_rule_backfill_records_what_promtool_records(imported, tmp_path):
    """Recording rules over the past as one range query per rule (the fast path) record what
    promtool's `create-blocks-from rules` records: the same series, moments and values. promtool
    offsets each group's evaluations by a hash of its name: the fast path is given that offset."""
    import io
    import yaml
    from api_token_exporter.alerting.client import Prometheus
    rules = os.path.join(os.path.dirname(__file__), "..", "prometheus", "rules", "apitoken-recording.yml")
    groups = [g for g in rule_backfill.rule_levels([rules])[0] if not g["name"].startswith("apitoken.upstream")]
    assert {g.get("interval") for g in groups} == {None, "1m", "1h"}    # every kind of group
    step = {None: 60, "1m": 60, "1h": 3600}
    start = (imported["now"] - 2 * 86400) // 7200 * 7200 + 1800         # not on a block boundary
    end = start + 5 * 3600
    rules_file = tmp_path / "level0.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run(["promtool", "tsdb", "create-blocks-from", "rules", f"--url={imported['prom'].url}",
                           f"--start={int(start)}", f"--end={int(end)}", "--eval-interval=60s",
                           f"--output-dir={tmp_path / 'blocks'}", str(rules_file)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (tmp_path / "blocks" / "wal").mkdir(exist_ok=True)
    dump = subprocess.run(["promtool", "tsdb", "dump", str(tmp_path / "blocks")], capture_output=True, text=True,
                          timeout=300)
    theirs = _recorded(dump.stdout.splitlines(), _DUMPED, millis=True)
    prometheus = Prometheus(imported["prom"].url, timeout=120)
    ours = {}
    for group in groups:
        names = {r["record"] for r in group["rules"]}
        recorded = [min(v) for (name, _), v in theirs.items() if name in names]
        if not recorded:            # nothing to record in this history (no `up`, no LLM cost)
            continue
        first = min(recorded)
        text = io.StringIO()
        rule_backfill.evaluate_rules(prometheus, [group], start, end, 60, text,
                                     offset=first % step[group.get("interval")])
        ours.update(_recorded(text.getvalue().splitlines(), _OPENMETRICS, millis=False))
    assert len(ours) > 20 and set(ours) == set(theirs), set(ours) ^ set(theirs)
    for key in ours:
        missing = sorted(set(ours[key]) ^ set(theirs[key]))       # named, should it happen again
        assert not missing, (key, "only ours" if set(missing) <= set(ours[key]) else "not in ours", missing[:5],
                             min(theirs[key]), max(theirs[key]), len(ours[key]), len(theirs[key]))
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_import_from_sqlite_by_table_and_by_query(tmp_path):
    """The APIUsage table itself, read through SQLAlchemy; a query with its own column names."""
    db = tmp_path / "app.db"
    rows = seed_rows(200, time.time() - 86400, time.time() - 3600, random.Random(3))
    with sqlite3.connect(db) as conn:
        conn.execute("create table api_usage (id integer, user_id integer, api_key_id integer, endpoint text, "
                     "method text, status_code integer, response_time real, created_at timestamp, service text, "
                     "model text, prompt_tokens integer, completion_tokens integer)")
        conn.executemany("insert into api_usage values (?,?,?,?,?,?,?,?,?,?,?,?)",
                         [tuple(r[c] if r[c] != "" else None for c in SEED_COLUMNS) for r in rows])
    by_table = history.run_import(f"sqlite:///{db}", str(tmp_path / "a"), table="api_usage", dry_run=True)
    assert (by_table.rows, by_table.accepted, by_table.rejected) == (200, 200, [])
    by_query = history.run_import(
        f"sqlite:///{db}", str(tmp_path / "b"), dry_run=True,
        query="select api_key_id as key_name, endpoint, status_code, created_at as ts from api_usage "
              "where status_code >= 500", columns={"token": "key_name", "time": "ts"})
    assert by_query.accepted == sum(r["status_code"] >= 500 for r in rows) > 0


@pytest.mark.integration
def test_import_from_postgresql(tmp_path, new_database):
    """The same table on a real PostgreSQL server, by URL."""
    import sqlalchemy as sa
    rows = seed_rows(300, time.time() - 86400, time.time() - 3600, random.Random(5))
    engine = sa.create_engine(new_database)
    with engine.begin() as conn:
        conn.execute(sa.text("create table api_usage (id int, user_id int, api_key_id int, endpoint text, "
                             "method text, status_code int, response_time float, created_at timestamp, "
                             "service text, model text, prompt_tokens int, completion_tokens int)"))
        conn.execute(sa.text("insert into api_usage values (:id, :user_id, :api_key_id, :endpoint, :method, "
                             ":status_code, :response_time, :created_at, :service, :model, :prompt_tokens, "
                             ":completion_tokens)"),
                     [{k: (None if v == "" else int(v) if k == "api_key_id" else v) for k, v in r.items()}
                      for r in rows])
        conn.execute(sa.text("create table keyed (id int primary key, api_key_id int, endpoint text, "
                             "status_code int, created_at timestamp)"))
        ids = random.Random(6).sample(range(1000, 3000), 400)       # inserted out of order
        conn.execute(sa.text("insert into keyed values (:id, 17, '/a', :code, :t)"),
                     [{"id": i, "code": 999 if i == ids[123] else 200, "t": dt.datetime.now() - dt.timedelta(hours=2)}
                      for i in ids])
    engine.dispose()
    result = history.run_import(new_database, str(tmp_path / "blocks"), table="api_usage")
    assert (result.accepted, result.rejected) == (300, [])
    assert result.blocks and all(os.path.isdir(b) for b in result.blocks)
    keyed = history.run_import(new_database, str(tmp_path / "k"), table="keyed", dry_run=True)
    assert keyed.accepted == 399 and [r.line for r in keyed.rejected] == [f"id={ids[123]}"], keyed.rejected


def test_raw_paths_need_templates(tmp_path):
    rows = [{"api_key_id": "17", "endpoint": f"/items/{i}", "status_code": 200,
             "created_at": time.time() - 100 - i} for i in range(50)]
    src = tmp_path / "u.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    with pytest.raises(history.ImportFailed, match="route templates"):
        history.run_import(str(src), str(tmp_path / "o"), max_series=10, dry_run=True)
    result = history.run_import(str(src), str(tmp_path / "o"), routes=["/items/<int:id>"], dry_run=True)
    assert result.accepted == 50 and [(r.line, r.reason) for r in result.rejected] == [(51, "not JSON: Expecting value: column 1")]


def test_every_line_of_a_file_is_imported_rejected_or_a_counted_blank(tmp_path):
    """An unclosed quote is its own line's error (the lines after it are read on their own), a
    field too many or too few is rejected, a blank line is counted: header + imported +
    rejected + blank = the file's lines. JSON Lines' reasons are whole."""
    now = time.time()
    src = tmp_path / "six.csv"
    src.write_text("created_at,api_key_id,endpoint,method,status_code\n"
                   f"{now - 60},17,/a,GET,200\n"
                   f'{now - 59},17,"/x,GET,200\n'
                   f"{now - 58},17,/a,GET,200\n"
                   "\n"
                   f"{now - 57},18,/b,POST,201,extra\n"
                   f'{now - 56},18,"/b,c",POST,500\n'
                   f"{now - 55},19,/a,GET\n"
                   f"{now - 54},19,/a,GET,404\n")
    result = history.run_import(str(src), str(tmp_path / "o"), dry_run=True, until=now)
    assert (result.accepted, result.blank) == (4, 1), result
    assert [(r.line, r.reason) for r in result.rejected] == [
        (3, "not CSV: unexpected end of data (an unclosed or stray quote)"),
        (6, "6 fields where the header has 5"), (8, "4 fields where the header has 5")]
    lines = len(src.read_text().splitlines())
    assert 1 + result.accepted + len(result.rejected) + result.blank == lines == 9
    assert result.rows == result.accepted + len(result.rejected) and result.tokens == {"17": 2, "18": 1, "19": 1}

    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text('{"api_key_id": "17", "endpoint": "/a\\tb"}\n' + '{"api_key_id": "17", "endpoint": "/a\x01"}\n')
    reasons = [r.reason for r in history.run_import(str(jsonl), str(tmp_path / "o"), dry_run=True).rejected]
    assert reasons == ["time: missing (column 'created_at')", "not JSON: Invalid control character at: column 37"], reasons


def test_an_import_overlapping_an_earlier_one_in_time_is_refused_unless_its_instance_differs(tmp_path):
    """Two files over the same hours into one directory with the same labels would interleave
    one series' samples (a fake counter reset): refused with both ranges named; another
    --instance makes separate series; a later period goes in; a dry run checks too."""
    now = time.time() // 60 * 60
    first, second, later = (tmp_path / n for n in ("a.csv", "b.csv", "c.csv"))
    header = "created_at,api_key_id,endpoint,status_code\n"
    first.write_text(header + "".join(f"{now - 7200 + i * 60},17,/a,200\n" for i in range(10)))
    second.write_text(header + "".join(f"{now - 7170 + i * 60},17,/a,200\n" for i in range(10)))
    later.write_text(header + "".join(f"{now - 1800 + i * 60},17,/a,200\n" for i in range(10)))
    out = str(tmp_path / "blocks")
    assert history.run_import(str(first), out, until=now).blocks
    for dry_run in (True, False):
        with pytest.raises(history.ImportFailed, match=r"overlap the import of .*a\.csv.*another --instance"):
            history.run_import(str(second), out, until=now, dry_run=dry_run)
    with pytest.raises(history.ImportFailed, match=r"\(the same source\)"):
        history.run_import(str(first), out, until=now)
    assert history.run_import(str(second), out, until=now, instance="import-2").blocks
    assert history.run_import(str(later), out, until=now).blocks
    ledger = json.loads((tmp_path / "blocks" / history.ImportLedger.NAME).read_text())
    assert [(e["instance"], e["rows"], os.path.basename(e["source"])) for e in ledger] == [
        ("import", 10, "a.csv"), ("import-2", 10, "b.csv"), ("import", 10, "c.csv")]


def test_a_key_file_refuses_rows_of_other_key_ids(tmp_path):
    keys = tmp_path / "keys.yml"
    add_key(str(keys), "known")
    known = [k.id for k in __import__("api_token_exporter.core.keystore", fromlist=["KeyStore"]).KeyStore(str(keys)).all()]
    now = time.time()
    src = tmp_path / "u.csv"
    src.write_text("created_at,api_key_id,endpoint,status_code\n"
                   f"{now - 60},{known[0]},/a,200\n{now - 59},ghost,/a,200\n")
    result = history.run_import(str(src), str(tmp_path / "o"), dry_run=True, until=now, known_tokens=known)
    assert result.accepted == 1 and [(r.line, r.reason) for r in result.rejected] == [
        (3, "token: 'ghost' is not a key id of the key file")]


def test_whole_import_mistakes_are_named_and_odd_rows_are_rejected(tmp_path):
    now = time.time()
    src = tmp_path / "excel.csv"                                   # Excel's byte-order mark
    src.write_text("\ufeffcreated_at,api_key_id,endpoint,status_code\n"
                   f"{now - 60},17,/a,200\nnan,17,/a,200\n-inf,17,/a,200\n0,17,/a,200\n", encoding="utf-8")
    result = history.run_import(str(src), str(tmp_path / "o"), dry_run=True, until=now)
    assert result.accepted == 1
    assert [r.line for r in result.rejected] == [3, 4, 5]
    assert [r.reason for r in result.rejected[:2]] == ["time: not a finite number: nan", "time: not a finite number: -inf"]
    assert "more than 400 days before the cut-over" in result.rejected[2].reason
    other = tmp_path / "other.csv"
    other.write_text("when,key,path,status\n1,2,/a,200\n")
    with pytest.raises(history.ImportFailed, match=r"no column 'created_at' \(time\), 'api_key_id' \(token\)"):
        history.run_import(str(other), str(tmp_path / "o"), dry_run=True)
    with pytest.raises(history.ImportFailed, match="no table 'nope'"):
        history.run_import(f"sqlite:///{tmp_path / 'empty.db'}", str(tmp_path / "o"), table="nope", dry_run=True)
    import decimal
    row = history.parse_row({"created_at": decimal.Decimal("1796112000"), "api_key_id": 17, "endpoint": "/a",
                             "status_code": 200, "response_time": decimal.Decimal("0.125")},
                            history.DEFAULT_COLUMNS, 1.0)                    # PostgreSQL NUMERIC
    assert (row.time, row.duration, row.token) == (1796112000.0, 0.125, "17")


def test_waiting_for_rule_blocks_outlasts_a_prometheus_that_is_away():
    """A Prometheus restarting while the backfill waits refuses connections: that is waited
    out, and the deadline ends in a message, not a traceback."""
    with pytest.raises(history.ImportFailed, match="did not load the backfilled rules within 1 s"):
        rule_backfill.wait_for_series(f"http://127.0.0.1:{free_port()}", ["token:x:rate5m"], time.time(), 1)


def test_backfill_refuses_what_cannot_work(tmp_path):
    def backfill(*args):
        return subprocess.run([sys.executable, "-m", "devstack", "backfill", "--output",
                               str(tmp_path / "b"), *args], capture_output=True, text=True, timeout=60)
    for args, message in ((["--step", "7"], "--step must divide a day"), (["--step", "0"], "--step must divide"),
                          (["--until", "garbage"], "must be an ISO 8601 date or time"),
                          (["--prometheus-url", "http://127.0.0.1:1"], "--prometheus-url needs --prometheus-data")):
        out = backfill(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


# -- the demo's synthetic history ---------------------------------------------------------------
@pytest.fixture(scope="module")
@needs("prometheus")
def backfilled(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    from devstack.demo import DemoStack
    stack = DemoStack(port=0, exporter_port=0, data_dir=str(tmp_path_factory.mktemp("backfill")), speed=1,
                      prometheus_port=0, alertmanager_port=None, sink_port=0, scrape_interval="1s",
                      backfill_days=30).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.integration
def test_backfill_fills_the_trends_and_the_recording_rules(backfilled):
    assert any(line.startswith("history         30 days backfilled") for line in backfilled.describe())
    r = requests.get(backfilled.sidecar_url + "/api/analytics/usage", timeout=60,
                     headers={"Authorization": f"Bearer {backfilled.admin_token}"})
    trends = r.json()["trends"]
    # the 29 whole days before today (today may be minutes old: its first hour not yet recorded)
    assert len(trends["daily"]) == 30 and all(d["requests"] > 0 for d in trends["daily"][-30:-1]), trends["daily"]
    assert trends["daily"][-1]["requests"] >= 0
    assert all(w["requests"] > 0 for w in trends["weekly"][-4:]), trends["weekly"]
    assert sum(m["requests"] > 0 for m in trends["monthly"]) >= 2 and trends["monthly"][-2]["cost"] > 0
    found = rules_loaded(backfilled)
    assert {s["metric"]["token"] for s in found} >= {"demo-steady", "demo-llm", "demo-sidecar"}
    # the second level reads the first's recorded series: the error ratio, ten days back
    assert backfilled.rules_backfill_error is None
    ratio = requests.get(backfilled.prometheus.url + "/api/v1/query", timeout=30, params={
        "query": "token:apitoken_request_errors:ratio_rate5m", "time": time.time() - 10 * 86400}).json()
    assert {s["metric"]["token"] for s in ratio["data"]["result"]} >= {"demo-errors", "demo-steady"}, ratio


@pytest.mark.integration
def test_the_backfilled_history_is_a_possible_one_and_adds_up(backfilled):
    """No counter of the history goes down (Prometheus would read a reset and count it twice),
    and the analytics over its span give exactly what the generator made, per token."""
    url = backfilled.prometheus.url
    names = [n for n in requests.get(url + "/api/v1/label/__name__/values", timeout=30).json()["data"]
             if n.startswith("apitoken_") and (n.endswith("_total") or n.endswith("_bucket"))]
    assert "apitoken_requests_total" in names
    for name in names:                         # resets() drops the name: one family at a time
        resets = requests.get(url + "/api/v1/query", timeout=120, params={
            "query": f'resets({name}{{instance="backfill"}}[31d]) > 0', "time": backfilled.history_end}).json()
        assert resets.get("status") == "success", resets
        assert resets["data"]["result"] == [], (name, resets["data"]["result"][:5])
    from api_token_exporter.analytics.queries import PrometheusClient, Scope, usage_totals
    from devstack.synthetic import STEP
    plan = backfilled.history_plan
    client = PrometheusClient(backfilled.prometheus.url, timeout=120)
    span = (backfilled.history_end - 30 * 86400 - STEP, backfilled.history_end + 1)   # before its first sample
    keys = sorted(t for t in plan.by_token if t.startswith("demo-"))
    answered = {t: usage_totals(client, Scope([t]), [span])[0]["requests"] for t in keys}
    assert answered == {t: plan.by_token[t] for t in keys}


def rules_loaded(stack):
    """The recording rules' blocks, backfilled before the demo's Prometheus started: there at once."""
    assert stack.rules_backfill_error is None, stack.rules_backfill_error
    ten_days_ago = time.time() - 10 * 86400
    deadline = time.monotonic() + 120
    found = []
    while time.monotonic() < deadline and not found:
        found = requests.get(stack.prometheus.url + "/api/v1/query", timeout=30, params={
            "query": "last_over_time(token:apitoken_requests:increase1h[2h])", "time": ten_days_ago}).json()["data"]["result"]
        time.sleep(2)
    return found


# the rate-limit windows and budgets as the live exporter holds them now: gauges with no
# history (over 30 days a range query's hourly points begin at the first full hour of the run)
LIVE_STATE = {"Window used per token ($window)", "Predicted remaining in 1 hour at $scenario x ($window)",
              "Rate-limit window used (alert: ApiTokenRateLimitApproaching)",
              "LLM budget used (alerts: ApiTokenBudgetHigh / Exhausted)", "Alert history",
              # the proxy's credential pool: the demo's history has none, only the live proxy
              "Remaining per credential", "Upstream requests by credential and code",
              "Selections, rotations and refusals"}


@pytest.mark.integration
def test_every_dashboard_panel_has_data_over_its_range_and_30_days(backfilled):
    import grafana_queries
    from test_dashboards import DASHBOARDS, has_data, load, panels, run
    scrape = "15s"
    variables = {"token": "demo-llm", "scenario": "1.5", "window": "minute"}
    pending = []
    for path in DASHBOARDS:
        dash = load(path)
        month = dict(dash, time={"from": "now-30d", "to": "now"})
        pending += [(os.path.basename(path), d, p) for d in (dash, month) for p in panels(d)
                    if d is dash or p["title"] not in LIVE_STATE]
    rules_loaded(backfilled)
    deadline = time.monotonic() + 150
    while pending and time.monotonic() < deadline:
        time.sleep(3)
        pending = [(n, d, p) for n, d, p in pending
                   if not all(has_data(run(backfilled.prometheus.url, req))
                              for req in grafana_queries.requests_for(d, p, scrape, variables))]
    assert pending == [], "\n".join(f"{n} {d['time']['from']}: {p['title']}" for n, d, p in pending)


ANOMALY_KINDS = {("ApiTokenTrafficAnomaly", "up"), ("ApiTokenErrorAnomaly", "up"), ("ApiTokenLatencyAnomaly", "up"),
                 ("ApiTokenNewRoute", None), ("ApiTokenRouteMixAnomaly", None), ("ApiTokenNewCountry", None)}


@pytest.mark.integration
def test_the_compromised_key_shows_every_kind_of_anomaly_and_no_healthy_key_any(backfilled):
    """With its history (and the anomaly rules backfilled over it), the demo's compromised key
    raises each kind of anomaly (pending or firing: `for` is a quarter hour), and the keys that
    behave as they always did raise none. For the lookback (5 minutes) after the history ends,
    Prometheus still reads its last recorded values, so an alert that became active then is the
    history's own state (its random 5xx), not the live traffic's: those are not counted."""
    from api_token_exporter.core.timestamps import parse_timestamp
    rules_loaded(backfilled)
    tail = backfilled.history_end + 300
    seen, others, countries = set(), set(), set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not ANOMALY_KINDS <= seen:
        alerts = requests.get(backfilled.prometheus.url + "/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        for alert in alerts:
            labels = alert["labels"]
            if not labels.get("anomaly"):
                continue
            if labels.get("token") == "demo-compromised":
                seen.add((labels["alertname"], labels.get("direction")))
                if labels["alertname"] == "ApiTokenNewCountry":
                    countries.add(labels.get("country"))
            elif parse_timestamp(alert["activeAt"]) > tail:
                others.add((labels.get("token"), labels["alertname"], labels.get("direction")))
        assert others == set(), others
        time.sleep(5)
    assert ANOMALY_KINDS <= seen, seen
    # read from the alerts API: the new-country alert's group runs every 5 minutes, and its ALERTS
    # series appear only from its third evaluation (the `for` state is restored at the second)
    assert countries == {"BR"}, countries


@pytest.mark.integration
def test_every_recording_rule_answers_on_the_smaller_series(backfilled):
    """The per-token series were cut to what is read (docs/metrics.md "Series budget"): every
    recording rule the shipped files define has data in the demo now, and every one the demo
    backfills (all but the proxy pool's) ten days back too: the hourly group as well, whatever
    the hour the history starts at (promtool skips an hourly group that starts late in a block)."""
    import yaml
    rules_loaded(backfilled)
    rules_dir = os.path.join(os.path.dirname(__file__), "..", "prometheus", "rules")
    names, backfilled_names = set(), set()
    for name in sorted(os.listdir(rules_dir)):
        with open(os.path.join(rules_dir, name), encoding="utf-8") as fh:
            for group in yaml.safe_load(fh)["groups"]:
                recorded = {r["record"] for r in group["rules"] if "record" in r}
                names |= recorded
                if not group["name"].startswith("apitoken.upstream"):
                    backfilled_names |= recorded
    assert len(names) > 20

    def answering(at):
        found = set()
        for name in sorted(names):
            result = requests.get(backfilled.prometheus.url + "/api/v1/query", timeout=30, params={
                "query": f"count(last_over_time({name}[3h]))", "time": at}).json()["data"]["result"]
            if result and float(result[0]["value"][1]) > 0:
                found.add(name)
        return found

    # the history has requests, latencies and LLM use; not the live gauges these read (rate-limit
    # windows, budgets), nor `up` (the targets' start records), nor failed authentications by client
    live_only = {"token_period:apitoken_llm_budget:usage_ratio", "client:apitoken_auth_failures:count1h",
                 "job_instance:apitoken_counts_from_start:5m", "job_instance:apitoken_counts_from_start:1h"}
    assert backfilled_names - live_only - answering(time.time() - 10 * 86400) == set()
    empty = set(names)
    deadline = time.monotonic() + 300           # the first evaluations of every group live
    while True:
        empty -= answering(time.time())
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(10)
    assert empty == set(), f"recording rules with no data: {sorted(empty)}"


@given(st.integers(0, 500), st.lists(st.floats(-1, 5, allow_nan=False), min_size=1, max_size=17), st.integers(0, 99))
def test_the_synthetic_split_adds_up_and_gives_nothing_to_a_zero_weight(n, weights, seed):
    """The demo's history splits counts by shares: whole parts adding up to n, none below 0 (a
    counter that goes down reads as a reset), none where the weight is 0 or less (a latency
    bucket beyond the profile's range), unless no weight is positive at all."""
    from devstack.synthetic import split_counts
    parts = split_counts(n, weights, __import__("random").Random(seed))
    assert len(parts) == len(weights) and sum(parts) == n and min(parts) >= 0
    if any(w > 0 for w in weights):
        assert all(p == 0 for p, w in zip(parts, weights) if w <= 0)


def test_the_synthetic_latency_is_each_profiles_own():
    """A week of the demo's history: each token's latency histogram holds the profile's
    log-uniform latency, bucket by bucket (the share at or below each bound within 1.5 points
    of log(bound/low)/log(high/low)), nothing beyond the profile's range, and the p95 Prometheus
    would read from it (linear within a bucket) inside the bucket of the profile's own p95."""
    from devstack.synthetic import PROFILES, STEP, generate
    from api_token_exporter.core.metrics import LATENCY_BUCKETS
    agg = history.Aggregate(STEP, None)
    end = 1_700_000_000 // STEP * STEP
    generate(agg, end - 7 * 86400, end, seed=7, anomalies=())
    for token, profile in PROFILES.items():
        if profile.refused:            # its 429s are answered in a millisecond, below its range
            continue
        bins = agg.histograms[("apitoken_request_duration_seconds", (token,))].values()
        per_bucket = [sum(column) for column in zip(*bins)][:len(LATENCY_BUCKETS) + 1]
        total = sum(per_bucket)
        assert total > 1000, token
        low, high = profile.latency
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, per_bucket):
            cumulative += count
            expected = min(1.0, max(0.0, math.log(bound / low) / math.log(high / low)))
            assert abs(cumulative / total - expected) < 0.015, (token, bound, cumulative / total, expected)
            if bound < low:
                assert cumulative == 0, (token, bound)
        assert per_bucket[-1] == 0 or high > LATENCY_BUCKETS[-1], (token, "+Inf", per_bucket[-1])
        true_p95 = low * (high / low) ** 0.95
        rank, seen, lower = 0.95 * total, 0, 0.0
        for bound, count in zip(LATENCY_BUCKETS, per_bucket):
            if seen + count >= rank:
                read_p95 = lower + (bound - lower) * (rank - seen) / count
                break
            seen, lower = seen + count, bound
        above = [b for b in LATENCY_BUCKETS if b >= true_p95][0]
        below = max([0.0] + [b for b in LATENCY_BUCKETS if b < true_p95])
        assert below <= read_p95 <= above, (token, read_p95, true_p95)
