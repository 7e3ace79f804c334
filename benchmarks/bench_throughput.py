"""Requests per second under gunicorn: a trivial Flask endpoint bare, behind the full middleware
(auth, three rate-limit windows with their headers, per-token metrics) and behind
prometheus-flask-exporter, in one run.

Each variant is its own gunicorn (``--workers`` gthread workers, ``--threads`` each), all three
started before the first round; ``wrk`` (C, epoll, kept-alive connections on loopback) loads one
at a time, the order shuffled each round. Reports each variant's median requests per second
and the median over rounds of its ratio to bare Flask in the same round, then checks that the
middleware counted every request wrk saw answered.

    python benchmarks/bench_throughput.py [--rounds 5] [--seconds 5] [--connections 16] [--workers 2]
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from prometheus_client.parser import text_string_to_metric_families

from bench_load import free_port, wait_up

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = "/api/v1/items/7"
LIMITS = "minute=1000000000,hour=1000000000,day=1000000000"


def start(factory: str, env: dict, workers: int, threads: int, workdir: str, config: bool):
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--threads", str(threads),
               "--worker-class", "gthread", "--keep-alive", "30", "--bind", f"127.0.0.1:{port}",
               "--chdir", HERE, f"load_apps:{factory}()"]
    if config:           # the middleware's hooks: one store directory for every worker
        command[3:3] = ["--config", "python:api_token_exporter.web.gunicorn_conf"]
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=workdir)
    wait_up(port, proc)
    return proc, port


def wrk(port: int, seconds: float, connections: int, key: str) -> dict:
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-H", f"X-API-Key: {key}",
                          f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    found = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if out.returncode != 0 or not found or not rps:
        raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: .*", text)
    return {"requests": int(found.group(1)), "rps": float(rps.group(1)),
            "non_2xx": int(bad.group(1)) if bad else 0, "errors": errors.group(0) if errors else ""}


def counted(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "apitoken_requests_total" and s.labels.get("token") == "load")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk; .ci/install does it)")
    from api_token_exporter.core.keystore import add_key
    workdir = tempfile.mkdtemp(prefix="ate-throughput-")
    keys_file = os.path.join(workdir, "keys.yml")
    key = add_key(keys_file, "load")
    multiproc = os.path.join(workdir, "prometheus-multiproc")
    os.makedirs(multiproc)
    variants = {
        "bare Flask": ("bare", {}, False),
        "api-token-exporter (full)": ("instrumented", {"ATE_KEYS_FILE": keys_file, "ATE_RATE_LIMITS": LIMITS,
                                                       "ATE_STATE_DIR": os.path.join(workdir, "state")}, True),
        "prometheus-flask-exporter": ("pfe", {"PROMETHEUS_MULTIPROC_DIR": multiproc}, False),
    }
    servers, rps, ratios, sent, bad = {}, {n: [] for n in variants}, {n: [] for n in variants}, 0, []
    try:
        for name, (factory, env, config) in variants.items():
            servers[name] = start(factory, env, args.workers, args.threads, workdir, config)
        before = counted(servers["api-token-exporter (full)"][1])
        for _ in range(args.rounds):
            order = list(variants)
            random.shuffle(order)
            this_round = {}
            for name in order:
                result = wrk(servers[name][1], args.seconds, args.connections, key)
                this_round[name] = result["rps"]
                if result["non_2xx"] or result["errors"]:
                    bad.append((name, result["non_2xx"], result["errors"]))
                if name == "api-token-exporter (full)":
                    sent += result["requests"]
            for name in variants:
                rps[name].append(this_round[name])
                ratios[name].append(this_round[name] / this_round["bare Flask"])
        got = counted(servers["api-token-exporter (full)"][1]) - before
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"python {sys.version.split()[0]}; gunicorn {args.workers} gthread workers x {args.threads} threads "
          f"each; wrk 1 thread, {args.connections} kept-alive connections, {args.seconds:g} s per variant per "
          f"round; {args.rounds} rounds in shuffled order; GET {PATH} (a JSON object)")
    print("| variant | requests/s (median) | of bare Flask's (median of rounds) | cost |")
    print("|---|---:|---:|---:|")
    for name in variants:
        ratio = statistics.median(ratios[name])
        cost = "—" if name == "bare Flask" else f"{(1 - ratio) * 100:.1f} %"
        print(f"| {name} | {statistics.median(rps[name]):,.0f} | {ratio:.3f} | {cost} |")
    # wrk stops with requests in flight: the server may have answered (and counted) a few more
    print(f"middleware: {int(got)} requests counted on /metrics, {sent} answered to wrk "
          f"({'counted every one' if sent <= got <= sent + args.connections * args.rounds else 'MISMATCH'})")
    if bad:
        print("errors:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
