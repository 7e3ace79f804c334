"""Slow clients against `api-token-exporter serve`, side by side: as it is served (uvicorn's event
loop in front of 4 app threads) and under gunicorn `gthread` with the same 4 threads, the model
it replaced. Per variant: N connections held open (in thirds: a head trickled a byte a second, a
body promised and never sent, two bytes of a request line then silence), then 300 requests
(/healthz, an ingest POST, /metrics; a new connection each, 4 client threads, 3 s timeout) and
how many were answered, with their p50 and p99.

    python benchmarks/bench_slow_clients.py [--held 500] [--requests 300]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

INGEST = "i" * 32
EVENT = b'[{"token": "bench", "route": "/items", "method": "GET", "status": 200, "duration_ms": 5}]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(worker: str, env: dict):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "4", "--bind", f"127.0.0.1:{port}",
         "--config", "python:api_token_exporter.web.gunicorn_conf", "--worker-class", worker,
         "api_token_exporter.web.server:app_from_env()"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        time.sleep(0.2)
    raise TimeoutError(worker)


def hold(port: int, count: int, stop: threading.Event):
    conns = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall((b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                   b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n[{", b"GE")[i % 3])
        conns.append(s)

    def trickle():
        while not stop.wait(1.0):
            for s in conns[0::3]:
                with contextlib.suppress(OSError):
                    s.sendall(b"x")
    threading.Thread(target=trickle, daemon=True).start()
    return conns


def measure(port: int, n: int, threads: int = 4):
    plan = [("GET", "/healthz", None, {}), ("POST", "/v1/events", EVENT, {"Authorization": "Bearer " + INGEST}),
            ("GET", "/metrics", None, {})]
    answered, times, lock = [0], [], threading.Lock()

    def client(offset):
        for i in range(offset, n, threads):
            method, path, body, headers = plan[i % 3]
            t = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            try:
                conn.request(method, path, body=body, headers=headers)
                ok = conn.getresponse().status == 200
            except OSError:
                ok = False
            finally:
                conn.close()
            with lock:
                times.append(time.perf_counter() - t)
                answered[0] += ok
    pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    times.sort()
    return answered[0], times[len(times) // 2] * 1000, times[int(len(times) * 0.99) - 1] * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=500, help="slow connections held open")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args(argv)
    from api_token_exporter.core.keystore import add_key
    workdir = tempfile.mkdtemp(prefix="ate-bench-slow-")
    rows = []
    try:
        keys_file = os.path.join(workdir, "keys.yml")
        add_key(keys_file, "bench", rate_limits={"minute": 10 ** 9})
        env = {"ATE_KEYS_FILE": keys_file, "ATE_INGEST_TOKEN": INGEST, "ATE_METRICS_PUBLIC": "true",
               "ATE_HTTP_HEADER_TIMEOUT": "5m", "ATE_HTTP_BODY_TIMEOUT": "5m"}
        for name, worker in (("event loop (as served)", "api_token_exporter.web.worker.ServingWorker"),
                             ("gthread, 4 threads", "gthread")):
            for held in sorted({0, 4, args.held}):
                proc, port = start(worker, env)
                stop = threading.Event()
                conns = hold(port, held, stop)
                try:
                    answered, p50, p99 = measure(port, args.requests)
                finally:
                    stop.set()
                    for s in conns:
                        s.close()
                    proc.terminate()
                    proc.wait(30)
                rows.append((name, held, answered, p50, p99))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"python {sys.version.split()[0]}; `serve` with 1 worker, 4 threads; {args.requests} requests from 4 "
          f"clients (3 s timeout) while slow connections are held; {os.cpu_count()} cores")
    print("| server | slow connections held | answered | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, held, answered, p50, p99 in rows:
        print(f"| {name} | {held} | {answered} of {args.requests} | {p50:.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
