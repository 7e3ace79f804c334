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


def to_csv(doc: dict) -> str:
    """One row per service and model, then a TOTAL row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = doc.get("_rows", [])
    for row in rows:
        writer.writerow([row[c] for c in CSV_COLUMNS])
    s = doc["summary"]
    writer.writerow(["TOTAL", "", s["promptTokens"], s["completionTokens"], s["totalTokens"],
                     sum(r["request_count"] for r in rows), f'{s["estimatedCost"]:.6f}'])
    return out.getvalue()


def to_table(doc: dict) -> str:
    s = doc["summary"]
    tf = s["timeframe"]
    lines = [f"LLM token usage {tf['startDate']} .. {tf['endDate']} ({tf['days']} days)",
             f"total tokens {s['totalTokens']:,} (prompt {s['promptTokens']:,}, completion "
             f"{s['completionTokens']:,}), estimated cost ${s['estimatedCost']:,.4f}", ""]

    def table(header, rows):
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
        fmt = lambda r: "  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w)
                                  for i, (v, w) in enumerate(zip(r, widths)))
        return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]

    rows = [[r["service"], r["model"], f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}",
             f"{r['total_tokens']:,}", f"{r['request_count']:,}", f"{float(r['estimated_cost_usd']):.4f}"]
            for r in doc.get("_rows", [])]
    lines += ["BY SERVICE AND MODEL"] + table(["service", "model", "prompt", "completion", "total",
                                               "requests", "cost $"], rows) + [""]
    day_rows = [[d["date"], "", f"{d['promptTokens']:,}", f"{d['completionTokens']:,}",
                 f"{d['totalTokens']:,}", f"{d['requestCount']:,}", f"{d['estimatedCost']:.4f}"]
                for d in doc["byDay"] if d["totalTokens"] or d["requestCount"]]
    lines += ["BY DAY (days with usage)"] + table(["date", "", "prompt", "completion", "total",
                                                    "requests", "cost $"], day_rows)
    return "\n".join(lines) + "\n"


def service_model_rows(client, scope, start, end) -> list:
    """Per service and model rows for the CSV/table (byModel alone merges services)."""
    parts = analytics._llm_parts(scope.matcher, start, end, "service, model")
    rows = {}
    for labels, value in client.query(analytics._tagged(parts), end):
        key = (labels.get("service", ""), labels.get("model", ""))
        row = rows.setdefault(key, {"service": key[0], "model": key[1], "prompt_tokens": 0,
                                    "completion_tokens": 0, "total_tokens": 0, "request_count": 0,
                                    "estimated_cost_usd": 0.0})
        q = labels.get("q")
        if q == "tokens":
            n = int(round(value))
            row["prompt_tokens" if labels.get("type") == "input" else "completion_tokens"] += n
            row["total_tokens"] += n
        elif q == "requests":
            row["request_count"] += int(round(value))
        elif q == "cost":
            row["estimated_cost_usd"] += value
    for row in rows.values():
        row["estimated_cost_usd"] = f"{row['estimated_cost_usd']:.6f}"
    return [rows[k] for k in sorted(rows)]


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
        doc = analytics.tokens_report(client, scope, start, end, progress)
        rows = service_model_rows(client, scope, start, end) if args.format != "json" else []
    except analytics.AnalyticsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except analytics.PrometheusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        doc["_rows"] = rows
        sys.stdout.write(to_csv(doc) if args.format == "csv" else to_table(doc))
    return 0
