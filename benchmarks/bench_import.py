"""`api-token-exporter import` throughput: rows per second for a usage table shaped like the
APIUsage table (30 days, 50 keys, 10 route templates, 30 % of rows with LLM usage), read from
CSV, validated and aggregated (a dry run), then the whole import with its TSDB blocks
(OpenMetrics text, then promtool).

    python benchmarks/bench_import.py [--rows 1000000] [--days 30]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import random
import sys
import tempfile
import time

from api_token_exporter.analytics import importer as history
from api_token_exporter.core.pricing import Pricing

ROUTES = [f"/api/v1/{name}" for name in ("items", "items/{id}", "orders", "orders/{id}", "users",
                                          "users/{id}", "search", "chat", "reports", "health")]
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5")]


def write_rows(path: str, n: int, days: int, end: float) -> None:
    rnd = random.Random(1)
    start = end - days * 86400
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "api_key_id", "endpoint", "method", "status_code", "response_time", "created_at",
                    "service", "model", "prompt_tokens", "completion_tokens"])
        for i in range(n):
            t = dt.datetime.fromtimestamp(start + (end - start) * i / n, dt.timezone.utc)
            llm = rnd.random() < 0.3
            service, model = rnd.choice(MODELS) if llm else ("", "")
            w.writerow([i, rnd.randint(1, 50), rnd.choice(ROUTES), rnd.choice(("GET", "GET", "POST")),
                        rnd.choice((200,) * 9 + (500,)), f"{rnd.uniform(0.001, 2):.4f}",
                        t.replace(tzinfo=None).isoformat(timespec="seconds"), service, model,
                        rnd.randint(1, 2000) if llm else "", rnd.randint(1, 1000) if llm else ""])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    pricing = Pricing.load()
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "usage.csv")
        end = time.time() - 3600
        write_rows(source, args.rows, args.days, end)
        size = os.path.getsize(source) / 1e6
        started = time.perf_counter()
        dry = history.run_import(source, os.path.join(tmp, "unused"), pricing=pricing, until=end + 1,
                                 dry_run=True)
        read = time.perf_counter() - started
        started = time.perf_counter()
        full = history.run_import(source, os.path.join(tmp, "blocks"), pricing=pricing, until=end + 1)
        whole = time.perf_counter() - started
        assert dry.accepted == full.accepted == args.rows, (dry.accepted, full.accepted)
    print(f"{args.rows:,} rows ({size:.0f} MB of CSV) over {args.days} days: {full.series:,} series, "
          f"{full.samples:,} samples, {len(full.blocks)} block(s); Python {sys.version.split()[0]}\n")
    print("| phase | seconds | rows per second |")
    print("|---|---:|---:|")
    print(f"| read, validate, aggregate (dry run) | {read:.1f} | {args.rows / read:,.0f} |")
    print(f"| whole import (+ OpenMetrics text, promtool blocks) | {whole:.1f} | {args.rows / whole:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
