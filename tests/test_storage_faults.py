"""A real redis-server that stops answering (SIGSTOP) and comes back (SIGCONT): the circuit
breaker keeps requests fast while it is away, limits apply again by themselves, each change of
state is logged once, and the three failure modes do what they say."""
import logging
import os
import signal
import subprocess
import time

import pytest

from support import build_app, free_port, needs, require_binary, sample_total, stop_process, wait_for_port

pytestmark = pytest.mark.integration
TIMEOUT = 0.1


@pytest.fixture
@needs("redis")
def own_redis(tmp_path):
    """A redis-server of this test alone (it gets stopped and continued)."""
    port = free_port()
    proc = subprocess.Popen([require_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    try:
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc)


def timed(client, raw):
    started = time.perf_counter()
    r = client.get("/items", headers={"X-API-Key": raw})
    return r, time.perf_counter() - started


def test_a_hung_redis_opens_the_breaker_and_limits_come_back_by_themselves(own_redis, keys, caplog):
    proc, uri = own_redis
    caplog.set_level(logging.INFO, logger="api_token_exporter")
    client = build_app(keys[0], storage_uri=uri, storage_timeout=TIMEOUT).test_client()
    beta = keys[1]["beta"]                                   # 3 per minute
    assert [timed(client, beta)[0].status_code for _ in range(4)] == [200, 200, 200, 429]

    os.kill(proc.pid, signal.SIGSTOP)
    results = [timed(client, keys[1]["alpha"]) for _ in range(200)]
    assert {r.status_code for r, _ in results} == {200}     # fail open (the default)
    took = sorted(t for _, t in results)
    p99 = took[int(0.99 * len(took)) - 1]
    assert p99 < 2 * TIMEOUT, took[-5:]
    assert sum(t > TIMEOUT / 2 for t in took) <= 6         # only the calls that opened it, and probes
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_rate_limit_storage_breaker_state", state="closed") == 0
    assert sample_total(text, "apitoken_rate_limit_storage_errors_total") == 200

    os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:                      # no restart, no call: it probes by itself
        if timed(client, beta)[0].status_code == 429:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("limits did not apply again after Redis came back")
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_rate_limit_storage_breaker_state", state="closed") == 1
    changes = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert changes[0].endswith("next probe in 1 s)") and "open" in changes[0]
    assert "closed" in changes[-1]
    assert len(changes) < 20                                 # state changes, not one line per request


@pytest.mark.parametrize("mode", ["closed", "local"])
def test_failure_modes_while_redis_is_away(own_redis, keys, mode):
    proc, uri = own_redis
    client = build_app(keys[0], storage_uri=uri, storage_timeout=TIMEOUT, storage_failure_mode=mode).test_client()
    os.kill(proc.pid, signal.SIGSTOP)
    codes = [timed(client, keys[1]["beta"])[0] for _ in range(6)]
    if mode == "closed":
        assert {r.status_code for r in codes} == {503}
        assert "storage_failure_mode: closed" in codes[-1].get_json()["detail"] and codes[-1].headers["Retry-After"]
    else:                                                    # this process's own limits: 3 per minute
        assert [r.status_code for r in codes] == [200, 200, 200, 429, 429, 429]
