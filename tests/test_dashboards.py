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

from api_token_exporter import dashgen
from api_token_exporter.demo import DemoStack
from api_token_exporter.stack import ROOT, find_binary

DASHBOARDS = sorted(glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json")))
BUILTINS = {"__rate_interval", "__range", "__interval", "__range_s", "__interval_ms"}
CATALOGUE = set(re.findall(r"^\| `(apitoken_[a-z_]+)` \|", open(os.path.join(ROOT, "docs", "metrics.md")).read(), re.M))
FILLED = {"$__rate_interval": "20s", "$__range": "1h", "$__interval": "5s", "$token": "demo-llm",
          "$scenario": "1.5", "$window": "minute"}


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
                    seen += 1
                    assert "[$__rate_interval]" in args, (panel["title"], expr)
    assert seen > 20


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    stack = DemoStack(port=0, exporter_port=0, data_dir=str(tmp_path_factory.mktemp("dash")), speed=4,
                      prometheus_port=0, alertmanager_port=None, sink_port=0, scrape_interval="1s").start()
    try:
        yield stack
    finally:
        stack.stop()


def query(prom_url, expr):
    r = requests.post(prom_url + "/api/v1/query", data={"query": expr}, timeout=30)
    body = r.json()
    assert body["status"] == "success", (expr, body.get("error"))
    return body["data"]["result"]


def fill(expr):
    for name in sorted(FILLED, key=len, reverse=True):
        expr = expr.replace(name, FILLED[name])
    return expr


@pytest.mark.integration
def test_every_panel_query_returns_data_against_the_demo(demo):
    prom = demo.prometheus.url
    all_queries = [(os.path.basename(path), panel["title"], fill(expr))
                   for path in DASHBOARDS for panel, expr in exprs(load(path))]
    assert len(all_queries) > 60
    variable = query(prom, "count by (token) (apitoken_token_info)")
    deadline = time.monotonic() + 90
    empty = all_queries
    while empty and time.monotonic() < deadline:
        time.sleep(3)
        still = []
        for name, title, expr in empty:
            result = query(prom, expr)
            finite = [r for r in result if not math.isnan(float(r["value"][1]))]
            if not finite:
                still.append((name, title, expr))
        empty = still
    assert empty == [], "panels without data:\n" + "\n".join(f"{n}: {t}: {e}" for n, t, e in empty)
    assert variable or query(prom, "count by (token) (apitoken_token_info)")
