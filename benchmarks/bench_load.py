"""A bounded load run against gunicorn with 4 workers: bare Flask, the middleware with
memory:// and with redis:// limits. Reports requests per second, p50/p99 latency, the p99 the
middleware adds, and whether the requests each token sent equal those counted on /metrics.

The load generator (Python threads, a new connection per request, as gunicorn's sync workers
close them) runs on the same machine, so the figures are a floor, not the server's ceiling.

    python benchmarks/bench_load.py [--requests-per-token 300] [--tokens 10] [--clients 8]
"""
from __future__ import annotations

import argparse
import collections
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/v1/items/1")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(port)


def start_gunicorn(factory: str, env: dict, workdir: str):
    port = free_port()
    mp = tempfile.mkdtemp(dir=workdir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "4", "--bind", f"127.0.0.1:{port}",
         "--chdir", HERE, "--config", "python:api_token_exporter.web.gunicorn_conf", f"load_apps:{factory}()"],
        env={**os.environ, **env, "ATE_STATE_DIR": mp}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    wait_up(port, proc)
    return proc, port


def load(port: int, keys: dict, per_token: int, clients: int):
    jobs = [(token, raw) for token, raw in keys.items() for _ in range(per_token)]
    lock = threading.Lock()
    latencies, sent = [], collections.Counter()
    status = collections.Counter()

    def worker(my_jobs):
        local = []
        for i, (token, raw) in enumerate(my_jobs):
            headers = {"X-API-Key": raw} if raw else {}
            start = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/api/v1/items/{i % 50}", headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            local.append(time.perf_counter() - start)
            with lock:
                sent[token] += 1
                status[resp.status] += 1
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=(jobs[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"rps": len(latencies) / elapsed, "p50": pick(0.50), "p99": pick(0.99), "sent": sent,
            "status": status}


def counted(port: int) -> collections.Counter:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = collections.Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "apitoken_requests_total":
                out[s.labels["token"]] += s.value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-token", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    from api_token_exporter.core.keystore import add_key
    workdir = tempfile.mkdtemp(prefix="ate-load-")
    keys_file = os.path.join(workdir, "keys.yml")
    keys = {f"load-{i}": add_key(keys_file, f"load-{i}") for i in range(args.tokens)}
    redis_port = free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind",
                                   "127.0.0.1", "--save", "", "--dir", workdir], stdout=subprocess.DEVNULL)
    base_env = {"ATE_KEYS_FILE": keys_file, "ATE_RATE_LIMITS": "minute=100000000,hour=100000000,day=100000000"}
    variants = [("bare Flask", "bare", {}),
                ("middleware, memory://", "instrumented", {**base_env, "ATE_STORAGE_URI": "memory://"}),
                ("middleware, redis://", "instrumented",
                 {**base_env, "ATE_STORAGE_URI": f"redis://127.0.0.1:{redis_port}/0"})]
    rows, bare_p99 = [], None
    try:
        for name, factory, env in variants:
            proc, port = start_gunicorn(factory, env, workdir)
            try:
                result = load(port, keys if factory != "bare" else {t: None for t in keys},
                              args.requests_per_token, args.clients)
                if factory == "bare":
                    bare_p99, reconciled = result["p99"], "—"
                else:
                    got = counted(port)
                    ok = all(got[t] == result["sent"][t] for t in keys)
                    reconciled = f"{'yes' if ok else 'NO'}: {int(sum(got[t] for t in keys))} of " \
                                 f"{sum(result['sent'].values())}"
                added = "—" if bare_p99 is None or factory == "bare" else f"{result['p99'] - bare_p99:+.2f}"
                rows.append((name, sum(result["sent"].values()), result["rps"], result["p50"], result["p99"],
                             added, reconciled, dict(result["status"])))
            finally:
                proc.terminate()
                proc.wait(15)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"gunicorn 4 sync workers, {args.clients} client threads on the same 2-core machine, "
          f"{args.tokens} tokens x {args.requests_per_token} requests")
    print("| variant | requests | req/s | p50 ms | p99 ms | p99 added ms | sent = counted on /metrics | status codes |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, n, rps, p50, p99, added, rec, codes in rows:
        print(f"| {name} | {n} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {added} | {rec} | {codes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
