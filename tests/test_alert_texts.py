"""What an alert says, rendered by promtool from firing values: the anomaly alerts here (the
other alerts' texts are checked in prometheus/tests/*.yml). The anomaly alerts read what the
anomaly group records from a day of history; their texts are tested on those recorded values
given directly, with the shipped alert group alone (what they compute is tested end to end
against a real Prometheus in test_anomaly_e2e.py)."""
import subprocess

import yaml

from support import require_binary
from test_rules import RULES_DIR

ANOMALY_ALERTS = ("ApiTokenTrafficAnomaly", "ApiTokenErrorAnomaly", "ApiTokenLatencyAnomaly",
                  "ApiTokenNewRoute", "ApiTokenRouteMixAnomaly", "ApiTokenNewCountry")

# what the anomaly group has recorded for token "up" (busier, failing and slower than its band,
# a new route and country, a changed mix) and token "down" (quieter than its band)
RECORDED = {
    'apitoken_token_info{token="up",name="Alpha app",tenant="acme"}': 1,
    'apitoken_token_info{token="down",name="Nightly batch",tenant="acme"}': 1,
    'token:apitoken_requests:rate5m{token="up"}': 2.5,
    'token:apitoken_requests:rate5m{token="down"}': 0.02,
    'token:apitoken_anomaly:learning{token="up"}': 0,
    'token:apitoken_anomaly:learning{token="down"}': 0,
    'token:apitoken_anomaly:min_change{token="up"}': 0.5,
    'token:apitoken_anomaly:min_change{token="down"}': 0.5,
    'token:apitoken_anomaly:band_mads{token="up"}': 4,
    'token:apitoken_anomaly:band_mads{token="down"}': 3,
    'token:apitoken_anomaly_requests:median1d{token="up"}': 0.5,
    'token:apitoken_anomaly_requests:expected_high{token="up"}': 0.6,
    'token:apitoken_anomaly_requests:upper{token="up"}': 1.2,
    'token:apitoken_anomaly_requests:lower{token="up"}': 0.1,
    'token:apitoken_anomaly_requests:median1d{token="down"}': 0.5,
    'token:apitoken_anomaly_requests:expected_low{token="down"}': 0.4,
    'token:apitoken_anomaly_requests:lower{token="down"}': 0.15,
    'token:apitoken_anomaly_requests:upper{token="down"}': 0.9,
    'token:apitoken_request_errors:ratio_rate5m{token="up"}': 0.25,
    'token:apitoken_anomaly_error_ratio:median1d{token="up"}': 0.01,
    'token:apitoken_anomaly_error_ratio:expected_high{token="up"}': 0.012,
    'token:apitoken_anomaly_error_ratio:lower{token="up"}': 0,
    'token:apitoken_anomaly_error_ratio:upper{token="up"}': 0.05,
    'token:apitoken_request_duration_seconds:p95_5m{token="up"}': 1.5,
    'token:apitoken_anomaly_latency:median1d{token="up"}': 0.2,
    'token:apitoken_anomaly_latency:expected_high{token="up"}': 0.22,
    'token:apitoken_anomaly_latency:lower{token="up"}': 0.05,
    'token:apitoken_anomaly_latency:upper{token="up"}': 0.4,
    'token_route:apitoken_requests:rate5m{token="up",route="/admin/export"}': 1.5,
    'token:apitoken_anomaly_route_mix:divergence{token="up"}': 0.6,
    'token_route:apitoken_anomaly_route_share:now{token="up",route="/admin/export"}': 0.6,
    'token_route:apitoken_anomaly_route_share:now{token="up",route="/items"}': 0.4,
    'token_route:apitoken_anomaly_route_share:day_before{token="up",route="/items"}': 1,
    'token_country:apitoken_requests:rate5m{token="up",country="KP"}': 0.2,
    'token:apitoken_countries:count1d{token="up"}': 2,
}
WHO = "up (Alpha app, tenant acme)"
RUNBOOK = "http://localhost:9464/runbooks#"
DASHBOARD = "http://localhost:3000/d/ate-token?var-token="
EXPECTED = {
    "ApiTokenTrafficAnomaly": [
        ({"anomaly": "traffic", "direction": "up", "token": "up"}, {
            "summary": "Unusual request rate spike for token up",
            "description": f"Token {WHO}: request rate 2.5 req/s over the last 5m, above its own band (usually "
                           "about 0.50, expected band 0.10 to 1.2 req/s; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "2.5 req/s"}),
        ({"anomaly": "traffic", "direction": "down", "token": "down"}, {
            "summary": "Unusual request rate drop for token down",
            "description": "Token down (Nightly batch, tenant acme): request rate 0.02 req/s over the last 5m, "
                           "below its own band (usually about 0.50, expected band 0.15 to 0.90 req/s; "
                           "sensitivity 3 MADs).",
            "threshold": "outside the learned band for 15m", "value": "0.02 req/s"})],
    "ApiTokenErrorAnomaly": [
        ({"anomaly": "error", "direction": "up", "token": "up"}, {
            "summary": "Unusual 5xx ratio rise for token up",
            "description": f"Token {WHO}: 5xx ratio 25% over the last 5m, above its own band (usually about "
                           "1%, expected band 0% to 5%; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "25%"})],
    "ApiTokenLatencyAnomaly": [
        ({"anomaly": "latency", "direction": "up", "token": "up"}, {
            "summary": "Unusual p95 latency rise for token up",
            "description": f"Token {WHO}: p95 latency 1.5s over the last 5m, above its own band (usually about "
                           "200ms, expected band 50ms to 400ms; sensitivity 4 MADs).",
            "threshold": "outside the learned band for 15m", "value": "1.5s"})],
    "ApiTokenNewRoute": [
        ({"anomaly": "pattern", "route": "/admin/export", "token": "up"}, {
            "summary": "Token up calls /admin/export for the first time",
            "description": f"Token {WHO} called /admin/export, a route it had not called in the 14d before: "
                           "1.5 req/s over the last 5m. A new client version, or a key used by someone else?",
            "threshold": "not called in 14d", "value": "1.5 req/s"})],
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
    alerts = [g for g in groups if all("alert" in r for r in g["rules"])]
    assert {r["alert"] for g in alerts for r in g["rules"]} == set(ANOMALY_ALERTS) == set(EXPECTED)
    (tmp_path / "anomaly-alerts.yml").write_text(yaml.safe_dump({"groups": alerts}))
    cases = [{"eval_time": "20m", "alertname": name, "exp_alerts": [
        {"exp_labels": {"severity": "warning", **labels},
         "exp_annotations": {**texts, "runbook_url": RUNBOOK + name.lower(),
                             "dashboard": f"{DASHBOARD}{labels['token']}"}} for labels, texts in expected]}
        for name, expected in EXPECTED.items()]
    test = {"rule_files": ["anomaly-alerts.yml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "alert_rule_test": cases,
                       "input_series": [{"series": s, "values": f"{v}x25"} for s, v in RECORDED.items()]}]}
    (tmp_path / "texts_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run([require_binary("promtool"), "test", "rules", "texts_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
