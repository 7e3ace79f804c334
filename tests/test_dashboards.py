"""Grafana dashboards, checked without a Grafana server: structure rules, the metric catalogue,
regeneration, and every panel query run against a real Prometheus scraping the demo."""
import glob
import json
import math
import os
import re
import time

import pytest
import requests
import yaml

import grafana_queries

from api_token_exporter.mixin import dashboards as dashgen
from devstack.demo import DemoStack
from devstack.stack import ROOT, find_binary
from support import needs

DASHBOARDS = sorted(glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json")))
BUILTINS = {"__rate_interval", "__range", "__interval", "__range_s", "__interval_ms"}
CATALOGUE = set(re.findall(r"^\| `(apitoken_[a-z_]+)` \|", open(os.path.join(ROOT, "docs", "metrics.md")).read(), re.M))


def load(path):
    with open(path) as fh:
        return json.load(fh)


def panels(dash):
    return [p for p in dash["panels"] if p["type"] != "row"]


def exprs(dash):
    return [(p, t["expr"]) for p in panels(dash) for t in p["targets"]]


def recorded_names():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "prometheus", "rules", "*.yml")):
        for group in yaml.safe_load(open(path))["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def test_five_dashboards_with_unique_uids_and_panel_ids():
    dashes = [load(p) for p in DASHBOARDS]
    assert {d["uid"] for d in dashes} == {"ate-overview", "ate-token", "ate-llm", "ate-capacity", "ate-alerts"}
    for d in dashes:
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), d["uid"]
        assert d["title"] and d["schemaVersion"] >= 36


def test_committed_dashboards_equal_a_fresh_render():
    rendered = dashgen.render(os.path.join(ROOT, "prometheus", "thresholds.yml"))
    for name, text in rendered.items():
        assert open(os.path.join(ROOT, "grafana", "dashboards", name)).read() == text, name


def test_datasources_by_uid_and_provisioned():
    prov = yaml.safe_load(open(os.path.join(ROOT, "grafana", "provisioning", "datasources", "datasources.yml")))
    uids = {d["uid"]: d for d in prov["datasources"]}
    prom_cfg = yaml.safe_load(open(os.path.join(ROOT, "prometheus", "prometheus.yml")))
    assert uids["prometheus"]["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]
    assert uids["alertmanager"]["type"] == "alertmanager"
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            refs = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
            for ref in refs:
                assert ref["uid"] in uids or ref["uid"].startswith("${"), (path, panel["title"])
    provider = yaml.safe_load(open(os.path.join(ROOT, "grafana", "provisioning", "dashboards", "dashboards.yml")))
    assert provider["providers"][0]["type"] == "file"


def _calls(expr, func):
    """The argument text of every call to ``func`` in ``expr``."""
    out = []
    for m in re.finditer(rf"(?<![\w:]){func}\(", expr):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        out.append(expr[m.end():i - 1])
    return out


def test_every_rate_uses_rate_interval():
    seen = 0
    for path in DASHBOARDS:
        for panel, expr in exprs(load(path)):
            for func in ("rate", "irate"):
                for args in _calls(expr, func):
                    seen += 1          # or a forecast's pace over a fixed hour or six
                    assert "[$__rate_interval]" in args or args.endswith(("[1h]", "[6h]")), (panel["title"], expr)
    assert seen > 20


def test_forecasts_use_rates_not_predict_linear_on_counters():
    """A counter series that stops (imported history at its cut-over, an exporter gone) drops
    out of a sum: predict_linear would read that as a fall and forecast far below zero."""
    forecasts = 0
    for path in DASHBOARDS:
        for panel, expr in exprs(load(path)):
            for args in _calls(expr, "predict_linear"):
                assert "_total" not in args, (panel["title"], expr)
            forecasts += "* 2592000" in expr or "* 604800" in expr or "days_in_month" in expr
    assert forecasts >= 5


def test_every_panel_has_a_unit():
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            assert panel["fieldConfig"]["defaults"].get("unit"), (path, panel["title"])


def test_no_undefined_variables():
    for path in DASHBOARDS:
        dash = load(path)
        defined = {v["name"] for v in dash["templating"]["list"]} | BUILTINS
        texts = [e for _, e in exprs(dash)] + [p["title"] for p in panels(dash)]
        for text in texts:
            for name in re.findall(r"\$\{?(\w+)", text):
                assert name in defined, (path, name, text)


def test_every_metric_is_catalogued_or_recorded():
    recorded = recorded_names()
    used = set()
    for path in DASHBOARDS:
        for _, expr in exprs(load(path)):
            expr = re.sub(r'"[^"]*"', '""', expr)       # label values are not metrics
            used |= set(re.findall(r"(?<![\w$])(:?[a-zA-Z_][\w:]*)(?=\s*[\[{)]|\s*$|\s+(?:or|and|unless|[-+*/<>=]))", expr))
    raw = {re.sub(r"_(bucket|count|sum)$", "", m) for m in used if m.startswith("apitoken_")}
    recording = {m for m in used if ":" in m}
    assert raw and raw - CATALOGUE == set()
    assert recording and recording - recorded == set()


def test_alert_thresholds_are_drawn_on_the_panels_they_guard():
    t = dashgen.load_thresholds(os.path.join(ROOT, "prometheus", "thresholds.yml"))
    alerts = load(os.path.join(ROOT, "grafana", "dashboards", "alerts.json"))
    by_title = {p["title"]: p for p in panels(alerts)}

    def values(title):
        panel = by_title[title]
        assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
        return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert values("p95 latency by token (alert: ApiTokenHighLatency)")[1:] == \
        [t["latency"]["warning"], t["latency"]["critical"]]
    assert values("5xx error ratio by token (alert: ApiTokenHighErrorRate)")[1:] == \
        [t["error_rate"]["warning"], t["error_rate"]["critical"]]
    assert values("Rate-limit window used (alert: ApiTokenRateLimitApproaching)")[1] == \
        t["rate_limit"]["approaching_ratio"]
    assert values("LLM budget used (alerts: ApiTokenBudgetHigh / Exhausted)")[1:3] == \
        [t["budgets"]["warning"], t["budgets"]["critical"]]


def test_token_dashboard_has_the_token_variable_and_capacity_the_scenarios():
    token = load(os.path.join(ROOT, "grafana", "dashboards", "token-detail.json"))
    assert token["templating"]["list"][0]["query"]["query"] == "label_values(apitoken_token_info, token)"
    capacity = load(os.path.join(ROOT, "grafana", "dashboards", "capacity-forecasts.json"))
    scenario = next(v for v in capacity["templating"]["list"] if v["name"] == "scenario")
    assert [o["value"] for o in scenario["options"]] == ["1", "1.5", "2", "3"]
    assert sum("$scenario" in e for _, e in exprs(capacity)) >= 5


def _cells(dash):
    cells = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                cells.setdefault((x, y), []).append(p["title"])
    return cells


def test_panels_tile_the_grid_without_gaps_or_overlaps():
    for path in DASHBOARDS:
        dash = load(path)
        cells = _cells(dash)
        bottom = max(y for _, y in cells) + 1
        holes = [(x, y) for y in range(bottom) for x in range(24) if (x, y) not in cells]
        overlaps = {k: v for k, v in cells.items() if len(v) > 1}
        assert holes == [] and overlaps == {}, (os.path.basename(path), holes[:5], list(overlaps.items())[:3])


def test_titles_fit_their_panels():
    # about 8 pixels a character at Grafana's title size, 75 pixels a grid column
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            title = re.sub(r"\$\w+", "1.5", panel["title"])
            assert len(title) * 8 <= panel["gridPos"]["w"] * grafana_queries.PX_PER_COLUMN - 30, \
                (os.path.basename(path), panel["title"], panel["gridPos"]["w"])


def test_tables_name_every_column_and_show_dates_as_dates():
    tables = [(path, p) for path in DASHBOARDS for p in panels(load(path)) if p["type"] == "table"]
    assert len(tables) >= 3
    for path, panel in tables:
        organize = next(t for t in panel["transformations"] if t["id"] == "organize")["options"]
        refs = [t["refId"] for t in panel["targets"]]
        values = [f"Value #{r}" for r in refs] if len(refs) > 1 else ["Value"]
        for value in values:
            assert value in organize["renameByName"] or organize["excludeByName"].get(value), (panel["title"], value)
        assert organize["excludeByName"].get("Time")
        assert all(t["format"] == "table" and t["instant"] for t in panel["targets"])
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            for t in panel["targets"]:
                if "_timestamp_seconds" not in t["expr"]:
                    continue
                assert t["expr"].rstrip().endswith("* 1000"), (panel["title"], "Grafana dates are in ms")
                units = {panel["fieldConfig"]["defaults"]["unit"]} | {
                    prop["value"] for o in panel["fieldConfig"]["overrides"] for prop in o["properties"]
                    if prop["id"] == "unit"}
                assert any(u.startswith("dateTime") for u in units), panel["title"]


def test_calendar_bars_use_a_day_step_and_their_own_time_range():
    llm = load(os.path.join(ROOT, "grafana", "dashboards", "llm-usage-cost.json"))
    bars = [p for p in panels(llm) if p["title"].startswith("Cost per ")]
    assert [p["timeFrom"] for p in bars] == ["30d", "12w", "1y"]
    for p in bars:
        (req,) = grafana_queries.requests_for(llm, p, "15s", {})
        assert req.kind == "range" and req.step == 86400 and req.end % 86400 == 0
        assert "offset -" in req.expr


def test_the_grafana_model_matches_grafana():
    """Figures from Grafana's own code and docs: a 6 h range on a 900-pixel panel queries at
    20 s with a 1 m $__rate_interval; a 1w step aligns the range to Thursdays."""
    import datetime as dt
    now = dt.datetime(2026, 12, 1, 10, 30, 7, tzinfo=dt.timezone.utc)
    dash = {"time": {"from": "now-6h", "to": "now"}, "weekStart": "monday"}
    panel = {"gridPos": {"w": 12}, "targets": [{"refId": "A", "expr": "rate(x[$__rate_interval])[$__range:$__interval]"}]}
    (req,) = grafana_queries.requests_for(dash, panel, "15s", {}, now)
    assert req.step == 20 and req.expr == "rate(x[1m0s])[21600s:20s]"
    assert req.end == (now.timestamp() // 20) * 20
    weekly = dict(panel, interval="1w", timeFrom="now-12w")
    (req,) = grafana_queries.requests_for(dash, weekly, "15s", {}, now)
    assert req.step == 604800 and dt.datetime.fromtimestamp(req.start, dt.timezone.utc).weekday() == 3
    today = dict(panel, timeFrom="now/d")
    (req,) = grafana_queries.requests_for(dash, today, "15s", {}, now)
    assert req.expr.endswith("[37807s:30s]")     # 42 s rounds to 30 s
    assert grafana_queries.resolve("now/w", now).isoformat() == "2026-11-30T00:00:00+00:00"
    assert grafana_queries.resolve("now/M", now).day == 1


@pytest.fixture(scope="module")
@needs("prometheus")
def demo(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    stack = DemoStack(port=0, exporter_port=0, data_dir=str(tmp_path_factory.mktemp("dash")), speed=4,
                      prometheus_port=0, alertmanager_port=None, sink_port=0, scrape_interval="1s").start()
    try:
        yield stack
    finally:
        stack.stop()


def run(prom_url, req):
    if req.kind == "instant":
        r = requests.post(prom_url + "/api/v1/query", data={"query": req.expr, "time": req.end}, timeout=60)
    else:
        r = requests.post(prom_url + "/api/v1/query_range", timeout=60, data={
            "query": req.expr, "start": req.start, "end": req.end, "step": req.step})
    body = r.json()
    assert body["status"] == "success", (req.expr, body.get("error"))
    return body["data"]["result"]


def has_data(result):
    for series in result:
        points = series["values"] if "values" in series else [series["value"]]
        if any(not math.isnan(float(v)) for _, v in points):
            return True
    return False


@pytest.mark.integration
def test_every_panel_returns_data_through_grafana_shaped_queries(demo):
    """Each panel's queries as Grafana 10.4 would send them (its time range, interval,
    maxDataPoints and step-aligned start and end), against the demo's Prometheus, with the
    scrape interval the provisioned data source declares."""
    prom = demo.prometheus.url
    scrape = yaml.safe_load(open(os.path.join(ROOT, "grafana", "provisioning", "datasources", "datasources.yml")))[
        "datasources"][0]["jsonData"]["timeInterval"]
    variables = {"token": "demo-llm", "scenario": "1.5", "window": "minute"}
    boards = [(os.path.basename(path), load(path)) for path in DASHBOARDS]
    pending = [(name, dash, panel) for name, dash in boards for panel in panels(dash)]
    assert len(pending) > 50
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        time.sleep(3)
        still = []
        for name, dash, panel in pending:
            reqs = grafana_queries.requests_for(dash, panel, scrape, variables)
            results = [run(prom, req) for req in reqs]
            if not all(has_data(r) for r in results):
                still.append((name, dash, panel))
            elif panel["type"] == "table":
                organize = next(t for t in panel["transformations"] if t["id"] == "organize")["options"]
                labels = {k for r in results for s in r for k in s["metric"]}
                named = set(organize["renameByName"]) | set(organize["excludeByName"])
                assert labels <= named, (panel["title"], labels - named)
        pending = still
    assert pending == [], "panels without data:\n" + "\n".join(
        f"{n}: {p['title']}: {[r.expr for r in grafana_queries.requests_for(d, p, scrape, variables)]}"
        for n, d, p in pending)
    tokens = requests.get(prom + "/api/v1/label/token/values", params={"match[]": "apitoken_token_info"},
                          timeout=10).json()["data"]
    assert "demo-llm" in tokens            # the $token variable's query offers the token used above
