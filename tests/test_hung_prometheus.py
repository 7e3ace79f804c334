"""A hung Prometheus (SIGSTOP) behind the real service: analytics answers are bounded overall and
per caller, the breaker then answers at once, and /healthz and ingest never wait behind them."""
import concurrent.futures
import os
import signal
import threading
import time

import pytest
import requests

from api_token_exporter.analytics.gate import QueryGate, Refused
from api_token_exporter.analytics.queries import PrometheusUnavailable
from api_token_exporter.core.keystore import add_key
from devstack.stack import prometheus_config, start_prometheus
from support import INGEST, needs, running_cli as running, timed_requests

ADMIN = "a" * 32


# -- the gate on its own --------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def blocked(gate, caller, release, started):
    def compute():
        started.set()
        release.wait(10)
        return "answer"
    return threading.Thread(target=gate.run, args=(caller, compute))


def test_the_gate_bounds_answers_overall_and_per_caller():
    gate = QueryGate(overall=2, per_caller=1, failures=3, cooldown=30)
    release = threading.Event()
    first, second = threading.Event(), threading.Event()
    threads = [blocked(gate, "key:a", release, first), blocked(gate, "key:b", release, second)]
    threads[0].start()
    first.wait(5)
    with pytest.raises(Refused) as refused:
        gate.run("key:a", lambda: "never")
    assert refused.value.status == 429 and "analytics_max_per_caller" in refused.value.detail
    threads[1].start()
    second.wait(5)
    with pytest.raises(Refused) as refused:
        gate.run("key:c", lambda: "never")
    assert refused.value.status == 503 and refused.value.retry_after == 1
    release.set()
    for t in threads:
        t.join(5)
    assert gate.run("key:a", lambda: "now") == "now" and gate.state()["answers_in_flight"] == 0


def test_the_breaker_opens_after_failures_probes_once_and_closes_on_success():
    clock = Clock()
    gate = QueryGate(overall=2, per_caller=2, failures=3, cooldown=30, clock=clock)

    def hung():
        raise PrometheusUnavailable("did not answer within 10 s")
    for _ in range(2):
        with pytest.raises(PrometheusUnavailable):
            gate.run("admin", hung)
    with pytest.raises(ValueError):             # not Prometheus's failure: not counted
        gate.run("admin", lambda: int("x"))
    with pytest.raises(PrometheusUnavailable):
        gate.run("admin", hung)
    assert gate.state()["prometheus"] == "paused"
    with pytest.raises(Refused) as refused:
        gate.run("key:b", lambda: "never")
    assert refused.value.status == 503 and refused.value.retry_after == 30 and "paused" in refused.value.detail
    clock.t += 30
    with pytest.raises(PrometheusUnavailable):    # the probe fails: paused again
        gate.run("admin", hung)
    with pytest.raises(Refused):
        gate.run("admin", lambda: "never")
    clock.t += 30
    assert gate.run("admin", lambda: "back") == "back"
    assert gate.state() == {"prometheus": "ok", "paused_for_seconds": 0.0, "answers_in_flight": 0}


# -- the real service -------------------------------------------------------------------------
@needs("prometheus", "server")
def test_a_hung_prometheus_costs_a_bounded_wait_then_nothing_and_health_and_ingest_go_on(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    keys = [add_key(keys_file, f"k{i}", tenant=f"t{i}") for i in range(6)]
    prom = start_prometheus(str(tmp_path / "prom"), prometheus_config({}, None, str(tmp_path / "no-rules")))
    try:
        with running(["serve", "--threads", "4"], tmp_path, keys_file=keys_file, ingest_token=INGEST,
                     admin_token=ADMIN, prometheus_url=prom.url, prometheus_timeout="2s",
                     analytics_cache_seconds=0, analytics_max_concurrent=2, analytics_max_per_caller=1,
                     analytics_breaker_failures=2,
                     analytics_breaker_cooldown="3s") as port:
            url = f"http://127.0.0.1:{port}"
            assert requests.get(url + "/api/analytics/usage", headers={"X-API-Key": keys[0]}, timeout=10).status_code == 200
            os.kill(prom.process.pid, signal.SIGSTOP)
            try:
                def ask(key):
                    started = time.monotonic()
                    r = requests.get(url + "/api/analytics/usage", headers={"X-API-Key": key}, timeout=30)
                    return r.status_code, r.json()["detail"], time.monotonic() - started
                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    calls = [pool.submit(ask, key) for key in keys]
                    time.sleep(0.3)             # the two admitted ones now wait on Prometheus
                    event = ('[{"token": "k0", "route": "/x", "method": "GET", "status": 200, '
                             '"duration_ms": 3}]')
                    meanwhile = timed_requests(port, [
                        ("GET", "/healthz", {}, None),
                        ("POST", "/v1/events", {"Authorization": f"Bearer {INGEST}"}, event)] * 10)
                    answers = [c.result() for c in calls]
                assert [status for status, _ in meanwhile] == [200] * 20
                print("meanwhile, /healthz and ingest p99:", max(seconds for _, seconds in meanwhile))
                waited = [a for a in answers if "ReadTimeout" in a[1] or "did not answer within" in a[1]]
                refused = [a for a in answers if "analytics_max_concurrent" in a[1]]
                assert len(waited) == 2 and len(refused) == 4, answers
                assert all(status == 503 for status, _, _ in answers)
                # two failures in a row: the breaker answers at once, for every caller
                started = time.monotonic()
                r = requests.get(url + "/api/analytics/usage", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
                breaker_latency = time.monotonic() - started
                print(f"the breaker answered in {breaker_latency * 1000:.1f} ms")
                assert r.status_code == 503 and "paused" in r.json()["detail"] and 1 <= int(r.headers["Retry-After"]) <= 3
                health = requests.get(url + "/healthz", timeout=5).json()
                assert health["status"] == "ok" and health["analytics"]["prometheus"] == "paused"
            finally:
                os.kill(prom.process.pid, signal.SIGCONT)
            time.sleep(3.2)                     # the cool-down; then a probe that succeeds
            r = requests.get(url + "/api/analytics/usage", headers={"X-API-Key": keys[1]}, timeout=30)
            assert r.status_code == 200
            assert requests.get(url + "/healthz", timeout=5).json()["analytics"]["prometheus"] == "ok"
    finally:
        prom.stop()
