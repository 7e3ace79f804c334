"""The demo as a user meets it: the CLI command, seed 002's Python client, promtool."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests

from devstack.demo import UNPRICED_MODEL
from api_token_exporter.core.metrics import TOKEN_STATUS_VALUES
from support import free_port, needs, require_binary, sample_total, samples, stop_process, wait_for_port

pytestmark = pytest.mark.integration


class APIClient:
    """Seed 002's Python client, unchanged but for base_url."""

    def __init__(self, api_key, base_url):
        self.api_key = api_key
        self.base_url = base_url
        self.session = requests.Session()
        self.session.headers.update({"X-API-Key": api_key})
        self.warnings = []
        self.last_headers = None

    def make_request(self, endpoint, method="GET", **kwargs):
        response = self.session.request(method, f"{self.base_url}{endpoint}", **kwargs)
        self._check_rate_limits(response.headers)
        self.last_headers = response.headers
        return response.json()

    def _check_rate_limits(self, headers):
        for period in ["minute", "hour", "day"]:
            remaining = int(headers.get(f"X-RateLimit-{period.capitalize()}-Remaining", 0))
            if remaining < 10:
                self.warnings.append(f"Warning: Low {period} rate limit remaining: {remaining}")


@pytest.fixture(scope="module")
@needs("prometheus", "alertmanager", "server")
def demo(tmp_path_factory):
    # no history: at --speed 4 the live traffic is four times the history's, a spike by definition
    data_dir = tmp_path_factory.mktemp("demo")
    port, exporter_port, prom_port, am_port, sink_port, proxy_port = (free_port() for _ in range(6))
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack", "demo", "--port", str(port),
         "--exporter-port", str(exporter_port), "--data-dir", str(data_dir), "--duration", "300", "--no-backfill",
         "--speed", "4", "--prometheus-port", str(prom_port), "--alertmanager-port", str(am_port),
         "--sink-port", str(sink_port), "--scrape-interval", "1s", "--proxy-port", str(proxy_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("traffic"):
                break
        wait_for_port(port, proc)
        key = re.search(r"X-API-Key: (\S+)'", "".join(lines)).group(1)
        yield {"url": f"http://127.0.0.1:{port}", "exporter": f"http://127.0.0.1:{exporter_port}",
               "key": key, "data_dir": data_dir, "output": "".join(lines),
               "prometheus": f"http://127.0.0.1:{prom_port}", "alertmanager": f"http://127.0.0.1:{am_port}",
               "sink": f"http://127.0.0.1:{sink_port}", "proxy": f"http://127.0.0.1:{proxy_port}"}
    finally:
        stop_process(proc)      # SIGTERM, as a supervisor would send
    # the demo stops what it started: nothing listens on its ports any more
    for p in (prom_port, am_port, port, exporter_port, proxy_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still open after the demo stopped"


def test_seed_002_client_sees_headers_count_down_and_the_429(demo):
    client = APIClient(demo["key"], demo["url"])
    body = client.make_request("/api/v1/items")
    assert "items" in body
    first = int(client.last_headers["X-RateLimit-Minute-Remaining"])
    client.make_request("/api/v1/items/3")
    assert int(client.last_headers["X-RateLimit-Minute-Remaining"]) == first - 1
    assert int(client.last_headers["X-RateLimit-Hour-Remaining"]) == 998
    assert client.last_headers["X-RateLimit-Day-Limit"] == "10000"
    for _ in range(first - 1):
        body = client.make_request("/api/v1/items")
    assert body == {"items": [{"id": i, "name": f"item {i}"} for i in range(1, 6)]}
    assert "Warning: Low minute rate limit remaining: 0" in client.warnings
    body = client.make_request("/api/v1/items")
    assert re.fullmatch(r"Rate limit exceeded for minute\. Try again in \d+ seconds", body["detail"])


def test_demo_metrics_pass_promtool_and_every_metric_moves(demo):
    promtool = require_binary("promtool")
    deadline = time.monotonic() + 40
    needed = [
        ("apitoken_requests_total", ()),
        ("apitoken_request_duration_seconds_count", ()),
        ("apitoken_route_request_duration_seconds_count", ()),
        ("apitoken_auth_failures_total", (("reason", "missing"),)),
        ("apitoken_auth_failures_total", (("reason", "invalid"),)),
        ("apitoken_auth_failures_total", (("reason", "inactive"),)),
        ("apitoken_auth_failures_total", (("reason", "expired"),)),
        ("apitoken_rate_limited_total", (("token", "demo-limited"),)),
        ("apitoken_rate_limit_remaining", ()),
        ("apitoken_rate_limit_limit", ()),
        ("apitoken_rate_limit_reset_timestamp_seconds", ()),
        ("apitoken_llm_tokens_total", (("type", "input"),)),
        ("apitoken_llm_tokens_total", (("type", "output"),)),
        ("apitoken_llm_requests_total", ()),
        ("apitoken_token_last_used_timestamp_seconds", ()),
        ("apitoken_token_info", ()),
        ("apitoken_requests_total", (("code", "500"),)),
        ("apitoken_request_duration_seconds_bucket", (("le", "+Inf"), ("token", "demo-slow"))),
        ("apitoken_llm_cost_usd_total", ()),
        ("apitoken_llm_unpriced_requests_total", (("model", UNPRICED_MODEL[1]),)),
        ("apitoken_llm_tokens_total", (("type", "cached_input"),)),
        ("apitoken_llm_tokens_total", (("type", "reasoning"),)),
        ("apitoken_pricing_info", ()),
        ("apitoken_budget_usd", (("token", "demo-llm"), ("period", "daily"))),
    ]
    missing = needed
    while time.monotonic() < deadline:
        text = requests.get(demo["url"] + "/metrics", timeout=10).text
        missing = [(name, match) for name, match in needed
                   if sample_total(text, name, **dict(match)) <= 0]
        statuses = set(samples(text, "apitoken_token_status").values())
        missing += [("apitoken_token_status", s) for s, v in TOKEN_STATUS_VALUES.items() if v not in statuses]
        if not missing:
            break
        time.sleep(1)
    assert missing == []
    # slow requests land above the 1 s bucket
    assert sample_total(text, "apitoken_request_duration_seconds_bucket", token="demo-slow", le="+Inf") > \
        sample_total(text, "apitoken_request_duration_seconds_bucket", token="demo-slow", le="1.0")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout

    sidecar = requests.get(demo["exporter"] + "/metrics", timeout=10).text
    assert sample_total(sidecar, "apitoken_ingest_events_total", result="accepted") > 0
    assert sample_total(sidecar, "apitoken_ingest_events_total", result="rejected") > 0
    assert sample_total(sidecar, "apitoken_requests_total", token="demo-sidecar") > 0


def test_demo_admin_json_behind_the_printed_token_file(demo):
    token = (demo["data_dir"] / "admin-token").read_text()
    assert requests.get(demo["url"] + "/admin/stats", timeout=10).status_code == 401
    stats = requests.get(demo["url"] + "/admin/stats", timeout=10,
                         headers={"Authorization": f"Bearer {token}"}).json()
    from devstack.demo import DEMO_KEYS
    assert stats["tokens"]["count"] == len(DEMO_KEYS) == 11 and stats["total_requests"] > 0


def test_without_docker_prometheus_and_alertmanager_run_from_local_binaries(demo):
    for name in ("Prometheus", "Alertmanager", "notifications", "analytics"):
        assert re.search(rf"^{name}\s+http://127\.0\.0\.1:\d+", demo["output"], re.M), name
    targets = requests.get(demo["prometheus"] + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"api-token-exporter", "prometheus", "alertmanager"}
    deadline = time.monotonic() + 30
    while any(t["health"] != "up" for t in targets) and time.monotonic() < deadline:
        time.sleep(1)
        targets = requests.get(demo["prometheus"] + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert all(t["health"] == "up" for t in targets), targets
    groups = requests.get(demo["prometheus"] + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert sum(len(g["rules"]) for g in groups) >= 40
    # the committed routing delivers the Watchdog to the sink's /watchdog through Alertmanager
    while time.monotonic() < deadline + 30:
        posts = requests.get(demo["sink"] + "/", timeout=10).json()
        if any(p["path"] == "/watchdog" for p in posts):
            break
        time.sleep(1)
    assert any(p["path"] == "/watchdog" for p in posts)


def test_every_url_the_demo_prints_answers(demo):
    """What a newcomer copies from the terminal works: each printed URL answers (with the key
    and the tokens the demo prints or writes), and the ingest curl line is accepted."""
    admin = (demo["data_dir"] / "admin-token").read_text()
    ingest = (demo["data_dir"] / "ingest-token").read_text()
    headers = {"X-API-Key": demo["key"], "Authorization": f"Bearer {admin}"}
    urls = set(re.findall(r"http://127\.0\.0\.1:\d+[^\s'\"()]*", demo["output"]))
    urls.discard(demo["exporter"] + "/v1/events")              # POST, below
    assert len(urls) >= 9, urls
    for url in sorted(urls):
        r = requests.get(url, headers=headers, timeout=30)
        if r.status_code == 429 and url.startswith(demo["url"] + "/api/"):
            # the playground key was spent by the seed 002 client test: the limiter answered
            assert r.json()["detail"].startswith("Rate limit exceeded"), r.text
            continue
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
    ingest_line = next(line for line in demo["output"].splitlines() if line.startswith("ingest"))
    body = re.search(r"-d '(.+)' ", ingest_line).group(1)
    r = requests.post(demo["exporter"] + "/v1/events", data=body, timeout=10,
                      headers={"Authorization": f"Bearer {ingest}", "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert "/alerts" in next(line for line in demo["output"].splitlines() if line.startswith("Prometheus"))


def test_each_bad_actor_triggers_its_alerts_and_no_others(demo):
    """The clients `demo --help` lists: each deliberate bad actor's alerts go pending or fire,
    and nothing else does: the healthy clients stay inside every window of their limits."""
    from devstack.demo import DEMO_KEYS, UNTOKENED_ALERTS
    allowed = {token: set(alerts) for token, (_, _, _, alerts) in DEMO_KEYS.items()}
    # the client test above spends the playground key's minute on purpose
    allowed["demo-playground"] |= {"ApiTokenRateLimitApproaching", "ApiTokenRateLimited",
                                   "ApiTokenRateLimitExhaustionPredicted"}
    wanted = {("demo-limited", "ApiTokenRateLimited"), ("demo-slow", "ApiTokenHighLatency"),
              ("demo-errors", "ApiTokenHighErrorRate"), ("demo-inactive", "ApiTokenInvalidStillUsed"),
              (None, "ApiTokenUnauthorizedAccess"), (None, "Watchdog")}
    seen, runbooks = set(), set()
    start = time.monotonic()
    while time.monotonic() < start + 150 and not (wanted <= seen and time.monotonic() > start + 60):
        for alert in requests.get(demo["prometheus"] + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]:
            token, name = alert["labels"].get("token"), alert["labels"]["alertname"]
            if token is None:
                assert name in UNTOKENED_ALERTS, alert["labels"]
            else:
                assert name in allowed[token], (token, name, alert["state"])
            seen.add((token, name))
            # links to this demo's exporter (its --exporter-port), and no value as 1.3e+05
            runbooks.add(alert["annotations"]["runbook_url"])
            assert "e+" not in alert["annotations"].get("description", ""), alert["annotations"]
        time.sleep(2)
    assert wanted <= seen, wanted - seen
    for url in runbooks:
        assert url.startswith(demo["exporter"] + "/runbooks#"), url
    page = requests.get(demo["exporter"] + "/runbooks", timeout=10)
    assert page.status_code == 200
    assert all(f'id="{url.split("#")[1]}"' in page.text for url in runbooks), runbooks
