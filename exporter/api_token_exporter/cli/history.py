"""`api-token-exporter import`: past usage records into Prometheus as TSDB blocks."""
from __future__ import annotations

import sys
import time

from .common import command_settings


def register(sub) -> None:
    imp = sub.add_parser("import", help="bring past usage records into Prometheus as TSDB blocks",
                         description="Usage records (CSV, JSON Lines, or a database table or query) into "
                                     "this project's counters and histograms, written as Prometheus TSDB "
                                     "blocks. Columns default to the APIUsage table's: api_key_id, endpoint, "
                                     "method, status_code, response_time (seconds), created_at; optional "
                                     "service, model, prompt_tokens, completion_tokens, cached_tokens, "
                                     "cache_write_tokens, reasoning_tokens (parts of the prompt and completion "
                                     "tokens).")
    imp.add_argument("source", help="a .csv or .jsonl file, or a database URL (sqlite:///usage.db, "
                                    "postgresql+psycopg://user@host/db)")
    imp.add_argument("--table", help="the table to read (database source)")
    imp.add_argument("--query", help="or the SQL query to read (database source)")
    imp.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                     help="where a field is in your data, e.g. --map token=key_name --map time=ts")
    imp.add_argument("--until", default="now", help="the cut-over: rows at or after it are refused, "
                     "live metrics count them (ISO 8601 or Unix seconds; default now)")
    imp.add_argument("--route", action="append", default=[], metavar="TEMPLATE",
                     help="route templates (/items/<id>) for raw paths; unmatched paths become __unmatched__")
    imp.add_argument("--step", type=int, default=60, help="seconds between samples (default %(default)s)")
    imp.add_argument("--duration-unit", choices=("s", "ms"), default="s")
    imp.add_argument("--pricing-file", "--pricing", dest="pricing_file",
                     help="your pricing file for LLM cost, over the price snapshot (default: pricing_file)")
    imp.add_argument("--prices-file", "--prices", dest="prices_file",
                     help="price snapshot (from `prices update`; default: prices_file, or the shipped one)")
    imp.add_argument("--config", help="YAML settings file ($ATE_CONFIG)")
    imp.add_argument("--job", default="api-token-exporter", help="job label (default %(default)s)")
    imp.add_argument("--instance", default="import", help="instance label (default %(default)s)")
    imp.add_argument("--max-series", type=int, default=200_000)
    imp.add_argument("--max-age-days", type=float, default=400,
                     help="refuse rows older than this before the cut-over (default %(default)s, the compose "
                          "stack's retention)")
    imp.add_argument("--prometheus-url", help="with --prometheus-data, the Prometheus that reads it: once it has "
                     "loaded the import, the recording rules are backfilled over the imported range, so "
                     "trends, baselines and forecasts answer at once")
    imp.add_argument("--rules", action="append", default=[], metavar="FILE",
                     help="recording rule files to backfill (default: the rules rendered from the thresholds, "
                          "as `api-token-exporter rules` writes them)")
    imp.add_argument("--thresholds", help="the thresholds file the default rules are rendered from")
    imp.add_argument("--load-timeout", type=float, default=300,
                     help="seconds to wait for Prometheus to load each set of blocks (default %(default)s)")
    where = imp.add_mutually_exclusive_group()
    where.add_argument("--prometheus-data", help="Prometheus's data directory: blocks are moved there")
    where.add_argument("--output", default="import-blocks", help="else, where to write the blocks")
    imp.add_argument("--keys-file", help="refuse rows whose key id is not in this key file (without it, "
                                         "every key id is imported, and the summary names them)")
    imp.add_argument("--rejected", default="import-rejected.csv",
                     help="rejected rows and reasons, by line (a database's: by primary key)")
    imp.add_argument("--dry-run", action="store_true", help="read and validate only")
    imp.add_argument("--progress", action="store_true", help="progress on stderr even when not a terminal")
    imp.set_defaults(func=run)


def run(args) -> int:
    from ..analytics import importer as history
    from ..core.pricing import Pricing, PricingError
    columns = {}
    for item in args.map:
        name, _, column = item.partition("=")
        if name not in history.DEFAULT_COLUMNS or not column:
            print(f"error: --map {item!r}: expected FIELD=COLUMN with FIELD one of "
                  f"{', '.join(history.DEFAULT_COLUMNS)}", file=sys.stderr)
            return 2
        columns[name] = column
    if args.prometheus_url and not args.prometheus_data:
        print("error: --prometheus-url needs --prometheus-data: the rules are evaluated from the blocks that "
              "Prometheus holds", file=sys.stderr)
        return 2
    result = history.ImportResult()
    where = "row" if "://" in args.source else "line"
    output = args.prometheus_data or args.output
    try:
        until = None if args.until == "now" else history.parse_time(args.until)
        settings = command_settings(args, pricing_file=args.pricing_file, prices_file=args.prices_file)
        pricing = Pricing.load(settings.pricing_file, settings.prices_file)
        known = None
        if args.keys_file:
            from ..core.keystore import KeyStore, KeyStoreError
            try:
                known = [k.id for k in KeyStore(args.keys_file).all()]
            except KeyStoreError as exc:
                raise ValueError(f"--keys-file: {exc}") from None
        history.run_import(
            args.source, output, table=args.table, query=args.query, columns=columns, until=until,
            step=args.step, duration_unit=args.duration_unit, pricing=pricing, job=args.job,
            instance=args.instance, routes=args.route, max_series=args.max_series,
            max_age_days=args.max_age_days, progress=history.progress_printer(args.progress or sys.stderr.isatty()),
            dry_run=args.dry_run, result=result, known_tokens=known)
        if args.prometheus_url and result.blocks:
            rule_blocks = backfill_rules(args, result)
            print(f"\nrecording rules backfilled from {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(result.first))}"
                  f" to {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(result.last))}: {len(rule_blocks)} "
                  "block(s)", file=sys.stderr)
    except (history.ImportFailed, PricingError, ValueError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:                                   # what was read is reported, even on failure
        history.write_rejected(args.rejected, result.rejected, where)
    if result.rejected:
        shown = "; ".join(f"{where} {r.line}: {r.reason}" for r in result.rejected[:3])
        print(f"\n{len(result.rejected)} rows rejected, listed with reasons in {args.rejected} ({shown}"
              f"{'; ...' if len(result.rejected) > 3 else ''})", file=sys.stderr)
    span = ""
    if result.first is not None:
        fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))   # noqa: E731
        span = f" from {fmt(result.first)} to {fmt(result.last)}"
    blank = f", {result.blank} blank line{'s' if result.blank > 1 else ''} skipped" if result.blank else ""
    print(f"\nimported {result.accepted} of {result.rows} rows{span} ({len(result.rejected)} rejected{blank}): "
          f"{result.series} series, {result.samples} samples, {len(result.blocks)} block(s): "
          f"{', '.join(result.blocks) or 'none'}", file=sys.stderr)
    if result.tokens:
        ids = sorted(result.tokens, key=lambda t: -result.tokens[t])
        print(f"key ids: {len(ids)} ({', '.join(f'{t} {result.tokens[t]:,}' for t in ids[:10])}"
              f"{f' and {len(ids) - 10} more' if len(ids) > 10 else ''})"
              + ("" if args.keys_file else "; --keys-file refuses rows of ids not in a key file"), file=sys.stderr)
    if result.blocks and not args.prometheus_data:
        print("next: move these block directories into Prometheus's data directory "
              "(--storage.tsdb.path); it loads them within a minute", file=sys.stderr)
    return 0 if result.accepted or not result.rows else 1


def backfill_rules(args, result) -> list:
    """The recording rules over the imported range, from the Prometheus that loaded the import
    (rule_backfill.py), a dependency level at a time."""
    import tempfile
    from ..analytics import rule_backfill
    with tempfile.TemporaryDirectory(prefix="ate-rules-") as rendered:
        rules = args.rules
        if not rules:
            from ..mixin.rules import write
            from ..mixin.thresholds import default_thresholds_file, load_thresholds
            rules = write(load_thresholds(args.thresholds or default_thresholds_file()), rendered)
        rule_backfill.wait_for_series(args.prometheus_url, ["apitoken_requests_total"],
                                      min(result.last, result.first + 3600), args.load_timeout,
                                      what="the imported blocks")
        return rule_backfill.backfill_rules(args.prometheus_url, rules, result.first, result.last,
                                            args.prometheus_data, load_timeout=args.load_timeout)
