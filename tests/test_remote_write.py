"""A global view through remote_write, on the real binaries: two zone Prometheus servers (the
committed prometheus/zones/zone-*.yml) each scrape one replica and write to a receiver
(prometheus/zones/global.yml, --web.enable-remote-write-receiver) that evaluates the recording
rules; the analytics API and `report` pointed at the receiver give the exact total of both."""
import csv
import io
import os
import subprocess
import sys
import threading

import pytest
import requests
import yaml
from werkzeug.serving import make_server

from api_token_exporter.core.keystore import add_key
from api_token_exporter.web.server import create_app
from devstack.stack import ROOT, find_binary, free_port, start_prometheus
from support import needs, wait_for

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer admin-secret"}
INGEST = {"Authorization": "Bearer ingest-secret"}
ZONES = os.path.join(ROOT, "prometheus", "zones")


def load(name):
    with open(os.path.join(ZONES, name)) as fh:
        return yaml.safe_load(fh)


def serve(app):
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


@needs("prometheus")
def test_two_zones_written_to_one_store_add_up_exactly(tmp_path):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    keys_file = str(tmp_path / "keys.yml")
    for token in ("shop", "blog"):
        add_key(keys_file, token, name=token.title(), tenant="acme")
    servers, services = [], []
    try:
        replicas = []
        for _ in range(2):
            server, url = serve(create_app(keys_file=keys_file, ingest_token="ingest-secret"))
            servers.append(server)
            replicas.append(url)
        # the global store: the committed file, its rules path made absolute
        global_cfg = load("global.yml")
        global_cfg["rule_files"] = [os.path.join(ROOT, "prometheus", "rules", "apitoken-recording.yml")]
        global_cfg["global"]["evaluation_interval"] = "1s"
        receiver = start_prometheus(str(tmp_path / "global"), global_cfg, flags=["--web.enable-remote-write-receiver"])
        services.append(receiver)
        for zone, replica in zip(("a", "b"), replicas):
            cfg = load(f"zone-{zone}.yml")
            assert cfg["global"]["external_labels"] == {"zone": zone}
            cfg["global"]["scrape_interval"] = "1s"
            cfg["scrape_configs"][0]["static_configs"] = [{"targets": [replica.split("://")[1]]}]
            cfg["remote_write"][0]["url"] = receiver.url + "/api/v1/write"
            cfg["remote_write"][0]["queue_config"]["batch_send_deadline"] = "1s"
            services.append(start_prometheus(str(tmp_path / f"zone-{zone}"), cfg))

        def query(expr):
            result = requests.get(receiver.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
            return result["data"]["result"]
        wait_for("both zones' first samples in the store", lambda: len(query('up{job="api-token-exporter"}')) == 2,
                 timeout=90)

        # requests and LLM usage through both replicas
        sent = {"shop": 0, "blog": 0}
        tokens = 0
        for i, replica in enumerate(replicas):
            for token, n in (("shop", 120 + i * 37), ("blog", 45 + i * 11)):
                event = {"token": token, "route": "/chat", "status": 200, "duration_ms": 30,
                         "llm": {"service": "openai", "model": "gpt-4o-mini", "input_tokens": 100,
                                 "output_tokens": 20 + i}}
                r = requests.post(replica + "/v1/events", json={"events": [event] * n}, headers=INGEST, timeout=10)
                assert r.json()["accepted"] == n
                sent[token] += n
                tokens += n * (120 + i)
        # the store holds each zone's series apart, and their sum is every request sent
        wait_for("every request in the store", lambda: all(
            float((query(f'sum(apitoken_requests_total{{token="{t}"}})') or [{"value": [0, "0"]}])[0]["value"][1]) == n
            for t, n in sent.items()), timeout=90)
        zones = {s["metric"]["zone"] for s in query('apitoken_requests_total{token="shop"}')}
        assert zones == {"a", "b"}
        # the recording rules are evaluated on the global store, over both zones
        wait_for("recording rules in the store", lambda: query('token:apitoken_requests:rate5m{token="shop"}'),
                 timeout=60)

        # the analytics API and the report, pointed at the store: exact totals of both zones
        server, analytics = serve(create_app(keys_file=keys_file, admin_token="admin-secret",
                                             prometheus_url=receiver.url, analytics_cache_seconds=0))
        servers.append(server)

        def usage():
            return requests.get(analytics + "/api/analytics/usage", headers=ADMIN, timeout=60).json()
        doc = wait_for("exact totals from the store", lambda: (lambda d: d if d["summary"]["today"]["requests"]
                                                                == sum(sent.values()) else None)(usage()), timeout=60)
        assert doc["summary"]["today"]["tokens"] == tokens
        report = subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "report", "--days", "1", "--format",
                                 "csv", "--prometheus-url", receiver.url], capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        total = list(csv.DictReader(io.StringIO(report.stdout)))[-1]
        assert total["service"] == "TOTAL" and int(total["total_tokens"]) == tokens, report.stdout
    finally:
        for service in reversed(services):
            service.stop()
        for server in servers:
            server.shutdown()
