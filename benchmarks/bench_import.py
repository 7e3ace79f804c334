"""`api-token-exporter import` throughput: rows per second for a usage table shaped like the
APIUsage table (30 days, 50 keys, 10 route templates, 30 % of rows with LLM usage), read from
CSV, validated and aggregated (a dry run), then the whole import with its TSDB blocks
(OpenMetrics text, then promtool).

    python benchmarks/bench_import.py [--rows 1000000] [--days 30]
    python benchmarks/bench_import.py --rows 100000 --against /tmp/old   # side by side with an
        # older revision's package (git worktree add /tmp/old REV), each phase run by each in
        # turn, the order shuffled per round
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import statistics
import subprocess
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


def timed(source: str, end: float, out: str, dry_run: bool) -> tuple:
    """(seconds, result) of one import by the package on sys.path."""
    started = time.perf_counter()
    result = history.run_import(source, out, pricing=Pricing.load(), until=end + 1, dry_run=dry_run)
    return time.perf_counter() - started, result


def in_child(exporter_dir: str, source: str, end: float, out: str, dry_run: bool) -> float:
    """Seconds of one import by the package in ``exporter_dir``, in a process of its own."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
            "import bench_import; t, r = bench_import.timed(sys.argv[3], float(sys.argv[4]), sys.argv[5], "
            "sys.argv[6] == '1'); print(json.dumps([t, r.accepted, r.samples]))")
    done = subprocess.run([sys.executable, "-c", code, exporter_dir, os.path.dirname(os.path.abspath(__file__)),
                           source, repr(end), out, "1" if dry_run else "0"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"import by {exporter_dir} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="an older checkout (its exporter/ directory is imported) to run side by side")
    parser.add_argument("--rounds", type=int, default=2, help="rounds with --against (default %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "usage.csv")
        end = time.time() - 3600
        write_rows(source, args.rows, args.days, end)
        size = os.path.getsize(source) / 1e6
        if args.against:
            return side_by_side(args, source, end, size, tmp)
        read, dry = timed(source, end, os.path.join(tmp, "unused"), True)
        whole, full = timed(source, end, os.path.join(tmp, "blocks"), False)
        assert dry.accepted == full.accepted == args.rows, (dry.accepted, full.accepted)
    print(f"{args.rows:,} rows ({size:.0f} MB of CSV) over {args.days} days: {full.series:,} series, "
          f"{full.samples:,} samples, {len(full.blocks)} block(s); Python {sys.version.split()[0]}\n")
    print("| phase | seconds | rows per second |")
    print("|---|---:|---:|")
    print(f"| read, validate, aggregate (dry run) | {read:.1f} | {args.rows / read:,.0f} |")
    print(f"| whole import (+ OpenMetrics text, promtool blocks) | {whole:.1f} | {args.rows / whole:,.0f} |")
    return 0


def side_by_side(args, source: str, end: float, size: float, tmp: str) -> int:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exporter")
    versions = {"this checkout": here, f"{args.against}": os.path.join(args.against, "exporter")}
    seconds = {(v, dry): [] for v in versions for dry in (True, False)}
    written = {}
    runs = [(v, dry) for _ in range(args.rounds) for v, dry in random.sample(list(seconds), len(seconds))]
    for n, (version, dry) in enumerate(runs):
        took, accepted, samples = in_child(versions[version], source, end, os.path.join(tmp, f"out-{n}"), dry)
        assert accepted == args.rows, (version, accepted)
        seconds[(version, dry)].append(took)
        if not dry:
            written[version] = samples
    print(f"{args.rows:,} rows ({size:.0f} MB of CSV) over {args.days} days, {args.rounds} rounds in shuffled "
          f"order, median seconds; samples written: {', '.join(f'{n:,}' for n in written.values())}; Python {sys.version.split()[0]}\n")
    print("| package | dry run (s) | dry run, rows per second | whole import (s) | whole import, rows per second |")
    print("|---|---:|---:|---:|---:|")
    for version in versions:
        dry, whole = (statistics.median(seconds[(version, d)]) for d in (True, False))
        print(f"| {version} | {dry:.1f} | {args.rows / dry:,.0f} | {whole:.1f} | {args.rows / whole:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
