"""Per-request cost of the middleware against bare Flask and prometheus-flask-exporter.

All variants run in this one process, each request driven through the WSGI callable exactly
as a server would (start_response, iterate, close), every variant once per round in a new
random order (paired.py). Reports the median over rounds of the mean time per request, the
overhead over bare Flask, and the median over rounds of that overhead against
prometheus-flask-exporter's in the same round.

    python benchmarks/bench_middleware.py [--requests 2000] [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from flask import Flask, jsonify
from prometheus_client import CollectorRegistry
from werkzeug.test import EnvironBuilder

from api_token_exporter import TokenAnalytics
from api_token_exporter.core.keystore import add_key
from paired import shuffled_rounds, table


def make_flask() -> Flask:
    app = Flask("bench")

    @app.get("/items/<int:item_id>")
    def item(item_id):
        return jsonify(id=item_id)

    return app


def variants(keys_file: str):
    bare = make_flask()

    pfe = make_flask()
    from prometheus_flask_exporter import PrometheusMetrics
    PrometheusMetrics(pfe, registry=CollectorRegistry())

    full = make_flask()   # auth + 3 memory windows with headers + all per-token metrics
    TokenAnalytics(full, keys_file=keys_file, rate_limits={"minute": 10**9, "hour": 10**9, "day": 10**9})

    observe = make_flask()  # metrics only: identify the token, enforce nothing
    TokenAnalytics(observe, keys_file=keys_file, observe_only=True)
    return {"bare Flask": bare, "prometheus-flask-exporter": pfe,
            "api-token-exporter (full)": full, "api-token-exporter (observe-only)": observe}


def run_once(app, environ_template, n: int) -> float:
    def start_response(status, headers, exc_info=None):
        return None

    wsgi = app  # Flask.__call__ -> wsgi_app, which TokenAnalytics replaced
    started = time.perf_counter()
    for _ in range(n):
        result = wsgi(dict(environ_template), start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close:
            close()
    return (time.perf_counter() - started) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        keys_file = os.path.join(tmp, "keys.yml")
        raw = add_key(keys_file, "bench")
        apps = variants(keys_file)
        environ = EnvironBuilder(path="/items/7", headers={"X-API-Key": raw}).get_environ()
        for app in apps.values():          # warm up, and check every variant answers 200
            captured = {}
            app(dict(environ), lambda s, h, e=None: captured.setdefault("status", s))
            assert captured["status"].startswith("200"), captured
            run_once(app, environ, 200)
        times = shuffled_rounds(apps, args.rounds, lambda name: run_once(apps[name], environ, args.requests))

    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.requests} requests in shuffled "
          f"order, median of per-round means")
    print("\n".join(table(times, "bare Flask", "prometheus-flask-exporter")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
