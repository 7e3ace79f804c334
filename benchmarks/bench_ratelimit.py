"""Rate limiting for three windows with their header values, side by side in one run: the
`limits` library (MemoryStorage and RedisStorage, hit then get_window_stats per window, as the
middleware first did) against this package's memory and Redis paths. Redis round trips are
counted at the server (INFO commandstats). Starts its own redis-server on 127.0.0.1.

    python benchmarks/bench_ratelimit.py [--requests 5000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis
from limits import RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import FixedWindowRateLimiter

from api_token_exporter.core.ratelimit import RateLimiter

LIMITS = {"minute": 10**9, "hour": 10**9, "day": 10**9}
ITEMS = [RateLimitItemPerMinute(10**9), RateLimitItemPerHour(10**9), RateLimitItemPerDay(10**9)]


def limits_path(limiter):
    def one(token):
        out = []
        for item in ITEMS:
            limiter.hit(item, token)
            out.append(limiter.get_window_stats(item, token))
        return out
    return one


def ours_path(limiter):
    return lambda token: limiter.hit(token, LIMITS)


def per_request(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(f"token-{i % 50}")
    return (time.perf_counter() - start) / n


def round_trips_per_request(redis_client, fn, n: int = 200) -> float:
    """Calls the client makes to the server (each one round trip)."""
    calls = {"n": 0}
    original = redis_client.execute_command

    def counting(*a, **kw):
        calls["n"] += 1
        return original(*a, **kw)

    redis_client.execute_command = counting
    try:
        for i in range(n):
            fn(f"rt-{i % 5}")
    finally:
        redis_client.execute_command = original
    return calls["n"] / n


def commands_per_request(client, fn, n: int = 200) -> float:
    """Commands the server executes, those inside Lua scripts included."""
    def total():
        return sum(v["calls"] for k, v in client.info("commandstats").items()
                   if k not in ("cmdstat_info",))
    before = total()
    for i in range(n):
        fn(f"rt-{i % 5}")
    return (total() - before) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if not binary:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        uri = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(uri)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        limits_redis = RedisStorage(uri)
        ours_redis = RateLimiter(uri)
        clients = {"limits RedisStorage": limits_redis.storage,
                   "api-token-exporter redis://": ours_redis.backend.client}
        variants = {
            "limits MemoryStorage": limits_path(FixedWindowRateLimiter(MemoryStorage())),
            "api-token-exporter memory://": ours_path(RateLimiter("memory://")),
            "limits RedisStorage": limits_path(FixedWindowRateLimiter(limits_redis)),
            "api-token-exporter redis://": ours_path(ours_redis),
        }
        times = {name: [] for name in variants}
        for name, fn in variants.items():
            per_request(fn, 200)                       # warm up (and load the Lua script)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                n = args.requests if "Memory" in name or "memory" in name else args.requests // 5
                times[name].append(per_request(fn, n))
        print(f"python {sys.version.split()[0]}, redis-server on loopback, 3 windows with header values, "
              f"median of {args.rounds} rounds")
        print("| variant | µs per request | round trips per request | commands run by Redis |")
        print("|---|---:|---:|---:|")
        for name, fn in variants.items():
            if name in clients:
                rt = f"{round_trips_per_request(clients[name], fn):.0f}"
                cmds = f"{commands_per_request(client, fn):.0f}"
            else:
                rt = cmds = "—"
            print(f"| {name} | {statistics.median(times[name]) * 1e6:.1f} | {rt} | {cmds} |")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
