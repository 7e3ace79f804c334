"""`api-token-exporter report`: seed 001's token report from Prometheus as a table, CSV or JSON."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time

from . import analytics

CSV_COLUMNS = ["service", "model", "prompt_tokens", "completion_tokens", "total_tokens",
               "request_count", "estimated_cost_usd"]


def to_csv(doc: dict, rows: list) -> str:
    """One row per service and model, then a TOTAL row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["service"], r["model"], r["promptTokens"], r["completionTokens"],
                         r["totalTokens"], r["requestCount"], f'{r["estimatedCost"]:.6f}'])
    s = doc["summary"]
    writer.writerow(["TOTAL", "", s["promptTokens"], s["completionTokens"], s["totalTokens"],
                     sum(r["requestCount"] for r in rows), f'{s["estimatedCost"]:.6f}'])
    return out.getvalue()


def to_table(doc: dict, rows: list) -> str:
    s = doc["summary"]
    tf = s["timeframe"]
    lines = [f"LLM token usage {tf['startDate']} .. {tf['endDate']} ({tf['days']} days)",
             f"total tokens {s['totalTokens']:,} (prompt {s['promptTokens']:,}, completion "
             f"{s['completionTokens']:,}), estimated cost ${s['estimatedCost']:,.4f}", ""]

    def table(header, cells):
        widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)] if cells else [len(h) for h in header]
        fmt = lambda r: "  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w)
                                  for i, (v, w) in enumerate(zip(r, widths)))
        return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells]

    def counts(e):
        return [f"{e['promptTokens']:,}", f"{e['completionTokens']:,}", f"{e['totalTokens']:,}",
                f"{e['requestCount']:,}", f"{e['estimatedCost']:.4f}"]

    header = ["prompt", "completion", "total", "requests", "cost $"]
    lines += ["BY SERVICE AND MODEL"] + table(["service", "model"] + header,
                                              [[r["service"], r["model"]] + counts(r) for r in rows]) + [""]
    lines += ["BY DAY (days with usage)"] + table(["date", ""] + header,
                                                  [[d["date"], ""] + counts(d) for d in doc["byDay"]
                                                   if d["totalTokens"] or d["requestCount"]])
    return "\n".join(lines) + "\n"


def main(args) -> int:
    url = args.prometheus_url or os.environ.get("ATE_PROMETHEUS_URL") or "http://127.0.0.1:9090"
    client = analytics.PrometheusClient(url, args.timeout)
    scope = analytics.Scope()
    if args.tenant:
        from .keystore import KeyStore
        store = KeyStore(args.keys_file)
        scope = analytics.Scope([k.id for k in store.all() if k.tenant == args.tenant])
    show_progress = args.progress or sys.stderr.isatty()

    def progress(done, total):
        if show_progress:
            print(f"\rquerying Prometheus {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        start, end = analytics.resolve_range(str(args.days), args.start, args.end, time.time())
        doc, rows = analytics.tokens_report_rows(client, scope, start, end, progress)
    except analytics.AnalyticsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except analytics.PrometheusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(to_csv(doc, rows) if args.format == "csv" else to_table(doc, rows))
    return 0
