"""Known LLM usage through the demo (public call, captured JSON, captured stream) and the
ingest endpoint, into a real Prometheus; the analytics API and the report must give exactly
the sent token counts and the cost the pricing table implies."""
import collections
import csv
import datetime as dt
import io
import subprocess
import sys
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

from devstack.demo import CACHED_PROMPT_TOKENS, REASONING_MODELS, create_demo_api
from api_token_exporter.analytics import queries as analytics
from api_token_exporter.core.keystore import add_key
from api_token_exporter.core.pricing import Pricing
from api_token_exporter.core.usage import LLMUsage
from api_token_exporter.web.server import create_app
from devstack.stack import find_binary, free_port, prometheus_config, start_prometheus
from support import needs

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer admin-secret"}

# (token, service, model, stream, completion tokens); the prompt is 3 words = 9 tokens, after the
# demo's cached system prompt for OpenAI and Anthropic; half a reasoning model's answer is reasoning
CHATS = [
    ("acme-chat", "openai", "gpt-4o", False, 100),
    ("acme-chat", "openai", "gpt-4o", False, 200),
    ("acme-chat", "openai", "gpt-4o-2024-08-06", False, 300),
    ("acme-chat", "openai", "o3", False, 120),
    ("acme-batch", "anthropic", "claude-sonnet-4-5", False, 50),
    ("acme-batch", "anthropic", "claude-haiku-4-5", False, 70),
    ("acme-batch", "anthropic", "claude-sonnet-4-5-20250929", True, 90),
    ("globex-bot", "cohere", "command-r-08-2024", False, 11),
    ("globex-bot", "cohere", "command-r-08-2024", False, 13),
    ("globex-bot", "internal", "llama-3-70b-ft", False, 40),      # no price: tokens yes, cost no
]
INGESTED = [("sidecar", LLMUsage("openai", "gpt-4o-mini", 1000, 2000, cached_input_tokens=512)),
            ("sidecar", LLMUsage("openai", "gpt-4o-mini", 5, 7)),
            ("sidecar", LLMUsage("anthropic", "claude-opus-4-5", 10, 20, cache_write_tokens=4))]
TENANTS = {"acme-chat": "acme", "acme-batch": "acme", "globex-bot": "globex", "sidecar": "globex"}


def serve(app):
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
@needs("prometheus")
def world(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    tmp = tmp_path_factory.mktemp("analytics")
    keys_file = str(tmp / "keys.yml")
    raw = {t: add_key(keys_file, t, tenant=tenant) for t, tenant in TENANTS.items()}
    api_server, api_url = serve(create_demo_api(keys_file=keys_file))
    exporter_port = free_port()
    prom = start_prometheus(str(tmp / "prom"), prometheus_config(
        {"api-token-exporter": [api_url.split("//")[1], f"127.0.0.1:{exporter_port}"]}, None,
        str(tmp / "no-rules"), scrape_interval="1s", evaluation_interval="1s"))
    exporter = create_app(keys_file=keys_file, ingest_token="ingest-secret", admin_token="admin-secret",
                          prometheus_url=prom.url)
    exp_server = make_server("127.0.0.1", exporter_port, exporter, threaded=True)
    threading.Thread(target=exp_server.serve_forever, daemon=True).start()
    exporter_url = f"http://127.0.0.1:{exporter_port}"
    try:
        sent = []      # (token, service, model, input, output) as the responses reported them
        for token, service, model, stream, completion in CHATS:
            r = requests.post(api_url + "/api/v1/chat", headers={"X-API-Key": raw[token]}, timeout=10,
                              json={"service": service, "model": model, "prompt": "one two three",
                                    "completion_tokens": completion, "stream": stream})
            assert r.status_code == 200
            cached = 0 if service == "cohere" else CACHED_PROMPT_TOKENS
            sent.append((token, LLMUsage(service, model, 9 + cached, completion, cached,
                                         reasoning_tokens=completion // 2 if model in REASONING_MODELS else 0)))
        events = [{"token": t, "route": "/v1/complete", "method": "POST", "status": 200, "duration_ms": 5,
                   "llm": {"service": u.service, "model": u.model, "input_tokens": u.input_tokens,
                           "output_tokens": u.output_tokens, "cached_input_tokens": u.cached_input_tokens,
                           "cache_write_tokens": u.cache_write_tokens}}
                  for t, u in INGESTED]
        events.append({"token": "sidecar", "route": "/v1/complete", "status": 200, "duration_ms": 5,
                       "llm": {"service": "openai", "model": "gpt-4", "input_tokens": -3}})   # refused
        r = requests.post(exporter_url + "/v1/events", json={"events": events}, timeout=10,
                          headers={"Authorization": "Bearer ingest-secret"})
        assert r.json()["accepted"] == 3 and r.json()["rejected"] == 1
        sent += INGESTED
        expected_tokens = sum(u.input_tokens + u.output_tokens for _, u in sent)

        def scraped():
            result = requests.get(prom.url + "/api/v1/query", timeout=5,
                                  params={"query": "sum(apitoken_llm_tokens_total)"}).json()["data"]["result"]
            return result and float(result[0]["value"][1]) == expected_tokens
        deadline = time.monotonic() + 30
        while not scraped():
            assert time.monotonic() < deadline, "Prometheus never saw the final counts"
            time.sleep(0.5)
        yield {"exporter": exporter_url, "prom": prom, "raw": raw, "sent": sent, "keys_file": keys_file}
    finally:
        prom.stop()
        api_server.shutdown()
        exp_server.shutdown()


def expected(sent, tokens=None):
    pricing = Pricing.load()
    by_model = collections.defaultdict(lambda: [0, 0, 0, 0.0])
    by_service = collections.defaultdict(lambda: [0, 0, 0, 0.0, set()])
    for token, usage in sent:
        if tokens is not None and token not in tokens:
            continue
        price = pricing.price(usage.service, usage.model)
        cost = price.cost(usage) if price else 0.0
        for row in (by_model[usage.model], by_service[usage.service]):
            row[0] += usage.input_tokens
            row[1] += usage.output_tokens
            row[2] += 1
            row[3] += cost
        by_service[usage.service][4].add(usage.model)
    return by_model, by_service


def test_tokens_analytics_are_exact_for_every_model_and_service(world):
    doc = requests.get(world["exporter"] + "/analytics/tokens?days=1", headers=ADMIN, timeout=30).json()
    by_model, by_service = expected(world["sent"])
    summary = doc["summary"]
    assert summary["promptTokens"] == sum(v[0] for v in by_model.values())
    assert summary["completionTokens"] == sum(v[1] for v in by_model.values())
    assert summary["totalTokens"] == summary["promptTokens"] + summary["completionTokens"]
    assert summary["estimatedCost"] == pytest.approx(sum(v[3] for v in by_model.values()), abs=1e-6)
    assert summary["timeframe"]["days"] == 1
    assert {m["model"]: (m["promptTokens"], m["completionTokens"], m["requestCount"]) for m in doc["byModel"]} == \
        {m: (v[0], v[1], v[2]) for m, v in by_model.items()}
    for m in doc["byModel"]:
        assert m["estimatedCost"] == pytest.approx(by_model[m["model"]][3], abs=1e-6)
        assert m["totalTokens"] == m["promptTokens"] + m["completionTokens"]
    assert set(doc["byService"]) == {"openai", "anthropic", "cohere", "internal"}
    assert by_model["llama-3-70b-ft"][3] == 0 and by_model["o3"][3] > 0
    for service, entry in doc["byService"].items():
        want = by_service[service]
        assert (entry["promptTokens"], entry["completionTokens"], entry["requestCount"]) == tuple(want[:3])
        assert entry["models"] == sorted(want[4])
        assert entry["estimatedCost"] == pytest.approx(want[3], abs=1e-6)
    # seed 001's shape
    assert set(doc) == {"summary", "byModel", "byDay", "byService"}
    assert set(doc["summary"]["timeframe"]) == {"startDate", "endDate", "days"}
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    day_total = sum(d["totalTokens"] for d in doc["byDay"])
    assert day_total == summary["totalTokens"]
    assert [d for d in doc["byDay"] if d["totalTokens"]][-1]["date"] == today


def test_a_tenant_key_sees_only_its_tenants_tokens(world):
    acme = {"X-API-Key": world["raw"]["acme-chat"]}
    doc = requests.get(world["exporter"] + "/analytics/tokens", headers=acme, timeout=30).json()
    by_model, by_service = expected(world["sent"], {"acme-chat", "acme-batch"})
    assert doc["summary"]["totalTokens"] == sum(v[0] + v[1] for v in by_model.values())
    assert set(doc["byService"]) == {"openai", "anthropic"}
    assert "command-r-08-2024" not in {m["model"] for m in doc["byModel"]}
    assert doc["summary"]["timeframe"]["days"] == 30


def test_custom_ranges(world):
    now = dt.datetime.now(dt.timezone.utc)
    start = (now - dt.timedelta(hours=1)).isoformat()
    doc = requests.get(world["exporter"] + "/analytics/tokens", headers=ADMIN, timeout=30,
                       params={"start": start, "end": now.isoformat()}).json()
    assert doc["summary"]["totalTokens"] == sum(u.input_tokens + u.output_tokens for _, u in world["sent"])
    later = requests.get(world["exporter"] + "/analytics/tokens", headers=ADMIN, timeout=30,
                         params={"start": (now - dt.timedelta(days=5)).date().isoformat(),
                                 "end": (now - dt.timedelta(days=4)).date().isoformat()}).json()
    assert later["summary"]["totalTokens"] == 0 and later["byModel"] == []


def test_usage_summary_trends_and_predictions(world):
    doc = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, timeout=60).json()
    tokens = sum(u.input_tokens + u.output_tokens for _, u in world["sent"])
    cost = sum(v[3] for v in expected(world["sent"])[0].values())
    requests_sent = len(CHATS) + len(INGESTED)
    for period in ("today", "thisWeek", "thisMonth", "allTime"):
        assert doc["summary"][period]["requests"] == requests_sent, period
        assert doc["summary"][period]["tokens"] == tokens, period
        assert doc["summary"][period]["cost"] == pytest.approx(cost, abs=1e-6), period
    assert len(doc["trends"]["daily"]) == 30 and len(doc["trends"]["weekly"]) == 12
    assert len(doc["trends"]["monthly"]) == 12
    assert doc["trends"]["daily"][-1]["tokens"] == tokens
    assert sum(d["tokens"] for d in doc["trends"]["daily"]) == tokens
    assert doc["trends"]["monthly"][-1]["month"] == dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")
    p = doc["predictions"]
    assert p["estimatedMonthlyCost"] == pytest.approx(cost / p["monthProgress"], rel=1e-3)
    assert p["projectedTokens"] >= tokens and p["projectedRequests"] >= requests_sent


def test_trend_periods_are_the_calendars_cut_to_the_range():
    def ts(text):
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()
    now = ts("2026-12-07T10:00:00")                       # a Monday
    weekly = analytics.trend_periods("weekly", now, ts("2026-11-18T00:00:00"))   # from a Wednesday
    assert [(label, lo, hi) for label, lo, hi in weekly] == [
        ("2026-11-16", ts("2026-11-18T00:00:00"), ts("2026-11-23T00:00:00")),
        ("2026-11-23", ts("2026-11-23T00:00:00"), ts("2026-11-30T00:00:00")),
        ("2026-11-30", ts("2026-11-30T00:00:00"), ts("2026-12-07T00:00:00")),
        ("2026-12-07", ts("2026-12-07T00:00:00"), now)]
    monthly = analytics.trend_periods("monthly", now, ts("2025-12-15T00:00:00"), ts("2026-03-01T00:00:00"))
    assert [p[0] for p in monthly] == ["2025-12", "2026-01", "2026-02"] and monthly[0][1] == ts("2025-12-15T00:00:00")
    # without a start: the last 30 days, 12 weeks, 12 months, as before
    assert [len(analytics.trend_periods(v, now)) for v in ("daily", "weekly", "monthly")] == [30, 12, 12]
    assert analytics.trend_periods("monthly", now)[0][0] == "2026-01"
    assert analytics.trend_periods("weekly", now)[0][0] == "2026-09-21"
    with pytest.raises(analytics.AnalyticsError, match="at most 92 points"):
        analytics.trend_periods("daily", now, now - 92 * 86400 - 1)
    assert len(analytics.trend_periods("daily", now, ts("2026-09-07T00:00:00"))) == 92


def test_usage_trends_follow_a_chosen_range(world):
    """start and end: each day, week or month of the range, cut to it, so the points add up to
    the range's total (the console's From and To); view: that trend alone."""
    now = dt.datetime.now(dt.timezone.utc)
    tokens = sum(u.input_tokens + u.output_tokens for _, u in world["sent"])
    start = (now - dt.timedelta(days=9)).date().isoformat()
    for view, field, points in (("daily", "date", 10), ("weekly", "weekStart", None), ("monthly", "month", None)):
        doc = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, timeout=60,
                           params={"start": start, "view": view}).json()
        assert list(doc["trends"]) == [view]
        rows = doc["trends"][view]
        assert rows[0][field] <= start and sum(r["tokens"] for r in rows) == tokens, (view, rows)
        if points:
            assert len(rows) == points and rows[0]["date"] == start
    past = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, timeout=60,
                        params={"start": start, "end": (now - dt.timedelta(days=2)).date().isoformat()}).json()
    assert [len(past["trends"][v]) for v in ("daily", "weekly", "monthly")][0] == 7
    assert sum(r["tokens"] for r in past["trends"]["monthly"]) == 0
    for params, message in (({"view": "hourly"}, "view must be one of daily, weekly, monthly"),
                            ({"start": "2025-01-01", "view": "daily"}, "the daily trend has at most 92 points"),
                            ({"start": "2026-01-02", "end": "2026-01-01"}, "start must be before end")):
        r = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, params=params, timeout=10)
        assert r.status_code == 400 and message in r.json()["detail"], (params, r.text)
    # the breakdown without byDay: a year in one query
    year = requests.get(world["exporter"] + "/analytics/tokens", headers=ADMIN, timeout=60,
                        params={"start": (now - dt.timedelta(days=365)).date().isoformat(), "byDay": "false"}).json()
    assert "byDay" not in year and year["summary"]["totalTokens"] == tokens


def test_usage_for_one_token_and_the_scope_it_must_stay_in(world):
    acme = {"X-API-Key": world["raw"]["acme-chat"]}
    chat = [u for t, u in world["sent"] if t == "acme-chat"]
    for headers in (ADMIN, acme):
        doc = requests.get(world["exporter"] + "/api/analytics/usage", headers=headers, timeout=60,
                           params={"token": "acme-chat"}).json()
        assert doc["summary"]["today"]["requests"] == len(chat)
        assert doc["summary"]["today"]["tokens"] == sum(u.input_tokens + u.output_tokens for u in chat)
        tokens = requests.get(world["exporter"] + "/analytics/tokens", headers=headers, timeout=60,
                              params={"token": "acme-chat", "days": 1}).json()
        assert {m["model"] for m in tokens["byModel"]} == {u.model for u in chat}
    r = requests.get(world["exporter"] + "/api/analytics/usage", headers=acme, params={"token": "globex-bot"},
                     timeout=30)
    assert r.status_code == 400 and "tokens you may see" in r.json()["detail"]


def capacity(world, headers=ADMIN, **params):
    r = requests.get(world["exporter"] + "/api/analytics/capacity", headers=headers, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return {t["token"]: t for t in r.json()["tokens"]}, r.json()


def test_capacity_scenarios(world):
    """The scenario planner on known traffic: each token's last hour, exact; its windows' live
    state; month-end projections that are usage's predictions at 1x, and scale with the scenario."""
    pricing = Pricing.load()
    once, doc = capacity(world, multiplier="1")
    for token in TENANTS:
        mine = [u for t, u in world["sent"] if t == token]
        assert once[token]["pacePerHour"] == len(mine), token          # sent within the hour, none refused
        assert once[token]["monthToDate"]["cost"] == pytest.approx(
            sum(pricing.price(u.service, u.model).cost(u) for u in mine if pricing.price(u.service, u.model)),
            abs=1e-6), token
        assert [w["window"] for w in once[token]["windows"]] == ["minute", "hour", "day"]
    usage = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, timeout=60).json()
    assert doc["total"]["monthEnd"]["cost"] == pytest.approx(usage["predictions"]["estimatedMonthlyCost"], rel=1e-3)
    assert doc["total"]["monthToDate"]["cost"] == pytest.approx(usage["summary"]["thisMonth"]["cost"], abs=1e-6)

    # 500 times acme-chat's four requests an hour, 2,000 an hour: its hour (996 of 1,000 left, the
    # demo API's live window) runs out after 996 / 2,000 of an hour, its day (9,996 of 10,000) after
    # 9,996 / 2,000 hours; 33 a minute never exhaust the minute's 100
    many, _ = capacity(world, multiplier="500x")
    windows = {w["window"]: w for w in many["acme-chat"]["windows"]}
    hour, day = windows["hour"], windows["day"]
    assert (hour["limit"], hour["remaining"], hour["scenarioUse"]) == (1000, 996, 2000)
    assert hour["useRatio"] == 2.0 and hour["resetsAt"]
    assert hour["runsOutInSeconds"] == pytest.approx(996 / 2000 * 3600, abs=0.01)
    assert (day["remaining"], day["scenarioUse"]) == (9996, 48000)
    assert day["runsOutInSeconds"] == pytest.approx(9996 / 2000 * 3600, abs=0.01)
    assert windows["minute"]["runsOutInSeconds"] is None and windows["minute"]["runsOutAt"] is None
    # the sidecar's events went to the exporter, which enforces no limit: its windows are whole
    assert [w["remaining"] for w in many["sidecar"]["windows"]] == [100, 1000, 10000]
    thrice, _ = capacity(world, multiplier="3")
    for token, entry in thrice.items():
        base = once[token]
        # costs are answered to 6 decimals: the expectation (3b - 2a of two answered costs) carries
        # up to 2.5e-6 of their rounding, the answer 0.5e-6 of its own
        assert entry["monthEnd"]["cost"] == pytest.approx(
            base["monthToDate"]["cost"] + 3 * (base["monthEnd"]["cost"] - base["monthToDate"]["cost"]), rel=1e-3,
            abs=4.5e-6)

    acme, _ = capacity(world, {"X-API-Key": world["raw"]["acme-batch"]})
    assert set(acme) == {"acme-chat", "acme-batch"}
    r = requests.get(world["exporter"] + "/api/analytics/capacity", headers=ADMIN, params={"multiplier": "0"},
                     timeout=10)
    assert r.status_code == 400 and "multiplier" in r.json()["detail"]


def test_csv_report_gives_the_same_numbers(world):
    result = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "report", "--days", "1", "--format", "csv",
                             "--prometheus-url", world["prom"].url, "--progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "querying Prometheus" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    total = rows.pop()
    assert total["service"] == "TOTAL"
    want = collections.Counter()
    pricing = Pricing.load()
    want_cost = collections.Counter()
    for token, u in world["sent"]:
        want[(u.service, u.model, "prompt")] += u.input_tokens
        want[(u.service, u.model, "completion")] += u.output_tokens
        price = pricing.price(u.service, u.model)
        want_cost[(u.service, u.model)] += price.cost(u) if price else 0.0
    for row in rows:
        key = (row["service"], row["model"])
        assert int(row["prompt_tokens"]) == want[key + ("prompt",)]
        assert int(row["completion_tokens"]) == want[key + ("completion",)]
        assert float(row["estimated_cost_usd"]) == pytest.approx(want_cost[key], abs=1e-6)
    assert int(total["total_tokens"]) == sum(want.values())
    table = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "report", "--days", "1", "--prometheus-url", world["prom"].url],
                           capture_output=True, text=True, timeout=120)
    assert "BY SERVICE AND MODEL" in table.stdout and "claude-sonnet-4-5" in table.stdout


def test_bad_parameters_are_a_400_that_says_which(world):
    for params, message in (({"days": "abc"}, "days must be a whole number"),
                            ({"days": "0"}, "days must be from 1 to 92"),
                            ({"start": "yesterday"}, "start must be an ISO 8601"),
                            ({"start": "2026-01-02", "end": "2026-01-01"}, "start must be before end"),
                            ({"end": "2999-01-01"}, "end must not be in the future")):
        r = requests.get(world["exporter"] + "/analytics/tokens", headers=ADMIN, params=params, timeout=10)
        assert r.status_code == 400 and message in r.json()["detail"], params


def test_analytics_need_a_key(world):
    assert requests.get(world["exporter"] + "/analytics/tokens", timeout=10).status_code == 401
    r = requests.get(world["exporter"] + "/api/analytics/usage", headers={"X-API-Key": "nope"}, timeout=10)
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API key"}


def test_prometheus_down_is_a_clear_503(world):
    app = create_app(keys_file=world["keys_file"], admin_token="admin-secret",
                     prometheus_url=f"http://127.0.0.1:{free_port()}")
    server, url = serve(app)
    try:
        r = requests.get(url + "/analytics/tokens", headers=ADMIN, timeout=10)
        assert r.status_code == 503
        assert "cannot be reached" in r.json()["detail"]
    finally:
        server.shutdown()


def test_dashboard_period_totals_agree_with_the_api(world):
    """The overview's Today / This week / This month stats, sent as Grafana sends an instant
    stat query (time = now, $__range = now - the period's start, UTC), equal the API's summary."""
    import json
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "grafana", "dashboards", "overview.json")) as fh:
        cards = {p["title"]: {t["legendFormat"]: t["expr"] for t in p["targets"]}
                 for p in json.load(fh)["panels"] if p.get("targets")}
    usage = requests.get(world["exporter"] + "/api/analytics/usage", headers=ADMIN, timeout=30).json()
    now = time.time()
    day = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    starts = {"Today": day, "This week (from Monday)": day - dt.timedelta(days=day.weekday()),
              "This month": day.replace(day=1)}
    fields = {"requests": "requests", "LLM tokens": "tokens", "cost": "cost"}
    for period, api_name in (("Today", "today"), ("This week (from Monday)", "thisWeek"),
                             ("This month", "thisMonth")):
        seconds = int(now - starts[period].timestamp())
        for title_part, field in fields.items():
            expr = cards[period][title_part].replace("$__range", f"{seconds}s")
            result = requests.post(world["prom"].url + "/api/v1/query", data={"query": expr, "time": now},
                                   timeout=30).json()["data"]["result"]
            value = float(result[0]["value"][1]) if result else 0.0
            assert value == pytest.approx(usage["summary"][api_name][field], abs=1e-6), (period, field)
            assert value > 0, (period, field)


def test_without_prometheus_the_service_says_what_to_set(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha")
    from werkzeug.test import Client
    client = Client(create_app(keys_file=keys_file, admin_token="admin-secret"))
    for path in ("/analytics/tokens", "/api/analytics/usage", "/api/analytics/capacity"):
        r = client.get(path, headers=ADMIN)
        assert r.status_code == 404 and "set prometheus_url" in r.json["detail"], path
