"""Rules and routing with the real tools: promtool check/test, amtool check-config and a route
table; the committed rules equal a fresh render; every metric a rule reads is catalogued."""
import os
import re
import subprocess
import sys

import pytest
import yaml

from api_token_exporter.mixin import rules as rulegen, thresholds
from devstack.stack import ROOT
from support import needs, require_binary

RULES_DIR = os.path.join(ROOT, "prometheus", "rules")
THRESHOLDS = os.path.join(ROOT, "prometheus", "thresholds.yml")
AM_CONFIG = os.path.join(ROOT, "alertmanager", "alertmanager.yml")


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def rule_files():
    return sorted(os.path.join(RULES_DIR, f) for f in os.listdir(RULES_DIR) if f.endswith(".yml"))


def test_promtool_check_rules():
    result = run(require_binary("promtool"), "check", "rules", *rule_files())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config(tmp_path):
    """As compose runs it: the exporter's /metrics token is the secret compose mounts, here the
    example file it mounts by default."""
    text = open(os.path.join(ROOT, "prometheus", "prometheus.yml")).read()
    assert text.count("/run/secrets/metrics_token") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/metrics_token",
                                   os.path.join(ROOT, "prometheus", "secrets", "metrics_token.example"))
                      .replace("rules/*.yml", os.path.join(ROOT, "prometheus", "rules", "*.yml")))
    result = run(require_binary("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@needs("slow")          # promtool evaluates every rule over hours of samples
def test_promtool_unit_tests():
    tests = sorted(os.path.join("prometheus", "tests", f)
                   for f in os.listdir(os.path.join(ROOT, "prometheus", "tests")) if f.endswith(".yml"))
    assert len(tests) >= 2
    result = run(require_binary("promtool"), "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests)


def shipped_alerts():
    return {r["alert"] for path in rule_files() for g in yaml.safe_load(open(path))["groups"]
            for r in g["rules"] if "alert" in r}


def test_every_alert_has_a_promtool_test_of_its_texts():
    """Every shipped alert fires in a promtool test that checks its rendered summary,
    description and value (prometheus/tests/, or the anomaly alerts in test_alert_texts.py)."""
    from test_alert_texts import ANOMALY_ALERTS
    tested = set(ANOMALY_ALERTS)
    for name in os.listdir(os.path.join(ROOT, "prometheus", "tests")):
        doc = yaml.safe_load(open(os.path.join(ROOT, "prometheus", "tests", name)))
        for case in doc["tests"]:
            for art in case.get("alert_rule_test", []):
                if any("exp_annotations" in alert for alert in art["exp_alerts"] or ()):
                    tested.add(art["alertname"])
    assert shipped_alerts() - tested == set()


def test_committed_rules_equal_a_fresh_render():
    assert rulegen.stale(thresholds.load_thresholds(THRESHOLDS), RULES_DIR) == []


def test_rules_check_command_reports_stale_files(tmp_path):
    out = tmp_path / "rules"
    rulegen.write(thresholds.load_thresholds(THRESHOLDS, {"latency": {"warning": 1.5}}), str(out))
    cli = (sys.executable, "-m", "api_token_exporter.cli")
    result = run(*cli, "rules", "--check", "--out", str(out))
    assert result.returncode == 1 and "out of date" in result.stderr
    assert run(*cli, "rules", "--check").returncode == 0


def test_a_threshold_change_reaches_the_rule_without_touching_promql():
    t = thresholds.load_thresholds(THRESHOLDS, {"latency": {"warning": 1.5, "for": "10m"}})
    rules = rulegen.alert_rules(t)[0]["rules"]
    warning = next(r for r in rules if r["alert"] == "ApiTokenHighLatency" and r["labels"]["severity"] == "warning")
    assert "> 1.5\n" in warning["expr"] and warning["for"] == "10m"
    assert warning["annotations"]["threshold"] == "1.5s"


def test_the_not_rotated_alert_when_it_is_switched_on(tmp_path):
    """Off by default (not in the committed rules); with key_lifecycle.not_rotated_for it fires
    that long after the key's creation or last rotation, and not before."""
    t = thresholds.load_thresholds(THRESHOLDS, {"key_lifecycle": {"not_rotated_for": "2d"}})
    rulegen.write(t, str(tmp_path / "rules"))
    series = 'apitoken_key_event_timestamp_seconds{{job="a",instance="b",token="{}",event="{}"}}'
    status = 'apitoken_token_status{{job="a",instance="b",token="{}"}}'
    test = {"rule_files": [str(tmp_path / "rules" / "apitoken-alerts.yml")], "evaluation_interval": "5m",
            "tests": [{"interval": "5m", "input_series": [
                {"series": series.format("k-old", "created"), "values": "0x900"},
                {"series": status.format("k-old"), "values": "0x900"},
                {"series": series.format("k-rotated", "created"), "values": "0x900"},
                {"series": series.format("k-rotated", "rotated"), "values": "_x288 86400x612"},   # on day 1
                {"series": status.format("k-rotated"), "values": "0x900"}],
                "alert_rule_test": [
                    {"eval_time": "2d", "alertname": "ApiTokenKeyNotRotated", "exp_alerts": []},
                    {"eval_time": "2d20m", "alertname": "ApiTokenKeyNotRotated", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "token": "k-old"}}]},
                    {"eval_time": "3d20m", "alertname": "ApiTokenKeyNotRotated", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "token": "k-old"}},
                        {"exp_labels": {"severity": "warning", "token": "k-rotated"}}]}]}]}
    # exp_annotations must match exactly when given: take the rendered ones for each token
    rule = next(r for g in rulegen.key_lifecycle_rules(t) for r in g["rules"] if r["alert"] == "ApiTokenKeyNotRotated")
    assert "(keys rotate --grace 24h)" in rule["annotations"]["description"]
    for case in test["tests"][0]["alert_rule_test"]:
        for alert in case["exp_alerts"]:
            age = {"2d20m": {"k-old": "2d 0h 20m 0s"}, "3d20m": {"k-old": "3d 0h 20m 0s", "k-rotated": "2d 0h 20m 0s"}}[
                case["eval_time"]][alert["exp_labels"]["token"]]
            alert["exp_annotations"] = {
                "summary": f"API key {alert['exp_labels']['token']} has not been rotated for 2d",
                "description": rule["annotations"]["description"].replace("{{ $labels.token }}", alert["exp_labels"]["token"])
                .replace("{{ $value | humanizeDuration }}", age),
                "runbook_url": rule["annotations"]["runbook_url"], "threshold": "not rotated 2d",
                "value": f"{age} since rotated"}
    path = tmp_path / "not_rotated_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = run(require_binary("promtool"), "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("override,message", [
    ({"latency": {"warning": 2.2}}, "latency.warning must be below latency.critical"),
    ({"latency": {"critical": 3.0}}, r"latency.critical must be below 2.5 \(the last bound of the per-token"),
    ({"error_rate": {"for": "five minutes"}}, "error_rate.for must be a duration"),
    ({"rate_limit": {"approaching_ratio": 1.5}}, "between 0 and 1"),
])
def test_bad_thresholds_say_what_is_wrong(override, message):
    with pytest.raises(thresholds.ThresholdError, match=message):
        thresholds.load_thresholds(THRESHOLDS, override)


def test_every_metric_a_rule_reads_is_in_the_catalogue():
    catalogue = set(re.findall(r"^\| `(apitoken_[a-z_]+)` \|",
                               open(os.path.join(ROOT, "docs", "metrics.md")).read(), re.M))
    used = set()
    for path in rule_files():
        for group in yaml.safe_load(open(path))["groups"]:
            for rule in group["rules"]:
                used |= set(re.findall(r"(?<![:\w])(apitoken_[a-z_]+)(?![:\w])", rule["expr"]))
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for m in used}
    assert used and used - catalogue == set()


@pytest.mark.parametrize("packaged, source", [
    ("runbooks.md", "docs/runbooks.md"),                     # served at the exporter's /runbooks
    ("thresholds.yml", "prometheus/thresholds.yml"),         # what a pip install renders from
    ("templates/apitoken.tmpl", "alertmanager/templates/apitoken.tmpl"),
])
def test_the_packaged_mixin_files_are_the_checkout_s(packaged, source):
    path = os.path.join(ROOT, "exporter", "api_token_exporter", "mixin", packaged)
    assert open(path).read() == open(os.path.join(ROOT, source)).read(), \
        f"{source} changed: run `make rules` to ship it in the package"


def test_every_runbook_link_has_a_section():
    runbooks = open(os.path.join(ROOT, "docs", "runbooks.md")).read()
    anchors = {"#" + re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbooks, re.M)}
    alerts_doc = open(os.path.join(ROOT, "docs", "alerts.md")).read()
    for group in [g for f in ("apitoken-alerts.yml", "apitoken-anomalies.yml")
                  for g in yaml.safe_load(open(os.path.join(RULES_DIR, f)))["groups"]]:
        for rule in [r for r in group["rules"] if "alert" in r]:
            url = rule["annotations"]["runbook_url"]
            assert "#" + url.split("#", 1)[1] in anchors, url
            assert f"`{rule['alert']}`" in alerts_doc, rule["alert"]


# ------------------------------------------------------------------------------ Alertmanager
ROUTES = [
    # label set                                     expected receivers (history: the alert API's webhook)
    ({"alertname": "ApiTokenHighLatency", "severity": "critical", "token": "a"}, "history,critical"),
    ({"alertname": "ApiTokenHighLatency", "severity": "warning", "token": "a"}, "history,warning"),
    ({"alertname": "ApiTokenHighErrorRate", "severity": "critical", "token": "b"}, "history,critical"),
    ({"alertname": "ApiTokenHighErrorRate", "severity": "warning", "token": "b"}, "history,warning"),
    ({"alertname": "ApiTokenUsageSpike", "severity": "warning", "token": "c"}, "history,warning"),
    ({"alertname": "ApiTokenUnauthorizedAccess", "severity": "critical"}, "history,critical"),
    ({"alertname": "ApiTokenRateLimitApproaching", "severity": "warning", "token": "d", "window": "minute"}, "history,warning"),
    ({"alertname": "ApiTokenRateLimited", "severity": "critical", "token": "d", "window": "minute"}, "history,critical"),
    ({"alertname": "ApiTokenRateLimited", "severity": "warning", "token": "d", "window": "minute"}, "history,warning"),
    ({"alertname": "ApiTokenUnauthorizedAccessApiWide", "severity": "warning"}, "history,warning"),
    ({"alertname": "ApiTokenTrafficAnomaly", "severity": "warning", "token": "g", "anomaly": "traffic",
      "direction": "down"}, "history,warning"),
    ({"alertname": "ApiTokenInvalidStillUsed", "severity": "warning", "token": "e", "status": "inactive"}, "history,warning"),
    ({"alertname": "ApiTokenExporterDown", "severity": "critical", "instance": "x:1"}, "history,critical"),
    ({"alertname": "ApiTokenBudgetHigh", "severity": "warning", "token": "f", "period": "daily"}, "history,warning"),
    ({"alertname": "ApiTokenBudgetExhausted", "severity": "critical", "token": "f", "period": "monthly"}, "history,critical"),
    ({"alertname": "ApiTokenUpstreamPoolExhausted", "severity": "critical", "provider": "github"}, "history,critical"),
    ({"alertname": "ApiTokenUpstreamCredentialInvalid", "severity": "warning", "credential": "gh-1"}, "history,warning"),
    ({"alertname": "Watchdog", "severity": "none"}, "watchdog"),
    ({"alertname": "SomethingElse", "severity": "info"}, "history,webhook"),
]


def test_amtool_check_config():
    result = run(require_binary("amtool"), "check-config", AM_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout and "5 inhibit rules" in result.stdout


@pytest.mark.parametrize("labels,receiver", ROUTES, ids=[l["alertname"] + "-" + l["severity"] for l, _ in ROUTES])
def test_route_table(labels, receiver):
    amtool = require_binary("amtool")
    label_args = [f"{k}={v}" for k, v in labels.items()]
    ok = run(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}",
             f"--verify.receivers={receiver}", *label_args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = receiver.split(",")[-1] if "," in receiver else "history,webhook"   # the table can fail both ways
    mismatch = run(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}",
                   f"--verify.receivers={wrong}", *label_args)
    assert mismatch.returncode != 0      # the table can fail


def test_receivers_send_to_the_channels_the_severity_needs():
    cfg = yaml.safe_load(open(AM_CONFIG))
    receivers = {r["name"]: r for r in cfg["receivers"]}
    assert set(receivers["critical"]) >= {"email_configs", "slack_configs", "webhook_configs"}
    assert set(receivers["warning"]) >= {"slack_configs", "webhook_configs"}
    assert "email_configs" not in receivers["warning"]
    assert cfg["route"]["group_by"] == ["alertname", "token"]
    text = open(AM_CONFIG).read()
    assert "hooks.slack.com" not in text and "smtp_auth_password:" not in text
