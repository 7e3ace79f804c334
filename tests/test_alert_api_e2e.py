"""The alert API on the real binaries: Prometheus evaluating the rendered rules, Alertmanager
routing every notification to the exporter's webhook, the history in PostgreSQL (and SQLite),
acknowledgements as real silences, settings re-rendering the rules and reloading Prometheus."""
import os
import threading
import time

import pytest
import requests
import yaml
from werkzeug.serving import make_server

from api_token_exporter.mixin import rules as rulegen, thresholds
from api_token_exporter.alerting.client import fingerprint
from api_token_exporter.core.keystore import add_key
from api_token_exporter.web.server import create_app
from devstack.sinks import WebhookSink
from devstack.stack import (ROOT, alertmanager_config, find_binary, free_port, prometheus_config,
                                      start_alertmanager, start_prometheus)
from support import needs, wait_for

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer admin-secret"}
INGEST = {"Authorization": "Bearer ingest-secret"}
# seconds instead of minutes, so the test waits seconds
FAST = {"rate_window": "20s", "error_rate": {"for": "2s", "min_requests": 5},
        "latency": {"for": "2s", "min_requests": 5}}
P95 = f"p95_{FAST['rate_window']}"          # the recorded latency's name follows the window


class Exporter:
    """An exporter service on a fixed port, restartable (a new app on the same data)."""

    def __init__(self, settings):
        self.settings, self.port = settings, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = self.app = None

    def start(self):
        self.app = create_app(**self.settings)
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            alerts = self.app.endpoints.extensions.get("ate_alerts")
            if alerts is not None:
                alerts.stop()
            self.server = None

    def get(self, path, **params):
        return requests.get(self.url + path, params=params, headers=ADMIN, timeout=30)

    def send(self, token, status, duration_ms=20, n=20):
        event = {"token": token, "route": "/orders", "status": status, "duration_ms": duration_ms}
        r = requests.post(self.url + "/v1/events", json={"events": [event] * n}, headers=INGEST, timeout=10)
        assert r.status_code == 200, r.text


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.needs_postgres), "sqlite"])
@needs("prometheus", "alertmanager")
def stack(request, tmp_path):
    """Two exporters, as replicas would be: one takes the events Prometheus scrapes, one answers
    the alert API and receives the notifications (so it can be away while alerts happen)."""
    for binary in ("prometheus", "promtool"):
        if not find_binary(binary):
            pytest.fail(f"{binary} is not installed: run .ci/install")
    if not find_binary("alertmanager", "prometheus-alertmanager"):
        pytest.fail("alertmanager is not installed: run .ci/install")
    keys_file = str(tmp_path / "keys.yml")
    for token, name in (("shop", "Shop checkout"), ("blog", "Blog"), ("api", "Public API")):
        add_key(keys_file, token, name=name, tenant="acme")
    thresholds_file = tmp_path / "thresholds.yml"
    thresholds_file.write_text(yaml.safe_dump(thresholds.load_thresholds(
        os.path.join(ROOT, "prometheus", "thresholds.yml"), FAST), sort_keys=False))
    rules_dir = tmp_path / "rules"
    rulegen.write(thresholds.load_thresholds(str(thresholds_file)), str(rules_dir))
    token_file = tmp_path / "alert_webhook_token"
    token_file.write_text("webhook-secret\n")
    started, exporters = [], []
    webhook = WebhookSink().start()
    try:
        db_url = request.getfixturevalue("new_database") if request.param == "postgresql" else None
        prom_port, am_port = free_port(), free_port()
        events = Exporter(dict(keys_file=keys_file, ingest_token="ingest-secret")).start()
        exporters.append(events)
        alerts = Exporter(dict(
            keys_file=keys_file, admin_token="admin-secret",
            alertmanager_url=f"http://127.0.0.1:{am_port}", prometheus_url=f"http://127.0.0.1:{prom_port}",
            alert_webhook_token="webhook-secret", alert_db_url=db_url, state_dir=str(tmp_path / "state"),
            alert_sync_interval=2, alert_rules_dir=str(rules_dir), thresholds_file=str(thresholds_file),
            alertmanager_config_file=str(tmp_path / "am" / "alertmanager.yml"), admin_rate_limit=100000))
        exporters.append(alerts)
        slack = tmp_path / "slack_api_url"
        slack.write_text(webhook.url + "/slack\n")
        am = start_alertmanager(str(tmp_path / "am"), alertmanager_config(
            None, webhook.url, str(slack), group_wait="1s", group_interval="2s", repeat_interval="1h",
            history_url=alerts.url, history_token_file=str(token_file)), port=am_port)
        started.append(am)
        alerts.start()
        prom = start_prometheus(str(tmp_path / "prom"), prometheus_config(
            {"api-token-exporter": [f"127.0.0.1:{events.port}"]}, f"127.0.0.1:{am_port}", str(rules_dir),
            scrape_interval="1s", evaluation_interval="1s"), port=prom_port)
        started.append(prom)
        yield {"events": events, "alerts": alerts, "am": am.url, "prom": prom.url, "webhook": webhook,
               "rules": rules_dir, "am_file": tmp_path / "am" / "alertmanager.yml"}
    finally:
        for exporter in exporters:
            exporter.stop()
        for service in reversed(started):
            service.stop()
        webhook.stop()


def held_by_alertmanager(am, **labels):
    return [a for a in requests.get(am + "/api/v2/alerts", timeout=10).json()
            if all(a["labels"].get(k) == v for k, v in labels.items())]


def listed(exporter, **filters):
    r = exporter.get("/api/v1/alerts", **filters)
    assert r.status_code == 200, r.text
    return r.json()["alerts"]


def history(exporter, **filters):
    r = exporter.get("/api/v1/alerts/history", **filters)
    assert r.status_code == 200, r.text
    return r.json()


def test_fire_list_acknowledge_resolve_and_remember(stack):
    exporter, events, am = stack["alerts"], stack["events"], stack["am"]
    stop = threading.Event()

    def errors():
        while not stop.wait(1.0):
            events.send("shop", 500)
    thread = threading.Thread(target=errors, daemon=True)
    thread.start()
    try:
        # fires, and is listed with its context
        alert = wait_for("the error alert listed", lambda: [
            a for a in listed(exporter, type="ApiTokenHighErrorRate", severity="critical")], timeout=120)[0]
        assert alert["state"] == "firing" and alert["token"] == {"id": "shop", "name": "Shop checkout",
                                                                 "tenant": "acme"}
        assert alert["value"] == 1.0 and alert["summary"] and alert["runbook"].endswith("#apitokenhigherrorrate")
        held = held_by_alertmanager(am, alertname="ApiTokenHighErrorRate", severity="critical")
        assert alert["id"] == held[0]["fingerprint"] == fingerprint(held[0]["labels"])
        assert listed(exporter, token="blog") == [] and listed(exporter, state="silenced") == []
        # Alertmanager's notification reaches the history webhook
        wait_for("the firing notification stored", lambda: [
            a for a in history(exporter, token="shop")["alerts"] if a["id"] == alert["id"] and a["notified"]],
            timeout=30)

        # refusals: no admin token, an unknown id, a bad duration, a bad verdict
        assert requests.get(exporter.url + "/api/v1/alerts", timeout=10).status_code == 401
        for path, body, status in (("/api/v1/alerts/0123456789abcdef/acknowledge", {}, 404),
                                   ("/api/v1/alerts/not-an-id/acknowledge", {}, 404),
                                   (f"/api/v1/alerts/{alert['id']}/acknowledge", {"duration": "forever"}, 400),
                                   (f"/api/v1/alerts/{alert['id']}/feedback", {"verdict": "meh"}, 400)):
            r = requests.post(exporter.url + path, json=body, headers=ADMIN, timeout=10)
            assert r.status_code == status and r.json()["detail"], (path, r.text)

        # acknowledged: a real silence with exact matchers, by the admin
        r = requests.post(f"{exporter.url}/api/v1/alerts/{alert['id']}/acknowledge", headers=ADMIN,
                          json={"comment": "rolling back", "duration": "1h", "by": "ana"}, timeout=30)
        assert r.status_code == 201, r.text
        silence_id = r.json()["silence_id"]
        silence = requests.get(f"{am}/api/v2/silence/{silence_id}", timeout=10).json()
        assert silence["createdBy"] == "admin (ana)" and silence["comment"] == "rolling back"
        assert {m["name"]: m["value"] for m in silence["matchers"]} == held[0]["labels"]
        assert all(m["isEqual"] and not m["isRegex"] for m in silence["matchers"])
        acked = wait_for("acknowledged", lambda: listed(exporter, state="acknowledged"), timeout=30)
        assert acked[0]["id"] == alert["id"] and acked[0]["acknowledgement"]["by"] == "admin (ana)"

        # the exporter restarts in the middle: nothing is lost
        exporter.stop()
        exporter.start()
        assert listed(exporter, state="acknowledged")[0]["id"] == alert["id"]

        # un-acknowledged: the silence expires and the alert is firing again; then acknowledged anew
        r = requests.delete(f"{exporter.url}/api/v1/alerts/{alert['id']}/acknowledge", headers=ADMIN, timeout=30)
        assert r.status_code == 200 and r.json()["expired"] is True, r.text
        assert requests.get(f"{am}/api/v2/silence/{silence_id}", timeout=10).json()["status"]["state"] == "expired"
        wait_for("firing again", lambda: [a for a in listed(exporter, state="firing") if a["id"] == alert["id"]],
                 timeout=30)
        r = requests.post(f"{exporter.url}/api/v1/alerts/{alert['id']}/acknowledge", headers=ADMIN,
                          json={"comment": "rolling back", "duration": "1h", "by": "ana"}, timeout=30)
        assert r.status_code == 201, r.text
        silence_id = r.json()["silence_id"]
    finally:
        stop.set()
        thread.join(timeout=10)

    # healthy traffic again: the alert resolves (silenced: no notification reaches the webhook)
    # and its silence is expired
    for _ in range(90):
        events.send("shop", 200)
        time.sleep(1)
        if not listed(exporter, type="ApiTokenHighErrorRate"):
            break
    episode = wait_for("the resolved episode", lambda: [
        a for a in history(exporter, token="shop", type="ApiTokenHighErrorRate", severity="critical")["alerts"]
        if a["status"] == "resolved" and not a["acknowledgement"]["active"]], timeout=60)[0]
    assert wait_for("the silence expired", lambda: requests.get(
        f"{am}/api/v2/silence/{silence_id}", timeout=10).json()["status"]["state"] == "expired", timeout=30)
    assert episode["id"] == alert["id"] and episode["notified"] is True
    assert episode["token"]["name"] == "Shop checkout" and episode["duration_seconds"] > 5
    assert episode["acknowledgement"]["by"] == "admin (ana)" and episode["acknowledgement"]["comment"] == "rolling back"
    kinds = [e["kind"] for e in episode["events"]]
    assert kinds[:4] == ["fired", "acknowledged", "unacknowledged", "acknowledged"]
    assert kinds[4:] == ["resolved", "unacknowledged"], kinds

    # the same notification delivered twice (and once more with a bad token) is stored once
    total = history(exporter)["total"]
    note = {"version": "4", "status": "resolved", "alerts": [{
        "status": "resolved", "labels": episode["labels"], "annotations": {},
        "startsAt": episode["starts_at"], "endsAt": episode["ends_at"], "fingerprint": episode["id"]}]}
    for _ in range(2):
        r = requests.post(exporter.url + "/api/v1/alerts/webhook", json=note, timeout=10,
                          headers={"Authorization": "Bearer webhook-secret"})
        assert r.status_code == 200 and r.json()["stored"] == 1
    assert requests.post(exporter.url + "/api/v1/alerts/webhook", json=note, timeout=10,
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert history(exporter)["total"] == total

    # feedback: stored with the episode, counted by alert name and verdict
    r = requests.post(f"{exporter.url}/api/v1/alerts/{alert['id']}/feedback", headers=ADMIN,
                      json={"verdict": "true_positive", "note": "bad deploy"}, timeout=30)
    assert r.status_code == 201, r.text
    assert history(exporter, token="shop", type="ApiTokenHighErrorRate", severity="critical")[
        "alerts"][0]["feedback"]["verdict"] == "true_positive"
    metrics = requests.get(exporter.url + "/metrics", timeout=10).text
    assert 'apitoken_alert_feedback_total{alertname="ApiTokenHighErrorRate",verdict="true_positive"} 1' in metrics

    # CSV, paged
    csv_text = requests.get(exporter.url + "/api/v1/alerts/history", headers=ADMIN, timeout=10,
                            params={"format": "csv", "token": "shop"}).text
    assert csv_text.splitlines()[0].startswith("id,type,severity,status,token,token_name")
    assert f"{alert['id']},ApiTokenHighErrorRate,critical,resolved,shop,Shop checkout" in csv_text


def fire_and_resolve(events, am, token):
    """Errors until Alertmanager holds the token's error alert, then healthy traffic until it
    no longer does."""
    wait_for(f"{token}'s error alert", lambda: events.send(token, 500) or held_by_alertmanager(
        am, alertname="ApiTokenHighErrorRate", token=token), timeout=120, interval=1.0)
    wait_for(f"{token}'s alert resolved", lambda: events.send(token, 200) or not held_by_alertmanager(
        am, alertname="ApiTokenHighErrorRate", token=token), timeout=150, interval=1.0)


def test_silenced_alerts_and_alerts_while_the_exporter_was_away_are_in_history(stack):
    exporter, events, am = stack["alerts"], stack["events"], stack["am"]
    # a silence made in Alertmanager by someone else before the alert fires: no notification
    # reaches any webhook, the history has it all the same
    now = time.time()
    requests.post(am + "/api/v2/silences", timeout=10, json={
        "matchers": [{"name": "token", "value": "blog", "isRegex": False, "isEqual": True}],
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 5)),
        "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600)),
        "createdBy": "ops", "comment": "maintenance"}).raise_for_status()
    silenced = wait_for("blog's silenced alert listed", lambda: events.send("blog", 500) or [
        a for a in listed(exporter, token="blog", state="silenced") if a["type"] == "ApiTokenHighErrorRate"],
        timeout=120, interval=1.0)
    assert silenced[0]["silenced_by"] and silenced[0]["token"]["name"] == "Blog"
    found = wait_for("the silenced alert in history", lambda: [
        a for a in history(exporter, token="blog")["alerts"] if a["type"] == "ApiTokenHighErrorRate"], timeout=30)
    assert all(a["notified"] is False and a["found_in"] == "alertmanager" for a in found)

    # the alert API's exporter away while another token's alert fires and resolves: filled
    # from Prometheus's ALERTS when it is back. Silenced in Alertmanager, so that nothing is
    # notified then (a failed notification is retried and may reach the exporter once it is back,
    # before or after the filling: either way the episode is in history once)
    silence = requests.post(am + "/api/v2/silences", timeout=10, json={
        "matchers": [{"name": "token", "value": "api", "isRegex": False, "isEqual": True}],
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5)),
        "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
        "createdBy": "ops", "comment": "exporter away"})
    silence.raise_for_status()
    exporter.stop()
    fire_and_resolve(events, am, "api")
    assert not held_by_alertmanager(am, token="api")
    exporter.start()
    try:
        gap = wait_for("the missed episodes", lambda: [
            a for a in history(exporter, token="api")["alerts"] if a["type"] == "ApiTokenHighErrorRate"
            and a["status"] == "resolved"] if len({a["severity"] for a in history(exporter, token="api")["alerts"]
                                                   if a["status"] == "resolved"}) == 2 else None, timeout=60)
    finally:
        requests.delete(f"{am}/api/v2/silence/{silence.json()['silenceID']}", timeout=10)
    described = [{k: a[k] for k in ("severity", "status", "found_in", "notified", "starts_at", "ends_at")} for a in gap]
    assert sorted(a["severity"] for a in gap) == ["critical", "warning"], described
    assert all(a["found_in"] == "prometheus" and not a["notified"] for a in gap), described
    assert all(5 < a["duration_seconds"] < 200 for a in gap)
    assert not [a for a in stack["webhook"].alerts() if a["labels"].get("token") == "blog"]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_settings_change_takes_effect_and_a_bad_one_changes_nothing(stack):
    exporter, events, am, prom = stack["alerts"], stack["events"], stack["am"], stack["prom"]
    rules = {p.name: p.read_bytes() for p in stack["rules"].glob("*.yml")}

    def put(body):
        return requests.put(exporter.url + "/api/v1/alerts/settings", json=body, headers=ADMIN, timeout=60)

    def latency_alerts():
        return held_by_alertmanager(am, alertname="ApiTokenHighLatency", token="shop")
    # 300 ms answers: under the 1 s threshold
    wait_for("a p95 for shop", lambda: events.send("shop", 200, duration_ms=300) or requests.get(
        prom + "/api/v1/query", params={"query": f'token:apitoken_request_duration_seconds:{P95}{{token="shop"}}'},
        timeout=10).json()["data"]["result"], timeout=90, interval=1.0)
    for _ in range(5):
        events.send("shop", 200, duration_ms=300)
        time.sleep(1)
    assert latency_alerts() == []
    before = exporter.get("/api/v1/alerts/settings").json()
    assert before["alert_thresholds"]["response_time"] == {"warning": 1.0, "critical": 2.0}
    assert before["channels"] == {"critical": ["slack", "webhook"], "warning": ["slack", "webhook"]}

    for body, field in (({"alert_thresholds": {"response_time": {"warning": "fast"}}},
                         "alert_thresholds.response_time.warning must be a number"),
                        ({"alert_thresholds": {"response_time": {"warning": 2.2}}},
                         "alert_thresholds.response_time.warning must be below alert_thresholds.response_time.critical"),
                        ({"alert_thresholds": {"response_time": {"critical": 5}}},
                         "alert_thresholds.response_time.critical must be below 2.5 (the last bound of the per-token"),
                        ({"alert_thresholds": {"latency": 1}}, "alert_thresholds.latency is not a setting"),
                        ({"anomaly": {"sensitivity": "paranoid"}}, "anomaly.sensitivity must be one of"),
                        ({"channels": {"warning": ["pager"]}}, "channels.warning must be a list of"),
                        ({"channels": {"critical": ["email"]}}, "channels.critical: email is not configured"),
                        ({"recipients": {"email": ["not an address"]}}, "recipients.email")):
        r = put(body)
        assert r.status_code == 400 and field in r.json()["detail"], (body, r.text)
    assert {p.name: p.read_bytes() for p in stack["rules"].glob("*.yml")} == rules
    assert exporter.get("/api/v1/alerts/settings").json() == before

    r = put({"alert_thresholds": {"response_time": {"warning": 0.2, "critical": 2.4}},
             "anomaly": {"sensitivity": "high"}, "channels": {"warning": ["webhook"]}, "by": "ana"})
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["alert_thresholds"]["response_time"] == {"warning": 0.2, "critical": 2.4}
    assert after["anomaly"]["sensitivity"] == "high" and after["updated_by"] == "admin (ana)"
    assert after["channels"]["warning"] == ["webhook"]
    assert f"token:apitoken_request_duration_seconds:{P95} > 0.2" in (
        stack["rules"] / "apitoken-alerts.yml").read_text()
    # Prometheus reloaded: the new rule is the one evaluated, and it fires where the old did not
    queries = [r["query"] for g in requests.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
               for r in g["rules"] if r["name"] == "ApiTokenHighLatency"]
    assert any("> 0.2" in q for q in queries) and not any("> 1\n" in q for q in queries)
    fired = wait_for("the latency alert at the new threshold", lambda: events.send(
        "shop", 200, duration_ms=300) or latency_alerts(), timeout=90, interval=1.0)
    assert fired[0]["labels"]["severity"] == "warning"
    # Alertmanager reloaded with the warning receiver's new channels
    am_config = yaml.safe_load(requests.get(am + "/api/v2/status", timeout=10).json()["config"]["original"])
    warning = next(r for r in am_config["receivers"] if r["name"] == "warning")
    assert "slack_configs" not in warning and warning["webhook_configs"]

    # persisted: a restarted exporter answers the same, and finds the files in force
    exporter.stop()
    exporter.start()
    again = exporter.get("/api/v1/alerts/settings").json()
    assert again["alert_thresholds"] == after["alert_thresholds"] and again["updated_by"] == "admin (ana)"


@needs("prometheus", "alertmanager", "server")
def test_several_gunicorn_workers_keep_one_history(tmp_path):
    """`serve --workers 3 --threads 4` on one SQLite history, each worker with its own sync
    thread: the same episodes come from Alertmanager, ALERTS and a webhook posted 40 times at
    once, and each is stored once, with no error."""
    for binary in ("prometheus", "promtool"):
        if not find_binary(binary):
            pytest.fail(f"{binary} is not installed: run .ci/install")
    if not find_binary("alertmanager", "prometheus-alertmanager"):
        pytest.fail("alertmanager is not installed: run .ci/install")
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from support import stop_process, wait_for_port
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "shop", name="Shop checkout", tenant="acme")
    thresholds_file = tmp_path / "thresholds.yml"
    thresholds_file.write_text(yaml.safe_dump(thresholds.load_thresholds(
        os.path.join(ROOT, "prometheus", "thresholds.yml"), FAST), sort_keys=False))
    rules_dir = tmp_path / "rules"
    rulegen.write(thresholds.load_thresholds(str(thresholds_file)), str(rules_dir))
    token_file = tmp_path / "token"
    token_file.write_text("webhook-secret")
    port, prom_port, am_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    started, proc = [], None
    webhook = WebhookSink().start()
    events = Exporter(dict(keys_file=keys_file, ingest_token="ingest-secret")).start()
    log_path = tmp_path / "serve.log"
    try:
        slack = tmp_path / "slack"
        slack.write_text(webhook.url + "/slack\n")
        started.append(start_alertmanager(str(tmp_path / "am"), alertmanager_config(
            None, webhook.url, str(slack), group_wait="1s", group_interval="2s", repeat_interval="1h",
            history_url=url, history_token_file=str(token_file)), port=am_port))
        env = dict(os.environ, ATE_KEYS_FILE=keys_file, ATE_ADMIN_TOKEN="admin-secret",
                   ATE_ALERTMANAGER_URL=f"http://127.0.0.1:{am_port}", ATE_PROMETHEUS_URL=f"http://127.0.0.1:{prom_port}",
                   ATE_ALERT_WEBHOOK_TOKEN_FILE=str(token_file), ATE_STATE_DIR=str(tmp_path / "state"),
                   ATE_ALERT_SYNC_INTERVAL="1", ATE_THRESHOLDS_FILE=str(thresholds_file), ATE_ADMIN_RATE_LIMIT="100000")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--port", str(port),
                                     "--workers", "3", "--threads", "4"], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, proc, timeout=60)
        started.append(start_prometheus(str(tmp_path / "prom"), prometheus_config(
            {"api-token-exporter": [f"127.0.0.1:{events.port}"]}, f"127.0.0.1:{am_port}", str(rules_dir),
            scrape_interval="1s", evaluation_interval="1s"), port=prom_port))

        def stored():
            r = requests.get(url + "/api/v1/alerts/history", headers=ADMIN, timeout=30, params={"token": "shop"})
            assert r.status_code == 200, r.text
            return r.json()["alerts"]
        wait_for("both error alerts in history", lambda: events.send("shop", 500) or len(
            {a["severity"] for a in stored() if a["type"] == "ApiTokenHighErrorRate"}) == 2, timeout=120, interval=1.0)
        held = held_by_alertmanager(f"http://127.0.0.1:{am_port}", alertname="ApiTokenHighErrorRate")
        note = {"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": a["labels"], "annotations": a["annotations"], "startsAt": a["startsAt"],
             "endsAt": "0001-01-01T00:00:00Z", "fingerprint": a["fingerprint"]} for a in held]}

        def post(_):
            return requests.post(url + "/api/v1/alerts/webhook", json=note, timeout=30,
                                 headers={"Authorization": "Bearer webhook-secret"}).status_code
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(40)))
        assert codes == [200] * 40
        for _ in range(5):                      # several syncs of every worker meanwhile
            events.send("shop", 500)
            time.sleep(1)
        episodes = [(a["id"], a["starts_at"]) for a in stored()]
        assert len(episodes) == len(set(a["id"] for a in stored())) == len(held) >= 2, episodes
        assert all(a["notified"] for a in stored())
    except Exception as exc:                 # what the server said is the first thing to read
        raise AssertionError(f"{exc}\n--- serve log ---\n{log_path.read_text()[-3000:]}") from exc
    finally:
        if proc is not None:
            stop_process(proc)
        for service in reversed(started):
            service.stop()
        events.stop()
        webhook.stop()
    log_text = log_path.read_text()
    assert "Traceback" not in log_text and "locked" not in log_text, log_text[-3000:]
