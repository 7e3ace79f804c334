"""The proxy's cost, side by side under gunicorn: calling the fake upstream directly, through a
minimal pass-through proxy written with `requests`, and through `api-token-exporter proxy`.

Four gunicorn servers (the fake GitHub upstream and the requests proxy under gthread;
`api-token-exporter proxy` twice: as it is served, on uvicorn's event loop with the app on the
same number of threads, and under gthread, the model it replaced) and the load generator share
this machine; rounds interleave the variants
so drift hits them alike. Per variant: the latency one client sees (sequential, keep-alive),
throughput with several clients (keep-alive), and how long the first event of a streamed answer
(server-sent events, the next one 200 ms later) takes to arrive. The proxy's /metrics must count
every request it was sent.

    python benchmarks/bench_proxy.py [--requests 500] [--clients 8] [--rounds 3]

The gunicorn factories live here too (`bench_proxy:upstream()`, `bench_proxy:requests_proxy()`).
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)            # the dev stack (devstack/) beside the package
SECRETS = ("ghp_" + "b" * 32 + "1111", "ghp_" + "c" * 32 + "2222")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}


# -- gunicorn factories ---------------------------------------------------------------------
def upstream():
    """The fake GitHub: every secret with a quota it never runs out of; streams with a pause."""
    from devstack.fake_upstream import FakeUpstream
    fake = FakeUpstream("github", limit=10 ** 9, chunk_delay=0.2)
    fake.record = False
    for secret in SECRETS:
        fake.add(secret)
    return fake


def requests_proxy():
    """What a pass-through proxy looks like when written quickly with requests: one Session
    (pooled connections), stream=True, hop-by-hop headers dropped, one upstream token."""
    import requests
    session = requests.Session()
    base = os.environ["BENCH_UPSTREAM"]

    def app(environ, start_response):
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_") and k not in ("HTTP_HOST", "HTTP_CONNECTION", "HTTP_X_API_KEY")}
        headers["Authorization"] = "Bearer " + SECRETS[0]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else None
        r = session.request(environ["REQUEST_METHOD"], base + environ.get("RAW_URI", environ["PATH_INFO"]),
                            headers=headers, data=body, stream=True, allow_redirects=False)
        start_response(f"{r.status_code} {r.reason}",
                       [(k, v) for k, v in r.raw.headers.items() if k.lower() not in HOP_BY_HOP])
        return r.iter_content(chunk_size=None)
    return app


# -- the run --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(target: str, env: dict, workers: int, threads: int, extra=()):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--threads", str(threads),
         "--worker-class", "gthread", "--keep-alive", "30", "--bind", f"127.0.0.1:{port}", "--chdir", HERE,
         *extra, target], env={**os.environ, "PYTHONPATH": CHECKOUT, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{target} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    return proc, port


def get(conn, path, key):
    conn.request("GET", path, headers={"X-API-Key": key, "Authorization": "Bearer " + SECRETS[1]})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, body


def latency(port: int, key: str, n: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times, codes = [], {}
    for i in range(n):
        t = time.perf_counter()
        status, _ = get(conn, f"/repos/acme/app/issues/{i % 50}", key)
        times.append(time.perf_counter() - t)
        codes[status] = codes.get(status, 0) + 1
    conn.close()
    return times, codes


def throughput(port: int, key: str, n: int, clients: int):
    codes, lock = {}, threading.Lock()

    def worker(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local = {}
        for i in range(count):
            status, _ = get(conn, f"/users/u{i % 20}", key)
            local[status] = local.get(status, 0) + 1
        conn.close()
        with lock:
            for k, v in local.items():
                codes[k] = codes.get(k, 0) + v
    threads = [threading.Thread(target=worker, args=(n // clients,)) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return (n // clients) * clients / (time.perf_counter() - t), codes


def first_event(port: int, key: str, n: int):
    times = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t = time.perf_counter()
        conn.request("GET", "/stream", headers={"X-API-Key": key, "Authorization": "Bearer " + SECRETS[1]})
        resp = conn.getresponse()
        first = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        times.append(time.perf_counter() - t)
        assert first.startswith(b"data: ") or first.startswith(b"4") or first, first
        resp.read()
        conn.close()
    return times


def counted(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apitoken_requests_total{") and 'token="bench"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="per variant and round, sequential and parallel each")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10, help="streamed answers per variant and round")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per server")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    args = parser.parse_args(argv)
    from api_token_exporter.core.keystore import add_key
    workdir = tempfile.mkdtemp(prefix="ate-bench-proxy-")
    procs = []
    try:
        keys_file = os.path.join(workdir, "keys.yml")
        key = add_key(keys_file, "bench", rate_limits={"minute": 10 ** 9, "hour": 10 ** 9, "day": 10 ** 9})
        env = {f"BENCH_SECRET_{i}": s for i, s in enumerate(SECRETS)}
        proc, up_port = start("bench_proxy:upstream()", env, args.workers, args.threads)
        procs.append(proc)
        upstream_url = f"http://127.0.0.1:{up_port}"
        pool_file = os.path.join(workdir, "pool.yml")
        with open(pool_file, "w") as fh:
            fh.write(f"upstream: {upstream_url}\nprovider: github\nrefresh_interval: 0\ncredentials:\n"
                     + "".join(f"  - {{id: bench-{i}, secret_env: BENCH_SECRET_{i}}}\n" for i in range(len(SECRETS))))
        proc, req_port = start("bench_proxy:requests_proxy()", {"BENCH_UPSTREAM": upstream_url}, args.workers,
                               args.threads)
        procs.append(proc)
        ours = {}
        for name, worker in (("api-token-exporter proxy", "api_token_exporter.web.worker.ServingWorker"),
                             ("api-token-exporter proxy under gthread", "gthread")):
            proc, ours[name] = start("api_token_exporter.proxy.app:app_from_env()",
                                     {**env, "ATE_UPSTREAM_POOL_FILE": pool_file, "ATE_KEYS_FILE": keys_file,
                                      "ATE_STATE_DIR": os.path.join(workdir, f"state-{len(ours)}"),
                                      "ATE_METRICS_PUBLIC": "true"}, args.workers, args.threads,
                                     ("--config", "python:api_token_exporter.web.gunicorn_conf", "--worker-class", worker))
            procs.append(proc)
        variants = [("upstream, direct", up_port), ("pass-through proxy with requests", req_port), *ours.items()]
        for _, port in variants:                      # warm up: connections, imports, first series
            latency(port, key, 20)
            first_event(port, key, 1)
        results = {name: {"lat": [], "rps": [], "first": [], "codes": {}} for name, _ in variants}
        for _ in range(args.rounds):
            for name, port in variants:
                r = results[name]
                times, codes = latency(port, key, args.requests)
                r["lat"].append(times)
                rps, more = throughput(port, key, args.requests, args.clients)
                r["rps"].append(rps)
                r["first"] += first_event(port, key, args.streams)
                for c, n in list(codes.items()) + list(more.items()):
                    r["codes"][c] = r["codes"].get(c, 0) + n
        reconciled = {name: (counted(port), sum(results[name]["codes"].values()) + 20 + args.rounds * args.streams + 1)
                      for name, port in ours.items()}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"python {sys.version.split()[0]}; gunicorn, {args.workers} worker(s) x {args.threads} threads per "
          f"server, 4 servers and the client on one machine ({os.cpu_count()} cores); {args.rounds} rounds of "
          f"{args.requests} sequential + {args.requests} parallel ({args.clients} clients) requests and "
          f"{args.streams} streams per variant; keep-alive everywhere")
    print("| variant | p50 ms (1 client) | p99 ms | p50 added | req/s (parallel) | first event ms (p50) | status codes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = None
    for name, _ in variants:
        r = results[name]
        p50 = statistics.median(pct(t, 0.5) for t in r["lat"])
        p99 = statistics.median(pct(t, 0.99) for t in r["lat"])
        base = p50 if base is None else base
        added = "—" if name.startswith("upstream") else f"+{p50 - base:.2f} ms"
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {added} | {statistics.median(r['rps']):.0f} | "
              f"{pct(r['first'], 0.5):.1f} | {dict(sorted(r['codes'].items()))} |")
    for name, (got, sent) in reconciled.items():
        print(f"{name}: {got} of {sent} requests counted on /metrics ({'all' if got == sent else 'NOT all'})")
    return 0 if all(got == sent for got, sent in reconciled.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
