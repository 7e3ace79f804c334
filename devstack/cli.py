"""The dev stack's commands, from a checkout: ``python -m devstack demo|backfill|sink``.

    python -m devstack demo        # what `make demo` runs
    python -m devstack backfill    # synthetic history for the demo's keys (`make analytics-seed`)
    python -m devstack sink        # a webhook and SMTP sink for notifications

The installed package (``api-token-exporter``) carries none of this: the demo needs the
repository's Prometheus and Alertmanager configuration, and its helpers are for trying and testing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .demo import expected_alerts
from .synthetic import STEP


def run_demo_command(args) -> int:
    from api_token_exporter.core.errors import ConfigError, optional_import

    from . import stack
    try:
        optional_import("requests", "demo", "The demo")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not stack.in_checkout():
        print("error: the demo runs Prometheus and Alertmanager with the configuration and rules of "
              "the repository (prometheus/, alertmanager/), which an installed package does not "
              f"carry: run it from a checkout (git clone, then `make demo`). Looked in {stack.ROOT}",
              file=sys.stderr)
        return 2
    from .demo import run_demo
    ingest_token = os.environ.get("ATE_INGEST_TOKEN")
    run_demo(host=args.host, port=args.port, duration=args.duration,
             exporter_port=None if args.no_exporter or args.sidecar_url else args.exporter_port,
             sidecar_url=args.sidecar_url, ingest_token=ingest_token,
             admin_token=os.environ.get("ATE_ADMIN_TOKEN"),
             data_dir=args.data_dir, traffic=not args.no_traffic,
             storage_uri=args.storage_uri or "memory://", speed=args.speed,
             prometheus_port=None if args.no_prometheus else args.prometheus_port,
             alertmanager_port=None if args.no_alertmanager else args.alertmanager_port,
             sink_port=args.sink_port, scrape_interval=args.scrape_interval, keep_data=args.keep_data,
             proxy_port=None if args.no_proxy else args.proxy_port,
             backfill_days=0 if args.no_backfill else args.backfill_days)
    return 0


def run_backfill(args) -> int:
    from api_token_exporter.analytics import importer as history, rule_backfill
    from api_token_exporter.core.pricing import Pricing, PricingError

    from . import synthetic
    problem = None
    if args.prometheus_url and not args.prometheus_data:
        problem = "--prometheus-url needs --prometheus-data: the rules are evaluated from the blocks Prometheus holds"
    elif not 1 <= args.step <= history.HEARTBEAT or 86400 % args.step:
        problem = f"--step must divide a day and be at most {history.HEARTBEAT} seconds"
    elif args.days < 1:
        problem = "--days must be at least 1"
    try:
        end = time.time() if args.until == "now" else history.parse_time(args.until)
        pricing = Pricing.load(args.pricing, args.prices)
    except (ValueError, PricingError) as exc:
        problem = problem or str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = end - args.days * 86400
    progress = history.progress_printer(args.progress or sys.stderr.isatty())
    try:
        plan, result = synthetic.write_history(args.prometheus_data or args.output, start, end, args.step, pricing,
                                               args.seed, args.job, args.instance, progress)
        rule_blocks = []
        if args.prometheus_url:
            from .stack import ROOT
            rules = args.rules or [os.path.join(ROOT, "prometheus", "rules", f)
                                   for f in ("apitoken-recording.yml", "apitoken-anomalies.yml")]
            rule_blocks = rule_backfill.backfill_rules(args.prometheus_url, rules, start, end,
                                                       args.prometheus_data or args.output,
                                                       load_timeout=args.load_timeout)
    except history.ImportFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(f"\nbackfilled {args.days} days for {len(synthetic.PROFILES)} demo keys: {plan.requests:,} requests, "
          f"{result.samples:,} samples, {len(result.blocks)} block(s)"
          f"{f', recording rules in {len(rule_blocks)} more' if args.prometheus_url else ''}; anomalies: "
          + ", ".join(f"{a.kind} on {a.token} {a.days_ago:g} days ago for {a.hours:g} h" for a in plan.anomalies),
          file=sys.stderr)
    return 0


def run_sink(args) -> int:
    from .sinks import SmtpSink, WebhookSink
    webhook = WebhookSink(args.host, args.port)
    if args.smtp_port:
        smtp = SmtpSink(args.host, args.smtp_port).start()
        webhook.mail_source = smtp.summaries
    webhook.start()
    print(f"webhook sink on {webhook.url}/ (POST anything; GET / lists it"
          f"{', GET /mail lists mail on SMTP port %d' % args.smtp_port if args.smtp_port else ''})",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack",
                                     description="The demo stack of api-token-exporter, from a checkout.")
    sub = parser.add_subparsers(dest="command", required=True)
    epilog = expected_alerts()
    back = sub.add_parser("backfill", help="synthetic history for the demo's keys, as TSDB blocks",
                          description="Realistic past traffic for the demo's keys (daily and weekly cycles, "
                                      "growth, LLM use, a few anomalies) written as Prometheus TSDB blocks; with "
                                      "--prometheus-url, the recording rules are backfilled over it too.")
    back.add_argument("--days", type=int, default=30)
    back.add_argument("--until", default="now", help="end of the history (ISO 8601 or Unix seconds)")
    back.add_argument("--step", type=int, default=STEP, help="seconds between samples (default %(default)s)")
    back.add_argument("--seed", type=int, default=42)
    back.add_argument("--pricing", help="your pricing file for LLM cost, over the price snapshot")
    back.add_argument("--prices", help="price snapshot (from `prices update`; default: the shipped one)")
    back.add_argument("--job", default="api-token-exporter")
    back.add_argument("--instance", default="backfill")
    where = back.add_mutually_exclusive_group()
    where.add_argument("--prometheus-data", help="Prometheus's data directory: blocks are moved there")
    where.add_argument("--output", default="backfill-blocks", help="else, where to write the blocks")
    back.add_argument("--prometheus-url", help="a Prometheus holding the history: backfill the recording rules")
    back.add_argument("--rules", nargs="+", help="recording rule files (with --prometheus-url; default: "
                      "prometheus/rules/apitoken-recording.yml and apitoken-anomalies.yml of the checkout)")
    back.add_argument("--load-timeout", type=float, default=600,
                      help="seconds to wait for Prometheus to load one level of rule blocks before the next "
                           "(it does about once a minute, later while it compacts; default %(default)s)")
    back.add_argument("--progress", action="store_true")
    back.set_defaults(func=run_backfill)

    demo = sub.add_parser("demo", help="run a demo API with traffic so every metric moves",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--exporter-port", type=int, default=9464,
                      help="port of the sidecar exporter that receives ingest events")
    demo.add_argument("--no-exporter", action="store_true")
    demo.add_argument("--data-dir", default="demo-data")
    demo.add_argument("--backfill-days", type=int, default=30,
                      help="days of synthetic history for the demo's keys (default %(default)s)")
    demo.add_argument("--no-backfill", action="store_true", help="start with no history")
    demo.add_argument("--keep-data", action="store_true",
                      help="keep Prometheus and Alertmanager data of earlier runs (default: start afresh)")
    demo.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    demo.add_argument("--no-traffic", action="store_true")
    demo.add_argument("--speed", type=float, default=1.0, help="traffic speed factor")
    demo.add_argument("--storage-uri")
    demo.add_argument("--sidecar-url", help="post ingest events to this exporter instead of starting one "
                                            "(its ingest token in $ATE_INGEST_TOKEN)")
    demo.add_argument("--prometheus-port", type=int, default=9090)
    demo.add_argument("--no-prometheus", action="store_true", help="do not start a local Prometheus")
    demo.add_argument("--alertmanager-port", type=int, default=9093)
    demo.add_argument("--no-alertmanager", action="store_true")
    demo.add_argument("--sink-port", type=int, default=8025, help="webhook/Slack/mail sink page")
    demo.add_argument("--scrape-interval", default="5s")
    demo.add_argument("--proxy-port", type=int, default=8088,
                      help="the proxy with a pool of upstream tokens, in front of a fake GitHub")
    demo.add_argument("--no-proxy", action="store_true")
    demo.set_defaults(func=run_demo_command)

    sink = sub.add_parser("sink", help="run a webhook (and optional SMTP) sink for notifications")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=8080)
    sink.add_argument("--smtp-port", type=int, help="also accept mail on this port")
    sink.set_defaults(func=run_sink)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

