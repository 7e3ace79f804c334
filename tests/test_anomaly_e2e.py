"""Anomaly detection end to end on the real binaries: two days of a token's history written as
TSDB blocks (the learning period already behind it), the recording and anomaly rules backfilled
over them with promtool, then live traffic ten times the usual through the exporter's ingest
endpoint: the alert reaches the webhook sink with its context."""
import os
import re
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

from api_token_exporter.analytics.rule_backfill import backfill_rules
from api_token_exporter.mixin import anomaly_rules, rules as rulegen, thresholds
from api_token_exporter.analytics.importer import Aggregate, ImportResult, build_blocks
from api_token_exporter.core.keystore import add_key
from api_token_exporter.web.server import create_app
from devstack.sinks import WebhookSink
from devstack.stack import (ROOT, alertmanager_config, find_binary, free_port, prometheus_config,
                                      start_alertmanager, start_prometheus)
from support import needs, wait_for

pytestmark = pytest.mark.integration
# minutes instead of the defaults' quarter hours, so the test waits seconds
FAST = {"rate_window": "2m",              # four samples of the 30 s history in every window
        "anomaly": {"interval": "30s", "for": "20s", "keep_firing_for": "0s"}}
THRESHOLDS = thresholds.load_thresholds(os.path.join(ROOT, "prometheus", "thresholds.yml"), FAST)
USUAL = 2.0                      # requests per second in the history
DAYS = 2




@pytest.fixture
@needs("prometheus", "alertmanager")
def stack(tmp_path):
    for binary in ("prometheus", "promtool"):
        if not find_binary(binary):
            pytest.fail(f"{binary} is not installed: run .ci/install")
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "shop", name="Shop checkout", tenant="acme")
    rules_dir = tmp_path / "rules"
    rulegen.write(THRESHOLDS, str(rules_dir))

    # two days at USUAL req/s, ending two minutes ago
    end = time.time() - 120
    start = end - DAYS * 86400
    agg = Aggregate(30, None)
    for b in range(int(start // 30), int(end // 30)):
        agg.add_requests(b, "shop", "/orders", "GET", 200, int(USUAL * 30))
    agg.first, agg.last = start, end
    data = tmp_path / "prom" / "data"
    build_blocks(ImportResult(first=start, last=end), agg, str(data), "api-token-exporter", "backfill")

    started, servers = [], []
    try:
        webhook = WebhookSink().start()
        slack = tmp_path / "slack_api_url"
        slack.write_text(webhook.url + "/slack\n")
        am = start_alertmanager(str(tmp_path / "am"), alertmanager_config(
            None, webhook.url, str(slack), group_wait="1s", group_interval="2s", repeat_interval="1h"))
        started.append(am)
        am_addr = am.url.split("://")[1]
        exporter = create_app(keys_file=keys_file, ingest_token="ingest-secret")
        port = free_port()
        server = make_server("127.0.0.1", port, exporter, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        prom_port = free_port()
        config = prometheus_config({"api-token-exporter": [f"127.0.0.1:{port}"]}, am_addr, str(rules_dir),
                                   scrape_interval="1s", evaluation_interval="1s")
        prom = {"service": start_prometheus(str(tmp_path / "prom"), config, port=prom_port, retention="30d",
                                            timeout=120)}
        started.append(prom["service"])

        def restart():
            prom["service"].stop()
            started.remove(prom["service"])
            prom["service"] = start_prometheus(str(tmp_path / "prom"), config, port=prom_port, retention="30d",
                                               timeout=120)
            started.append(prom["service"])

        backfill_rules(prom["service"].url, [str(rules_dir / "apitoken-recording.yml"),
                                             str(rules_dir / "apitoken-anomalies.yml")],
                       start, end, str(data), reload=restart)
        yield {"prom": prom, "webhook": webhook, "exporter": f"http://127.0.0.1:{port}"}
    finally:
        for service in reversed(started):
            service.stop()
        for server in servers:
            server.shutdown()
        webhook.stop()


def test_a_traffic_spike_reaches_the_webhook_with_its_context(stack):
    prom = stack["prom"]["service"].url

    def query(expr):
        return requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()["data"]["result"]
    # learned from the backfilled history: a baseline a learning period ago, a band around USUAL
    shop = anomaly_rules.Exprs(THRESHOLDS, "shop")
    wait_for("the learned band", lambda: query(shop.learned()) and query(shop.upper("requests")),
             timeout=180, interval=1.0)
    wait_for("a band around the usual rate", lambda: USUAL * 0.9 <= float(
        query(shop.upper("requests"))[0]["value"][1]) <= USUAL * 1.5, timeout=60, interval=1.0)

    stop = threading.Event()

    def spike():                      # ten times the usual rate, through the ingest endpoint
        event = {"token": "shop", "route": "/orders", "status": 200, "duration_ms": 20}
        while not stop.wait(1.0):
            requests.post(stack["exporter"] + "/v1/events", json={"events": [event] * int(USUAL * 10)},
                          headers={"Authorization": "Bearer ingest-secret"}, timeout=10)
    thread = threading.Thread(target=spike, daemon=True)
    thread.start()
    try:
        alerts = wait_for("the anomaly on the webhook", lambda: [
            a for a in stack["webhook"].alerts() if a["labels"]["alertname"] == "ApiTokenTrafficAnomaly"
            and a["status"] == "firing"], timeout=180, interval=1.0)
    finally:
        stop.set()
        thread.join(timeout=10)
    alert = alerts[0]
    assert alert["labels"] == {"alertname": "ApiTokenTrafficAnomaly", "severity": "warning", "token": "shop",
                               "anomaly": "traffic", "direction": "up", "monitor": "api-token-exporter"}
    text = alert["annotations"]["description"]
    assert text.startswith("Token shop (Shop checkout, tenant acme): request rate ")
    # a flat history: the band is about its level (MAD near 0), and the minimum change (50 %) guards it
    assert re.search(r"over the last 2m, above its own band \(expected about 2, band [0-9.]+ to [0-9.]+ "
                     r"req/s; sensitivity 4 MADs\)\.$", text), text
    assert alert["annotations"]["dashboard"] == "http://localhost:3000/d/ate-token?var-token=shop"
    assert alert["annotations"]["runbook_url"].endswith("#apitokentrafficanomaly")
    # a spike on its usual route is not a new route (the mix may move while the history's series
    # leaves the rate window at the cut-over)
    assert "ApiTokenNewRoute" not in {a["labels"]["alertname"] for a in stack["webhook"].alerts()}
