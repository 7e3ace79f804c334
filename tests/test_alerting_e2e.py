"""End to end with the real binaries: demo API -> Prometheus (1 s scrape and evaluation, the
rules rendered from prometheus/thresholds.yml with short windows) -> Alertmanager (the
committed routing and templates) -> webhook sink, Slack (posted to the sink) and SMTP sink."""
import concurrent.futures
import os
import re
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

from api_token_exporter.mixin import rules as rulegen, thresholds
from devstack.demo import create_demo_api
from api_token_exporter.core.keystore import add_key, load_keys, save_keys
from devstack.sinks import SmtpSink, WebhookSink
from devstack.stack import (ROOT, alertmanager_config, find_binary, free_port,
                                      prometheus_config, start_alertmanager, start_prometheus)
from support import needs, wait_for

pytestmark = pytest.mark.integration

# the committed thresholds, with windows and `for` shortened so the test takes a minute
FAST = {
    "rate_window": "20s", "coarse_window": "1m",
    "latency": {"for": "2s", "min_requests": 4},
    "error_rate": {"for": "2s", "min_requests": 10},
    "token_state": {"for": "2s"},
    "rate_limit": {"approaching_for": "0s", "refused_for": "0s", "refused_critical_for": "3s"},
}
RUNBOOK = "http://localhost:9464/runbooks"        # runbook_base_url of prometheus/thresholds.yml




@pytest.fixture(scope="module")
@needs("prometheus", "alertmanager")
def stack(tmp_path_factory):
    for name in ("prometheus", "promtool"):
        if not find_binary(name):
            pytest.fail(f"{name} is not installed: run .ci/install")
    if not find_binary("alertmanager", "prometheus-alertmanager"):
        pytest.fail("alertmanager is not installed: run .ci/install")
    tmp = tmp_path_factory.mktemp("e2e")
    keys_file = str(tmp / "keys.yml")
    raw = {k: add_key(keys_file, k, **spec) for k, spec in {
        "steady": {}, "flaky": {}, "slowpoke": {}, "limited": {"rate_limits": {"minute": 5}},
        "revoked": {}}.items()}
    entries = load_keys(keys_file)
    for e in entries:
        e.active = e.id != "revoked"
    save_keys(keys_file, entries)

    started = []
    api_port = free_port()
    api_server = make_server("127.0.0.1", api_port, create_demo_api(keys_file=keys_file), threaded=True)
    threading.Thread(target=api_server.serve_forever, daemon=True).start()
    webhook = WebhookSink().start()
    smtp = SmtpSink().start()
    slack_file = tmp / "slack_api_url"
    slack_file.write_text(webhook.url + "/slack\n")
    rules_dir = tmp / "rules"
    rulegen.write(thresholds.load_thresholds(os.path.join(ROOT, "prometheus", "thresholds.yml"), FAST),
                  str(rules_dir))
    try:
        am = start_alertmanager(str(tmp / "am"), alertmanager_config(
            f"127.0.0.1:{smtp.port}", webhook.url, str(slack_file),
            group_wait="1s", group_interval="2s", repeat_interval="1h"))
        started.append(am)
        am_addr = am.url.split("://")[1]
        prom = start_prometheus(str(tmp / "prom"), prometheus_config(
            {"api-token-exporter": [f"127.0.0.1:{api_port}"], "alertmanager": [am_addr]},
            am_addr, str(rules_dir), scrape_interval="1s", evaluation_interval="1s"))
        started.append(prom)

        base = f"http://127.0.0.1:{api_port}"
        stop = threading.Event()

        def get(path, key=None):
            headers = {"X-API-Key": key} if key else {}
            return requests.get(base + path, headers=headers, timeout=10)

        def background(path, key, period):
            while not stop.wait(period):
                get(path, key)

        state = {"recovering": threading.Event()}

        def flaky_recovery():
            state["recovering"].wait()
            background("/api/v1/flaky?fail=0", raw["flaky"], 0.2)

        threads = [threading.Thread(target=background, args=("/api/v1/items", raw["steady"], 1.0), daemon=True),
                   threading.Thread(target=flaky_recovery, daemon=True)]
        for t in threads:
            t.start()
        # rate() needs a sample before the increase: let Prometheus scrape a few times first
        wait_for("first scrapes", lambda: requests.get(prom.url + "/api/v1/query", timeout=5, params={
            "query": 'count_over_time(up{job="api-token-exporter"}[1m]) >= 3'}).json()["data"]["result"])

        def paced(count, period, action):
            for i in range(count):
                action(i)
                time.sleep(period)

        def slow_rounds():
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for _ in range(3):
                    list(pool.map(lambda _: get("/api/v1/slow?seconds=2.2", raw["slowpoke"]), range(4)))

        limited_codes = []
        # crossing thresholds, each spread over seconds: invalid keys, an error burst,
        # slow responses, 429s, a revoked key still in use
        scenarios = [
            lambda: paced(8, 0.5, lambda i: get("/api/v1/items", f"atk_invalid_{i}_xxxxxxxxxxxxxxxx")),
            lambda: paced(40, 0.2, lambda i: get("/api/v1/flaky?fail=1", raw["flaky"])),
            slow_rounds,
            lambda: paced(8, 1.0, lambda i: limited_codes.append(get("/api/v1/items", raw["limited"]).status_code)),
            lambda: paced(6, 1.0, lambda i: get("/api/v1/items", raw["revoked"])),
        ]
        with concurrent.futures.ThreadPoolExecutor(len(scenarios)) as pool:
            for future in [pool.submit(f) for f in scenarios]:
                future.result()
        assert limited_codes.count(429) == 3
        yield {"am": am, "prom": prom, "webhook": webhook, "smtp": smtp, "state": state, "raw": raw}
        stop.set()
        state["recovering"].set()
    finally:
        for service in reversed(started):
            service.stop()
        api_server.shutdown()
        webhook.stop()
        smtp.stop()


def firing(webhook, path="/alerts"):
    return {(a["labels"]["alertname"], a["labels"]["severity"], a["labels"].get("token"))
            for a in webhook.alerts(path) if a["status"] == "firing"}


EXPECTED_CRITICAL = {
    ("ApiTokenUnauthorizedAccess", "critical", None),
    ("ApiTokenHighErrorRate", "critical", "flaky"),
    ("ApiTokenHighLatency", "critical", "slowpoke"),
    ("ApiTokenRateLimited", "critical", "limited"),
}
EXPECTED_WARNING = {("ApiTokenInvalidStillUsed", "warning", "revoked")}


def test_every_alert_reaches_the_webhook_with_its_labels(stack):
    expected = EXPECTED_CRITICAL | EXPECTED_WARNING
    wait_for("alerts on the webhook", lambda: expected <= firing(stack["webhook"]))
    alert = next(a for a in stack["webhook"].alerts() if a["labels"]["alertname"] == "ApiTokenHighErrorRate"
                 and a["labels"]["severity"] == "critical")
    assert alert["labels"] == {"alertname": "ApiTokenHighErrorRate", "severity": "critical",
                               "token": "flaky", "monitor": "api-token-exporter"}
    assert alert["annotations"]["runbook_url"] == RUNBOOK + "#apitokenhigherrorrate"
    assert alert["annotations"]["threshold"] == "10%"
    assert "of the requests of token flaky failed with a 5xx status" in alert["annotations"]["description"]
    unauthorized = next(a for a in stack["webhook"].alerts() if a["labels"]["alertname"] == "ApiTokenUnauthorizedAccess")
    assert unauthorized["labels"]["client"] == "127.0.0.1"          # per client, counted exactly
    assert re.match(r"[678] requests from 127\.0\.0\.1 failed authentication", unauthorized["annotations"]["description"])
    limited = next(a for a in stack["webhook"].alerts() if a["labels"]["alertname"] == "ApiTokenRateLimited")
    assert limited["labels"]["window"] == "minute"
    # the API key itself never travels with an alert
    for raw in stack["raw"].values():
        assert raw not in str(stack["webhook"].received)


def test_watchdog_reaches_its_own_receiver(stack):
    wait_for("Watchdog", lambda: ("Watchdog", "none", None) in firing(stack["webhook"], "/watchdog"))
    assert ("Watchdog", "none", None) not in firing(stack["webhook"], "/alerts")


def test_critical_alerts_arrive_by_email_and_warnings_do_not(stack):
    smtp = stack["smtp"]

    def subjects():
        return [m["subject"] for m in smtp.summaries()]

    wait_for("critical emails", lambda: all(
        any(name in s and (token is None or f"token={token}" in s) for s in subjects())
        for name, _, token in EXPECTED_CRITICAL))
    mail = smtp.find(lambda m: "ApiTokenHighLatency" in str(m["Subject"]))[0]
    assert mail["subject"] == "[FIRING:1] ApiTokenHighLatency token=slowpoke (critical)"
    assert mail["to"] == "api-oncall@example.com"
    assert "Token: slowpoke" in mail["body"] and "Threshold: 2s" in mail["body"]
    assert f"Runbook: {RUNBOOK}#apitokenhighlatency" in mail["body"]
    assert "The p95 response time of token slowpoke over the last 20s is about" in mail["body"]
    assert "estimated from histogram buckets" in mail["body"]
    assert not [s for s in subjects() if "(warning)" in s]


def test_slack_gets_critical_and_warning_messages_a_person_can_act_on(stack):
    def attachments():
        return [a for p in stack["webhook"].posts("/slack") for a in p["body"].get("attachments", [])]

    def critical_429(post):          # the warning comes first; 3 s of 429s later, the critical
        att = post["body"]["attachments"][0]
        return "ApiTokenRateLimited" in att["title"] and att["color"] == "danger"
    wait_for("slack messages", lambda: any("ApiTokenInvalidStillUsed" in a["title"] for a in attachments())
             and any(critical_429(p) for p in stack["webhook"].posts("/slack")))
    post = next(p["body"] for p in stack["webhook"].posts("/slack") if critical_429(p))
    assert post["channel"] == "#api-alerts"
    att = post["attachments"][0]
    assert att["color"] == "danger"
    assert "token `limited`" in att["text"] and "window minute" in att["text"]
    assert f"<{RUNBOOK}#apitokenratelimited|runbook>" in att["text"]
    warning = next(a for a in attachments() if "ApiTokenInvalidStillUsed" in a["title"])
    assert warning["color"] == "warning" and "token `revoked`" in warning["text"]


def test_critical_inhibits_the_matching_warning(stack):
    am = stack["am"].url

    def suppressed():
        alerts = requests.get(am + "/api/v2/alerts", params={"inhibited": "true"}, timeout=5).json()
        return [a for a in alerts
                if a["labels"]["alertname"] in ("ApiTokenHighErrorRate", "ApiTokenHighLatency")
                and a["labels"]["severity"] == "warning" and a["status"]["state"] == "suppressed"
                and a["status"]["inhibitedBy"]]

    found = wait_for("a suppressed warning", suppressed)
    assert {a["labels"]["token"] for a in found} <= {"flaky", "slowpoke"}
    # rate-limit: the 429 critical inhibits "approaching" for the same token and window
    approaching = wait_for("approaching inhibited", lambda: [
        a for a in requests.get(am + "/api/v2/alerts", timeout=5).json()
        if a["labels"]["alertname"] == "ApiTokenRateLimitApproaching"
        and a["labels"].get("token") == "limited" and a["status"]["state"] == "suppressed"])
    assert approaching[0]["labels"]["window"] == "minute"


def test_resolved_notifications_follow_when_traffic_is_normal_again(stack):
    wait_for("error alert firing", lambda: ("ApiTokenHighErrorRate", "critical", "flaky") in firing(stack["webhook"]))
    stack["state"]["recovering"].set()      # flaky now succeeds; the burst leaves the 20 s window
    resolved = wait_for("resolved error alert", lambda: [
        a for a in stack["webhook"].alerts()
        if a["status"] == "resolved" and a["labels"]["alertname"] == "ApiTokenHighErrorRate"
        and a["labels"]["token"] == "flaky" and a["labels"]["severity"] == "critical"])
    assert resolved[0]["endsAt"] > resolved[0]["startsAt"]
    wait_for("resolved email", lambda: stack["smtp"].find(
        lambda m: str(m["Subject"]).startswith("[RESOLVED] ApiTokenHighErrorRate token=flaky")))


@needs("prometheus", "alertmanager")
def test_alertmanager_killed_fires_its_alert_on_the_real_binaries(tmp_path):
    """Prometheus watches the pipeline: kill Alertmanager and AlertmanagerUnreachable fires."""
    webhook = WebhookSink().start()
    slack_file = tmp_path / "slack_api_url"
    slack_file.write_text(webhook.url + "/slack\n")
    rules_dir = tmp_path / "rules"
    rulegen.write(thresholds.load_thresholds(os.path.join(ROOT, "prometheus", "thresholds.yml"),
                                          {"notifications": {"down_for": "2s", "failing_for": "2s"}}),
                  str(rules_dir))
    am = start_alertmanager(str(tmp_path / "am"), alertmanager_config(
        None, webhook.url, str(slack_file), group_wait="1s", group_interval="2s", repeat_interval="1h"))
    am_addr = am.url.split("://")[1]
    prom_port = free_port()
    prom = start_prometheus(str(tmp_path / "prom"), prometheus_config(
        {"alertmanager": [am_addr], "prometheus": [f"127.0.0.1:{prom_port}"]}, am_addr, str(rules_dir),
        scrape_interval="1s", evaluation_interval="1s"), port=prom_port)
    try:
        def firing(name):
            alerts = requests.get(prom.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]

        wait_for("Alertmanager scraped", lambda: requests.get(prom.url + "/api/v1/query", timeout=5, params={
            "query": 'up{job="alertmanager"} == 1'}).json()["data"]["result"])
        assert firing("AlertmanagerUnreachable") == []
        am.stop()                                          # killed
        alert = wait_for("AlertmanagerUnreachable to fire", lambda: firing("AlertmanagerUnreachable"))[0]
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook_url"] == RUNBOOK + "#alertmanagerunreachable"
    finally:
        prom.stop()
        am.stop()
        webhook.stop()
