"""Per-request cost of the ASGI middleware against bare FastAPI and
prometheus-fastapi-instrumentator (the usual choice for FastAPI metrics).

All variants run in this one process and one event loop, each request driven through the
app's ASGI callable as a server would (a new scope, ``receive`` giving the empty body, ``send``
taking the start and the body), every variant once per round in a new random order (paired.py).
Reports the median over rounds of the mean time per request, the overhead over bare FastAPI,
and the median over rounds of that overhead against prometheus-fastapi-instrumentator's.

    python benchmarks/bench_asgi.py [--requests 2000] [--rounds 15]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import fastapi
import starlette
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api_token_exporter.web.asgi import TokenAnalytics
from api_token_exporter.core.keystore import add_key
from paired import shuffled_order, table


def make_fastapi() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"id": item_id}

    return app


def variants(keys_file: str):
    bare = make_fastapi()

    pfi = make_fastapi()
    from prometheus_fastapi_instrumentator import Instrumentator
    Instrumentator(registry=CollectorRegistry()).instrument(pfi)

    full = make_fastapi()   # auth + 3 memory windows with headers + all per-token metrics
    full.add_middleware(TokenAnalytics, keys_file=keys_file,
                        rate_limits={"minute": 10**9, "hour": 10**9, "day": 10**9})

    observe = make_fastapi()  # metrics only: identify the token, enforce nothing
    observe.add_middleware(TokenAnalytics, keys_file=keys_file, observe_only=True)
    return {"bare FastAPI": bare, "prometheus-fastapi-instrumentator": pfi,
            "api-token-exporter (full)": full, "api-token-exporter (observe-only)": observe}


def scope_template(raw_key: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/items/7", "raw_path": b"/items/7",
            "root_path": "", "query_string": b"",
            "headers": [(b"host", b"bench.local"), (b"user-agent", b"bench"), (b"accept", b"*/*"),
                        (b"x-api-key", raw_key.encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def _receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message):
    return None


async def run_once(app, template: dict, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        scope = dict(template)           # a server makes a new scope (and state) per request
        scope["state"] = {}
        await app(scope, _receive, _send)
    return (time.perf_counter() - started) / n


async def check(app, template: dict) -> int:
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
    await app(dict(template, state={}), _receive, send)
    return statuses[0]


async def bench(apps, template, rounds: int, requests: int):
    for app in apps.values():          # warm up, and check every variant answers 200
        status = await check(app, template)
        assert status == 200, status
        await run_once(app, template, 200)
    times = {name: [] for name in apps}
    for name in shuffled_order(apps, rounds):
        times[name].append(await run_once(apps[name], template, requests))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.yml")
        raw = add_key(keys_file, "bench")
        apps = variants(keys_file)
        times = asyncio.run(bench(apps, scope_template(raw), args.rounds, args.requests))

    print(f"python {sys.version.split()[0]}, fastapi {fastapi.__version__}, starlette "
          f"{starlette.__version__}, {args.rounds} rounds x {args.requests} requests in shuffled order, "
          f"median of per-round means")
    print("\n".join(table(times, "bare FastAPI", "prometheus-fastapi-instrumentator")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
