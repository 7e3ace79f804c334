"""Slow and silent clients against the real servers (`serve` and `proxy` under gunicorn): they hold
sockets, never the threads that answer everyone else, and each is closed when its time is up."""
import contextlib
import http.client
import json
import os
import socket
import threading

import pytest
import requests
import yaml

from api_token_exporter.core.keystore import add_key
from devstack.fake_upstream import FakeUpstream
from support import INGEST, needs, running_cli as running, sample_total, timed_requests, wait_for

pytestmark = pytest.mark.integration
HELD = 500                          # slow connections held open at once


def open_slow_connections(port, count, *, path="/v1/events", kinds=(0, 1, 2)):
    """``count`` connections, of the kinds in turn: 0, a head trickled a byte at a time (never
    finished); 1, a body promised and never sent; 2, a few bytes of a request line then silence."""
    conns = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        kind = kinds[i % len(kinds)]
        if kind == 0:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        elif kind == 1:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100000\r\n\r\n[{".encode())
        else:
            s.sendall(b"GE")
        conns.append((kind, s))
    return conns


def trickle(conns, stop):
    """One more header byte every second on the slow-head connections, until stopped."""
    while not stop.wait(1.0):
        for kind, s in conns:
            if kind == 0:
                with contextlib.suppress(OSError):
                    s.sendall(b"x")


def still_open(s) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True                             # nothing to read: open
    except OSError:
        return False
    finally:
        s.setblocking(True)


def p99(results) -> float:
    times = sorted(seconds for _, seconds in results)
    return times[int(len(times) * 0.99) - 1]


@needs("server")
def test_hundreds_of_slow_clients_hold_sockets_not_the_threads_that_answer_others(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha", rate_limits={"minute": 1_000_000})
    with running(["serve", "--threads", "4"], tmp_path, keys_file=keys_file, ingest_token=INGEST,
                 metrics_public="true", http_header_timeout="5m", http_body_timeout="5m") as port:
        conns = open_slow_connections(port, HELD)
        stop = threading.Event()
        threading.Thread(target=trickle, args=(conns, stop), daemon=True).start()
        try:
            event = json.dumps([{"token": "alpha", "route": "/items", "method": "GET", "status": 200,
                                 "duration_ms": 5}])
            ingest = ("POST", "/v1/events", {"Authorization": f"Bearer {INGEST}",
                                             "Content-Type": "application/json"}, event)
            plan = [("GET", "/healthz", {}, None), ingest, ("GET", "/metrics", {}, None)] * 100
            results = timed_requests(port, plan)
            assert all(still_open(s) for _, s in conns)           # all held meanwhile
        finally:
            stop.set()
        print(f"{HELD} slow connections held; {len(results)} requests meanwhile, p99 {p99(results):.3f} s")
        assert [status for status, _ in results] == [200] * len(plan)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert sample_total(text, "apitoken_requests_total", token="alpha") == 100
        for _, s in conns:
            s.close()


@needs("server")
def test_overdue_heads_and_bodies_are_answered_408_and_idle_connections_closed(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha")
    with running(["serve"], tmp_path, keys_file=keys_file, ingest_token=INGEST, http_header_timeout="1s",
                 http_body_timeout="1s", http_keepalive_timeout="1s") as port:
        kinds = {kind: s for kind, s in open_slow_connections(port, 3)}
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read()

        def answer(s) -> bytes:
            """Until the server closes: a client timeout (10 s) raises instead."""
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk
        head, body, line = answer(kinds[0]), answer(kinds[1]), answer(kinds[2])
        assert answer(silent) == b"" and answer(kept.sock) == b""
        assert head.startswith(b"HTTP/1.1 408 ") and line.startswith(b"HTTP/1.1 408 ")
        assert body.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in body
        # a client that keeps its pace is served
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/events", body=b"[]", headers={"Authorization": f"Bearer {INGEST}"})
        assert conn.getresponse().status == 200


@needs("server")
def test_past_the_connection_limit_a_request_is_refused_at_once(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    add_key(keys_file, "alpha")
    with running(["serve"], tmp_path, keys_file=keys_file, http_max_connections=20,
                 http_header_timeout="5m") as port:
        held = open_slow_connections(port, 20, kinds=(0, 2))     # no request yet: none is answered
        wait_for("the held connections accepted", lambda: all(still_open(s) for _, s in held), timeout=10)
        status, _ = timed_requests(port, [("GET", "/healthz", {}, None)], threads=1)[0]
        assert status == 503
        for _, s in held:
            s.close()
        wait_for("the slots freed", lambda: timed_requests(port, [("GET", "/healthz", {}, None)], threads=1)[0][0] == 200,
                 timeout=10, interval=0.2)


@needs("server")
def test_the_proxy_streams_and_passes_long_bodies_while_slow_clients_are_held(tmp_path):
    keys_file = str(tmp_path / "keys.yml")
    key = add_key(keys_file, "alpha", rate_limits={"minute": 1_000_000})
    fake = FakeUpstream("github")
    fake.add("ghp_" + "a" * 36)
    upstream = fake.serve()
    pool_file = tmp_path / "pool.yml"
    pool_file.write_text(yaml.safe_dump({"provider": "github", "refresh_interval": 0, "retry_body_max_bytes": 1000,
                                         "credentials": [{"id": "gh-0", "secret_env": "UPSTREAM_SECRET"}]}))
    try:
        with running(["proxy", "--pool", str(pool_file), "--upstream", upstream, "--workers", "1",
                      "--threads", "4"], tmp_path, {"UPSTREAM_SECRET": "ghp_" + "a" * 36},
                     keys_file=keys_file, http_header_timeout="5m",
                     http_body_timeout="5m") as port:
            url = f"http://127.0.0.1:{port}"
            conns = open_slow_connections(port, HELD, path="/repos/a/b")
            plan = [("GET", "/repos/a/b", {"X-API-Key": key}, None)] * 200
            results = timed_requests(port, plan)
            print(f"proxy: {HELD} slow connections held; 200 requests meanwhile, p99 {p99(results):.3f} s")
            assert [status for status, _ in results] == [200] * 200
            assert all(still_open(s) for _, s in conns)

            fake.gate.clear()                   # the upstream holds its last event back
            r = requests.get(url + "/stream", headers={"X-API-Key": key}, stream=True, timeout=30)
            chunks = r.iter_content(chunk_size=None)
            assert next(chunks).startswith(b"data: ") and not fake.finished.is_set()
            fake.gate.set()
            assert b"".join(chunks).endswith(b"data: [DONE]\n\n")

            big = os.urandom(3_000_000)         # beyond what is buffered: read by the app as it comes
            r = requests.put(url + "/repos/a/b", data=big, headers={"X-API-Key": key}, timeout=30)
            assert r.status_code == 200 and r.json()["bytes"] == len(big) and fake.seen[-1]["body"] == big
            r = requests.post(url + "/repos/a/b", data=iter([big[:70_000]] * 3), headers={"X-API-Key": key},
                              timeout=30)            # chunked
            assert r.json()["bytes"] == 210_000 and fake.seen[-1]["body"] == big[:70_000] * 3
            for _, s in conns:
                s.close()
    finally:
        fake.stop()
