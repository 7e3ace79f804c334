"""What an alert says, rendered by promtool from firing values: the anomaly alerts here (the
other alerts' texts are checked in prometheus/tests/*.yml). The anomaly alerts read the centres
and MADs the anomaly group records from a day of history; their texts are tested on those
given directly, with the shipped alert group alone (what the group records is tested end to
end against a real Prometheus in test_anomaly_e2e.py and test_history.py)."""
import subprocess

import yaml

from support import require_binary
from test_rules import RULES_DIR

ANOMALY_ALERTS = ("ApiTokenTrafficAnomaly", "ApiTokenErrorAnomaly", "ApiTokenLatencyAnomaly",
                  "ApiTokenNewRoute", "ApiTokenRouteMixAnomaly", "ApiTokenNewCountry")

# 25 hours of what the anomaly alerts read, one value a minute, changing at 25h: token
# "up" busier, failing and slower than its day, calling a new route and from a new country;
# token "down" quieter. The centres and MADs are given as the anomaly group records them.
BEFORE, AFTER = 1500, 30                    # values before and after the change


ALWAYS = f"1x{BEFORE + AFTER}"


def changes(before, after):
    return f"{before}x{BEFORE - 1} {after}x{AFTER}"


def grows(per_step, start=BEFORE + AFTER):
    """A counter rising ``per_step`` every minute from step ``start`` (absent before)."""
    return ("_x" + str(start) + " " if start else "") + f"0+{per_step}x{BEFORE + AFTER - start}"


SERIES = {
    'apitoken_token_info{token="up",name="Alpha app",tenant="acme"}': ALWAYS,
    'apitoken_token_info{token="down",name="Nightly batch",tenant="acme"}': ALWAYS,
    'apitoken_anomaly_sensitivity{token="down"}': f"3x{BEFORE + AFTER}",                     # high: 3 MADs
    'token:apitoken_requests:rate5m{token="up"}': changes(0.5, 2.5),
    'token:apitoken_requests:rate5m{token="down"}': changes(0.5, 0.02),
    'token:apitoken_anomaly_requests:centre_high{token="up"}': f"0.5x{BEFORE + AFTER}",
    'token:apitoken_anomaly_requests:centre_low{token="up"}': f"0.5x{BEFORE + AFTER}",
    'token:apitoken_anomaly_requests:mad1d{token="up"}': f"0.1x{BEFORE + AFTER}",
    'token:apitoken_anomaly_requests:centre_high{token="down"}': f"0.5x{BEFORE + AFTER}",
    'token:apitoken_anomaly_requests:centre_low{token="down"}': f"0.5x{BEFORE + AFTER}",
    'token:apitoken_anomaly_requests:mad1d{token="down"}': f"0.1x{BEFORE + AFTER}",
    'token:apitoken_request_errors:ratio_rate5m{token="up"}': changes(0.01, 0.25),
    'token:apitoken_anomaly_error_ratio:centre_high{token="up"}': f"0.01x{BEFORE + AFTER}",
    'token:apitoken_anomaly_error_ratio:mad1d{token="up"}': f"0.01x{BEFORE + AFTER}",
    'token:apitoken_request_duration_seconds:p95_5m{token="up"}': changes(0.2, 1.5),
    'token:apitoken_anomaly_latency:centre_high{token="up"}': f"0.2x{BEFORE + AFTER}",
    'token:apitoken_anomaly_latency:mad1d{token="up"}': f"0.05x{BEFORE + AFTER}",
    'apitoken_requests_total{token="up",route="/items",method="GET",code="200"}': grows(12, 0),
    'apitoken_requests_total{token="up",route="/admin/export",method="GET",code="200"}': grows(18, BEFORE),
    'token:apitoken_anomaly_route_mix:divergence{token="up"}': changes(0.05, 0.6),
    'apitoken_requests_by_country_total{token="up",country="DE"}': grows(12, 0),
    'apitoken_requests_by_country_total{token="up",country="KP"}': grows(12, BEFORE),
}
WHO = "up (Alpha app, tenant acme)"
RUNBOOK = "http://localhost:9464/runbooks#"
DASHBOARD = "http://localhost:3000/d/ate-token?var-token="
EXPECTED = {
    "ApiTokenTrafficAnomaly": [
        ({"anomaly": "traffic", "direction": "up", "token": "up"}, {
            "summary": "Unusual request rate spike for token up",
            "description": f"Token {WHO}: request rate 2.5 req/s over the last 5m, above its own band (expected "
                           "about 0.50, band 0.10 to 0.90 req/s; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "2.5 req/s"}),
        ({"anomaly": "traffic", "direction": "down", "token": "down"}, {
            "summary": "Unusual request rate drop for token down",
            "description": "Token down (Nightly batch, tenant acme): request rate 0.02 req/s over the last 5m, "
                           "below its own band (expected about 0.50, band 0.20 to 0.80 req/s; "
                           "sensitivity 3 MADs).",
            "threshold": "outside the learned band for 15m", "value": "0.02 req/s"})],
    "ApiTokenErrorAnomaly": [
        ({"anomaly": "error", "direction": "up", "token": "up"}, {
            "summary": "Unusual 5xx ratio rise for token up",
            "description": f"Token {WHO}: 5xx ratio 25% over the last 5m, above its own band (expected about "
                           "1%, band 0% to 5%; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "25%"})],
    "ApiTokenLatencyAnomaly": [
        ({"anomaly": "latency", "direction": "up", "token": "up"}, {
            "summary": "Unusual p95 latency rise for token up",
            "description": f"Token {WHO}: p95 latency 1.5s over the last 5m, above its own band (expected about "
                           "200ms, band 0s to 400ms; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "1.5s"})],
    "ApiTokenNewRoute": [
        ({"anomaly": "pattern", "route": "/admin/export", "token": "up"}, {
            "summary": "Token up calls /admin/export for the first time",
            "description": f"Token {WHO} called /admin/export, a route it had not called in the 14d before: "
                           "0.30 req/s over the last 5m. A new client version, or a key used by someone else?",
            "threshold": "not called in 14d", "value": "0.30 req/s"})],
    "ApiTokenRouteMixAnomaly": [
        ({"anomaly": "pattern", "token": "up"}, {
            "summary": "Token up calls its routes in an unusual mix",
            "description": f"60% of the requests of token {WHO} moved to other routes than the same hour "
                           "yesterday and the day before (alert above 50%). Most grown: /admin/export, now 60% "
                           "of its requests.",
            "threshold": "50% of traffic moved", "value": "60% moved"})],
    "ApiTokenNewCountry": [
        ({"anomaly": "geographic", "country": "KP", "token": "up"}, {
            "summary": "Token up is used from KP for the first time",
            "description": f"Requests with token {WHO} come from KP (0.20 req/s over the last 5m), a country none "
                           "came from in the 30d before; it was used from 2 countries in the last day. A leaked key?",
            "threshold": "no request from there in 30d", "value": "0.20 req/s"})],
}


def test_the_anomaly_alerts_say_what_was_measured_with_units_and_their_band(tmp_path):
    groups = yaml.safe_load(open(f"{RULES_DIR}/apitoken-anomalies.yml"))["groups"]
    # the alerts alone, over the recorded series given below (not recorded again from raw ones)
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {r["alert"] for r in alerts} == set(ANOMALY_ALERTS) == set(EXPECTED)
    (tmp_path / "anomaly-alerts.yml").write_text(yaml.safe_dump({"groups": [{"name": "alerts", "rules": alerts}]}))
    cases = [{"eval_time": "25h20m", "alertname": name, "exp_alerts": [
        {"exp_labels": {"severity": "warning", **labels},
         "exp_annotations": {**texts, "runbook_url": RUNBOOK + name.lower(),
                             "dashboard": f"{DASHBOARD}{labels['token']}"}} for labels, texts in expected]}
        for name, expected in EXPECTED.items()]
    test = {"rule_files": ["anomaly-alerts.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "alert_rule_test": cases,
                       "input_series": [{"series": s, "values": v} for s, v in SERIES.items()]}]}
    (tmp_path / "texts_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run([require_binary("promtool"), "test", "rules", "texts_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
