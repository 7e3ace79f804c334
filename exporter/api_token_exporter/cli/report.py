"""`api-token-exporter report`: the token report from Prometheus as a table, CSV or JSON."""
from __future__ import annotations

import json
import sys
import time

from .common import KEYS_FILE_HELP, command_settings


def register(sub) -> None:
    report = sub.add_parser("report", help="LLM token usage report from Prometheus")
    report.add_argument("--days", type=int, default=30)
    report.add_argument("--start", help="ISO 8601 date or time (default: --days before --end)")
    report.add_argument("--end", help="ISO 8601 date or time (default: now)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--prometheus-url", help="default prometheus_url of the settings ($ATE_PROMETHEUS_URL) "
                                                 "or http://127.0.0.1:9090")
    report.add_argument("--tenant", help="only this tenant's tokens (needs --keys-file)")
    report.add_argument("--keys-file", help=KEYS_FILE_HELP)
    report.add_argument("--config", help="YAML settings file ($ATE_CONFIG): prometheus_url, keys_file")
    report.add_argument("--timeout", type=float, default=30.0, help="seconds per query")
    report.add_argument("--progress", action="store_true", help="show progress even when not a terminal")
    report.add_argument("--compare", choices=("previous",),
                        help="also this period against the one of the same length before it (HTTP requests, "
                             "LLM tokens, cost: absolute and percent change); with --format csv, only that")
    report.set_defaults(func=run)


def run(args) -> int:
    from ..analytics import queries as analytics
    from ..analytics.report import comparison_csv, comparison_table, to_csv, to_table
    settings = command_settings(args, prometheus_url=args.prometheus_url, keys_file=args.keys_file)
    url = settings.prometheus_url or "http://127.0.0.1:9090"
    client = analytics.PrometheusClient(url, args.timeout)
    scope = analytics.Scope()
    if args.tenant:
        from ..core.keystore import KeyStore
        store = KeyStore(settings.keys_file or "keys.yml")
        scope = analytics.Scope([k.id for k in store.all() if k.tenant == args.tenant])
    show_progress = args.progress or sys.stderr.isatty()

    def progress(done, total):
        if show_progress:
            print(f"\rquerying Prometheus {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    try:
        start, end = analytics.resolve_range(str(args.days), args.start, args.end, time.time())
        doc, rows = analytics.tokens_report_rows(client, scope, start, end, progress)
        comparison = None
        if getattr(args, "compare", None):
            comparison = analytics.compare_periods(client, scope, start, end)
    except analytics.AnalyticsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except analytics.PrometheusUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if args.format == "json":
        print(json.dumps({**doc, "comparison": comparison} if comparison else doc, indent=2))
    elif args.format == "csv":
        sys.stdout.write(comparison_csv(comparison) if comparison else to_csv(doc, rows))
    else:
        sys.stdout.write(to_table(doc, rows) + (comparison_table(comparison) if comparison else ""))
    return 0
