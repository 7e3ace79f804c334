"""`api-token-exporter report`: the token report from Prometheus as a table, CSV or JSON;
with ``--compare previous``, the period against the one before it."""
from __future__ import annotations

import csv
import io

from . import queries as analytics
from .digest import signed

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


COMPARISON_COLUMNS = ["metric", "current", "previous", "change", "change_percent"]


def _number(name: str, value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if name == "cost" else str(value)


def comparison_csv(comparison: dict) -> str:
    """One row per compared number: this period, the previous one, the change and its percent
    (empty when the previous period had nothing)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COMPARISON_COLUMNS)
    for name in analytics.COMPARED:
        c = comparison[name]
        writer.writerow([name, _number(name, c["current"]), _number(name, c["previous"]),
                         _number(name, c["change"]),
                         "" if c["changePercent"] is None else f'{c["changePercent"]:.2f}'])
    return out.getvalue()


def comparison_table(comparison: dict) -> str:
    q = comparison["previousPeriod"]
    lines = ["", f"AGAINST THE PREVIOUS PERIOD {q['start']} .. {q['end']}"]
    rows = [("", "this period", "previous", "change")]
    labels = {"requests": "HTTP requests", "tokens": "LLM tokens", "cost": "cost $"}
    for name in analytics.COMPARED:
        c = comparison[name]
        fmt = (lambda v: f"{v:,.4f}") if name == "cost" else (lambda v: f"{v:,}")
        rows.append((labels[name], fmt(c["current"]), fmt(c["previous"]), signed(c, name == "cost")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines) + "\n"
