"""Command line: `api-token-exporter keys|serve|import|demo|...`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

DEFAULT_KEYS_FILE = os.environ.get("ATE_KEYS_FILE", "keys.yml")


def _window_limits(args) -> dict:
    return {w: getattr(args, w) for w in ("minute", "hour", "day") if getattr(args, w) is not None}


def cmd_keys(args) -> int:
    from .keystore import KeyStoreError, add_key, load_keys, rotate_key, set_active, update_key
    try:
        if args.keys_cmd == "add":
            budget = {p: v for p, v in (("daily", args.daily_budget),
                                        ("monthly", args.monthly_budget)) if v is not None}
            raw = add_key(args.file, args.id, name=args.name, tenant=args.tenant,
                          rate_limits=_window_limits(args), budget_usd=budget,
                          expires_at=args.expires, anomaly_sensitivity=args.anomaly_sensitivity or "",
                          description=args.description)
            print(f"added {args.id} to {args.file}", file=sys.stderr)
            print("the key is shown this once; store it now:", file=sys.stderr)
            print(raw)
        elif args.keys_cmd == "list":
            keys = load_keys(args.file) if os.path.exists(args.file) else []
            rows = [("ID", "NAME", "TENANT", "KEY", "ACTIVE", "EXPIRES", "LIMITS m/h/d", "ROTATION")]
            for k in keys:
                limits = "/".join(str(k.rate_limits.get(w, "-")) for w in ("minute", "hour", "day"))
                rows.append((k.id, k.name, k.tenant, k.masked or "-", "yes" if k.active else "no",
                             k.expires_at.isoformat() if k.expires_at else "-", limits, _rotation(k)))
            widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        elif args.keys_cmd in ("revoke", "activate"):
            key = set_active(args.file, args.id, args.keys_cmd == "activate")
            print(f"{key.id} is now {'active' if key.active else 'inactive'}")
        elif args.keys_cmd == "rotate":
            from .rulegen import ThresholdError, seconds
            try:
                grace = seconds(args.grace) if args.grace not in ("0", "0s") else 0
            except ThresholdError:
                print(f"error: --grace must be a duration such as 24h, 7d or 0, got {args.grace!r}", file=sys.stderr)
                return 2
            raw, key = rotate_key(args.file, args.id, grace)
            if key.previous is not None:
                print(f"rotated {key.id}: the old secret {key.previous.masked} works until "
                      f"{key.previous.valid_until.isoformat()}", file=sys.stderr)
            else:
                print(f"rotated {key.id}: the old secret is refused from now on", file=sys.stderr)
            print("the new key is shown this once; store it now:", file=sys.stderr)
            print(raw)
        elif args.keys_cmd == "update":
            key = update_key(args.file, args.id, name=args.name, tenant=args.tenant, description=args.description,
                             anomaly_sensitivity=args.anomaly_sensitivity, expires_at=args.expires)
            print(f"updated {key.id}")
        elif args.keys_cmd == "show":
            return _show_key(args)
    except (KeyStoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _rotation(key) -> str:
    if key.previous is None:
        return "-"
    if key.previous_valid():
        return f"old {key.previous.masked} valid until {key.previous.valid_until.isoformat()}"
    return f"old {key.previous.masked} refused since {key.previous.valid_until.isoformat()}"


def _show_key(args) -> int:
    """One key's details, and its usage from Prometheus when there is one to ask."""
    from .keystore import load_keys
    key = next((k for k in (load_keys(args.file) if os.path.exists(args.file) else []) if k.id == args.id), None)
    if key is None:
        print(f"error: no key with id {args.id!r} in {args.file}", file=sys.stderr)
        return 2

    def when(t):
        return t.isoformat() if t else "-"
    lines = [("id", key.id), ("name", key.name or "-"), ("tenant", key.tenant or "-"),
             ("description", key.description or "-"), ("key", key.masked or "-"),
             ("active", "yes" if key.active else "no"), ("expires", when(key.expires_at)),
             ("created", when(key.created_at)), ("updated", when(key.updated_at)),
             ("last rotated", when(key.last_rotated_at)), ("rotation", _rotation(key)),
             ("limits", ", ".join(f"{w} {n}" for w, n in key.rate_limits.items()) or "the defaults"),
             ("budget", ", ".join(f"{p} ${v:g}" for p, v in key.budget_usd.items()) or "-")]
    url = args.prometheus_url or os.environ.get("ATE_PROMETHEUS_URL")
    if url:
        import datetime as dt
        import time as _time
        from .analytics import PrometheusClient, PrometheusUnavailable
        client = PrometheusClient(url, 10.0)
        from .rulegen import exact_increase
        token = key.id.replace("\\", "\\\\").replace('"', '\\"')
        requests_of = f'apitoken_requests_total{{token="{token}"}}'
        queries = (("requests, 24h", f"sum({exact_increase(requests_of, '1d', '.+')})"),
                   ("requests, 30 days", f"sum({exact_increase(requests_of, '30d', '.+')})"),
                   ("last used", f'max(apitoken_token_last_used_timestamp_seconds{{token="{token}"}})'),
                   ("old secret used, 24h", "sum({})".format(exact_increase(
                       f'apitoken_key_old_secret_requests_total{{token="{token}"}}', "1d", ".+"))))
        for label, expr in queries:
            try:
                result = client.query(expr, _time.time())
            except PrometheusUnavailable as exc:
                lines.append(("usage", f"Prometheus unavailable: {exc}"))
                break
            value = result[0][1] if result else None
            if label == "last used":
                shown = "never" if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc).isoformat()
            else:
                shown = f"{round(value or 0):,}"
            lines.append((label, shown))
    else:
        lines.append(("usage", "give --prometheus-url (or ATE_PROMETHEUS_URL) to see it"))
    width = max(len(k) for k, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)}  {value}")
    return 0


def _settings_env(args) -> dict:
    env = {}
    if args.config:
        env["ATE_CONFIG"] = os.path.abspath(args.config)
    if args.keys_file:
        env["ATE_KEYS_FILE"] = os.path.abspath(args.keys_file)
    if args.storage_uri:
        env["ATE_STORAGE_URI"] = args.storage_uri
    if args.state_dir:
        env["ATE_STATE_DIR"] = os.path.abspath(args.state_dir)
    return env


def cmd_serve(args) -> int:
    from .config import ConfigError, load_settings
    from .server import run_gunicorn
    os.environ.update(_settings_env(args))
    try:
        settings = load_settings()
        if settings.metrics_port is not None and args.workers > 1:
            raise ConfigError(f"metrics_port {settings.metrics_port} cannot be served by {args.workers} "
                              "workers; scrape the metrics path on --port instead (any worker answers "
                              "with the sum of all of them), or run one worker")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"api-token-exporter on http://{args.host}:{args.port}  "
          f"(/metrics, /healthz{', /v1/events' if settings.ingest_token else ''}"
          f"{', /admin/stats' if settings.admin_token else ''}); {args.workers} worker(s), "
          f"{args.threads} thread(s) each; counters "
          f"{'kept in ' + settings.state_dir if settings.state_dir else 'start at 0 (no state_dir)'}",
          file=sys.stderr, flush=True)
    return run_gunicorn("api_token_exporter.server:app_from_env()", args.host, args.port,
                        args.workers, args.threads)


def cmd_proxy(args) -> int:
    from .config import ConfigError, load_settings
    from .credential_pool import load_pool
    from .server import run_gunicorn
    env = _settings_env(args)
    if args.pool:
        env["ATE_UPSTREAM_POOL_FILE"] = os.path.abspath(args.pool)
    if args.upstream:
        env["ATE_UPSTREAM_URL"] = args.upstream
    os.environ.update(env)
    try:
        settings = load_settings()
        if not settings.upstream_pool_file:
            raise ConfigError("the proxy needs a pool file: --pool FILE (or upstream_pool_file, ATE_UPSTREAM_POOL_FILE)")
        pool = load_pool(settings.upstream_pool_file, upstream=settings.upstream_url)   # errors now, named
        if settings.metrics_port is not None and args.workers > 1:
            raise ConfigError(f"metrics_port cannot be served by {args.workers} workers; scrape the metrics path "
                              "on --port instead, or run one worker")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"api-token-exporter proxy on http://{args.host}:{args.port} -> {pool.upstream} with "
          f"{len(pool.credentials)} credential(s) ({', '.join(c.id for c in pool.credentials)}); "
          f"{args.workers} worker(s), {args.threads} thread(s) each", file=sys.stderr, flush=True)
    # a streamed answer may take as long as the upstream's read timeout between chunks
    return run_gunicorn("api_token_exporter.proxy:app_from_env()", args.host, args.port, args.workers,
                        max(2, args.threads), timeout=int(settings.upstream_read_timeout) + 30)


def cmd_demo(args) -> int:
    from .config import ConfigError, optional_import
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


def cmd_rules(args) -> int:
    from .rulegen import main as rules_main
    return rules_main(args)


def cmd_sink(args) -> int:
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


def cmd_dashboards(args) -> int:
    from .dashgen import main as dashboards_main
    return dashboards_main(args)


def cmd_report(args) -> int:
    from .report import main as report_main
    return report_main(args)


def cmd_digest(args) -> int:
    from .digest import main as digest_main
    return digest_main(args)


def cmd_import(args) -> int:
    from . import history
    from .pricing import Pricing, PricingError
    columns = {}
    for item in args.map:
        name, _, column = item.partition("=")
        if name not in history.DEFAULT_COLUMNS or not column:
            print(f"error: --map {item!r}: expected FIELD=COLUMN with FIELD one of "
                  f"{', '.join(history.DEFAULT_COLUMNS)}", file=sys.stderr)
            return 2
        columns[name] = column
    result = history.ImportResult()
    output = args.prometheus_data or args.output
    try:
        until = None if args.until == "now" else history.parse_time(args.until)
        pricing = Pricing.load(args.pricing, args.prices)
        history.run_import(
            args.source, output, table=args.table, query=args.query, columns=columns, until=until,
            step=args.step, duration_unit=args.duration_unit, pricing=pricing, job=args.job,
            instance=args.instance, routes=args.route, max_series=args.max_series,
            max_age_days=args.max_age_days, progress=history.progress_printer(args.progress or sys.stderr.isatty()),
            dry_run=args.dry_run, result=result)
    except (history.ImportFailed, PricingError, ValueError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:                                   # what was read is reported, even on failure
        history.write_rejected(args.rejected, result.rejected)
    if result.rejected:
        shown = "; ".join(f"line {r.line}: {r.reason}" for r in result.rejected[:3])
        print(f"\n{len(result.rejected)} rows rejected, listed with reasons in {args.rejected} ({shown}"
              f"{'; ...' if len(result.rejected) > 3 else ''})", file=sys.stderr)
    span = ""
    if result.first is not None:
        fmt = lambda t: time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))   # noqa: E731
        span = f" from {fmt(result.first)} to {fmt(result.last)}"
    print(f"\nimported {result.accepted} of {result.rows} rows{span}: {result.series} series, "
          f"{result.samples} samples, {len(result.blocks)} block(s): {', '.join(result.blocks) or 'none'}"
          + ("" if args.prometheus_data or not result.blocks else
             "\nnext: move these block directories into Prometheus's data directory "
             "(--storage.tsdb.path); it loads them within a minute"), file=sys.stderr)
    return 0 if result.accepted or not result.rows else 1


def cmd_backfill(args) -> int:
    from . import history, synthetic
    from .pricing import Pricing, PricingError
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
            rule_blocks = history.backfill_rules(args.prometheus_url, rules, start, end,
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


def cmd_prices(args) -> int:
    from . import price_snapshot
    from .pricing import Pricing, PricingError
    if args.prices_cmd == "update":
        try:
            snapshot = price_snapshot.build(args.source, args.version)
            previous = None
            if os.path.exists(args.output):
                try:
                    previous = price_snapshot.load(args.output)
                except price_snapshot.SnapshotError:
                    pass
            price_snapshot.write(snapshot, args.output)
            Pricing.load(None, args.output)               # what was written loads
        except (price_snapshot.SnapshotError, PricingError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 2
        models = {(s, m) for s, ms in snapshot["services"].items() for m in ms}
        line = f"wrote {args.output}: {snapshot['version']}, {len(models):,} models of {len(snapshot['services'])} services"
        if previous:
            before = {(s, m): p for s, ms in previous["services"].items() for m, p in ms.items()}
            changed = sum(1 for k in models & set(before) if before[k] != snapshot["services"][k[0]][k[1]])
            line += (f" (was {previous['version']}: {len(models - set(before))} added, "
                     f"{len(set(before) - models)} removed, {changed} repriced)")
        print(line)
        if os.path.abspath(args.output) != os.path.abspath(price_snapshot.DEFAULT_SNAPSHOT_FILE):
            print(f"use it with prices_file: {os.path.abspath(args.output)} (or ATE_PRICES_FILE); "
                  "costs already counted keep the prices they were counted at")
        return 0
    try:
        pricing = Pricing.load(args.pricing, args.prices)
    except PricingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    price = pricing.price(args.service, args.model)
    print(f"price table: {pricing.version} (checksum {pricing.checksum})")
    if price is None:
        print(f"{args.service}/{args.model}: no price: its usage is counted as unpriced")
        return 1
    print(f"{args.service}/{args.model} from the {pricing.source(args.service, args.model)}, USD per 1M tokens:")
    fallback = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}
    for kind, usd in price.per_type().items():
        same = f" (the {fallback[kind]} price)" if getattr(price, kind) is None else ""
        print(f"  {kind:<13} {usd:g}{same}")
    return 0


def synthetic_step() -> int:
    from .synthetic import STEP
    return STEP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="api-token-exporter",
                                     description="Per-API-token usage analytics for Prometheus.")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="manage the API key file")
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    for name, help_text in (("add", "add a key and print its secret once"),
                            ("list", "list keys (never their secrets) and pending rotations"),
                            ("show", "one key's details, and its usage from Prometheus"),
                            ("update", "change a key's name, tenant, description, expiry or sensitivity"),
                            ("rotate", "give a key a new secret; the old one works through --grace"),
                            ("revoke", "mark a key inactive"),
                            ("activate", "mark a key active again")):
        p = keys_sub.add_parser(name, help=help_text)
        p.add_argument("--file", default=DEFAULT_KEYS_FILE, help="key file (default %(default)s)")
        if name != "list":
            p.add_argument("id", help="the key's id, used as its metric label")
        if name in ("add", "update"):
            default = "" if name == "add" else None
            p.add_argument("--name", default=default)
            p.add_argument("--tenant", default=default)
            p.add_argument("--description", default=default, help="what the key is for, who owns it")
            p.add_argument("--expires", help="ISO 8601 time after which the key is refused"
                           + ("" if name == "add" else " ('' to remove)"))
            p.add_argument("--anomaly-sensitivity", choices=("low", "medium", "high"),
                           help="width of this key's anomaly bands (default: thresholds.yml's)")
        if name == "add":
            for w in ("minute", "hour", "day"):
                p.add_argument(f"--{w}", type=int, help=f"requests per {w} (overrides the default)")
            p.add_argument("--daily-budget", type=float, help="USD per day")
            p.add_argument("--monthly-budget", type=float, help="USD per month")
        if name == "rotate":
            p.add_argument("--grace", default="24h",
                           help="how long the old secret keeps working (default %(default)s; 0: not at all)")
        if name == "show":
            p.add_argument("--prometheus-url", help="where to read its usage ($ATE_PROMETHEUS_URL)")
    keys.set_defaults(func=cmd_keys)

    serve = sub.add_parser("serve", help="run the exporter service (/metrics, ingest, admin)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9464)
    serve.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (default 1)")
    serve.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    serve.add_argument("--state-dir", help="keep counters here so they survive restarts ($ATE_STATE_DIR)")
    serve.add_argument("--config", help="YAML settings file (see docs/configuration.md)")
    serve.add_argument("--keys-file")
    serve.add_argument("--storage-uri", help="rate-limit storage: memory:// or redis://host:port/db")
    serve.set_defaults(func=cmd_serve)

    proxy = sub.add_parser("proxy", help="a proxy in front of an upstream API with a pool of upstream credentials",
                           description="Clients call the upstream through this proxy with their API keys of this "
                                       "project (auth, rate limits, metrics as the middleware); the proxy sends one "
                                       "of the pool's upstream credentials instead, moving to the next when one runs "
                                       "low, and watches each (docs/proxy.md).")
    proxy.add_argument("--pool", help="the pool file: upstream credentials (upstream_pool_file)")
    proxy.add_argument("--upstream", help="the upstream's base URL, over the pool file's (upstream_url)")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=int, default=8088)
    proxy.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    proxy.add_argument("--threads", type=int, default=16,
                       help="threads per worker (default 16): a streamed answer holds one for its length")
    proxy.add_argument("--state-dir", help="keep counters here so they survive restarts ($ATE_STATE_DIR)")
    proxy.add_argument("--config", help="YAML settings file (see docs/configuration.md)")
    proxy.add_argument("--keys-file", help="the API keys of the proxy's clients")
    proxy.add_argument("--storage-uri", help="rate-limit storage: memory:// or redis://host:port/db")
    proxy.set_defaults(func=cmd_proxy)

    prices = sub.add_parser("prices", help="the LLM price table: show a model's price, update the snapshot")
    prices_sub = prices.add_subparsers(dest="prices_cmd", required=True)
    show = prices_sub.add_parser("show", help="the price a model gets and where it comes from")
    show.add_argument("service")
    show.add_argument("model")
    show.add_argument("--pricing", help="your pricing file ($ATE_PRICING_FILE)",
                      default=os.environ.get("ATE_PRICING_FILE"))
    show.add_argument("--prices", help="price snapshot ($ATE_PRICES_FILE; default: the shipped one)",
                      default=os.environ.get("ATE_PRICES_FILE"))
    update = prices_sub.add_parser("update", help="write a price snapshot from LiteLLM's price map",
                                   description="Convert LiteLLM's model_prices_and_context_window.json, or a "
                                               "LiteLLM wheel that carries it (pip download litellm --no-deps), "
                                               "into a price snapshot.")
    update.add_argument("--from", dest="source", required=True, metavar="FILE", help="the .json file or a .whl")
    update.add_argument("--output", default=os.environ.get("ATE_PRICES_FILE") or "llm-prices.json",
                        help="where to write it (default: $ATE_PRICES_FILE or %(default)s)")
    update.add_argument("--version", help="the version to record (default: the wheel's, or the file's sha256)")
    prices.set_defaults(func=cmd_prices)

    try:
        from .demo import expected_alerts
        epilog = expected_alerts()
    except ImportError:                  # without the demo extra: `demo` says which to install
        epilog = None
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
    imp.add_argument("--pricing", help="your pricing file for LLM cost, over the price snapshot")
    imp.add_argument("--prices", help="price snapshot (from `prices update`; default: the shipped one)")
    imp.add_argument("--job", default="api-token-exporter", help="job label (default %(default)s)")
    imp.add_argument("--instance", default="import", help="instance label (default %(default)s)")
    imp.add_argument("--max-series", type=int, default=200_000)
    imp.add_argument("--max-age-days", type=float, default=400,
                     help="refuse rows older than this before the cut-over (default %(default)s, the compose "
                          "stack's retention)")
    where = imp.add_mutually_exclusive_group()
    where.add_argument("--prometheus-data", help="Prometheus's data directory: blocks are moved there")
    where.add_argument("--output", default="import-blocks", help="else, where to write the blocks")
    imp.add_argument("--rejected", default="import-rejected.csv", help="rejected rows and reasons")
    imp.add_argument("--dry-run", action="store_true", help="read and validate only")
    imp.add_argument("--progress", action="store_true", help="progress on stderr even when not a terminal")
    imp.set_defaults(func=cmd_import)

    back = sub.add_parser("backfill", help="synthetic history for the demo's keys, as TSDB blocks",
                          description="Realistic past traffic for the demo's keys (daily and weekly cycles, "
                                      "growth, LLM use, a few anomalies) written as Prometheus TSDB blocks; with "
                                      "--prometheus-url, the recording rules are backfilled over it too.")
    back.add_argument("--days", type=int, default=30)
    back.add_argument("--until", default="now", help="end of the history (ISO 8601 or Unix seconds)")
    back.add_argument("--step", type=int, default=synthetic_step(), help="seconds between samples (default %(default)s)")
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
    back.set_defaults(func=cmd_backfill)

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
    demo.set_defaults(func=cmd_demo)

    for name, help_text, out, func in (
            ("rules", "render Prometheus rules from the thresholds file", "prometheus/rules", cmd_rules),
            ("dashboards", "generate the Grafana dashboards", "grafana/dashboards", cmd_dashboards)):
        generator = sub.add_parser(name, help=help_text)
        generator.add_argument("--thresholds", default="prometheus/thresholds.yml")
        generator.add_argument("--out", default=out)
        generator.add_argument("--check", action="store_true",
                               help="exit 1 if the generated files are out of date, write nothing")
        generator.set_defaults(func=func)

    sink = sub.add_parser("sink", help="run a webhook (and optional SMTP) sink for notifications")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=8080)
    sink.add_argument("--smtp-port", type=int, help="also accept mail on this port")
    sink.set_defaults(func=cmd_sink)

    report = sub.add_parser("report", help="LLM token usage report from Prometheus")
    report.add_argument("--days", type=int, default=30)
    report.add_argument("--start", help="ISO 8601 date or time (default: --days before --end)")
    report.add_argument("--end", help="ISO 8601 date or time (default: now)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--prometheus-url", help="default $ATE_PROMETHEUS_URL or http://127.0.0.1:9090")
    report.add_argument("--tenant", help="only this tenant's tokens (needs --keys-file)")
    report.add_argument("--keys-file", default=DEFAULT_KEYS_FILE)
    report.add_argument("--timeout", type=float, default=30.0, help="seconds per query")
    report.add_argument("--progress", action="store_true", help="show progress even when not a terminal")
    report.add_argument("--compare", choices=("previous",),
                        help="also this period against the one of the same length before it (HTTP requests, "
                             "LLM tokens, cost: absolute and percent change); with --format csv, only that")
    report.set_defaults(func=cmd_report)

    digest = sub.add_parser("digest", help="send a usage digest to Slack, Discord, email or a webhook",
                            description="A summary of a period (requests, errors, top tokens and endpoints, LLM "
                                        "tokens and cost, budgets, alerts and anomalies, the change against the "
                                        "period before) from Prometheus, sent to the channels the settings give "
                                        "(digest_* in docs/configuration.md), or printed with --dry-run. Exit "
                                        "code 2 for bad arguments or settings, 3 when Prometheus cannot answer, "
                                        "4 when a channel refused it (the others still got it).")
    digest.add_argument("--period", choices=("day", "week"),
                        help="yesterday, or the 7 days before today (UTC; default day)")
    digest.add_argument("--start", help="or a range: ISO 8601 date or time (UTC if no zone)")
    digest.add_argument("--end", help="end of the range (default now)")
    digest.add_argument("--tenant", help="only this tenant's tokens (needs the key file)")
    digest.add_argument("--scope", choices=("overall", "per-tenant"), help="default: digest_scope (overall)")
    digest.add_argument("--channel", help="only these of the configured channels, comma-separated: "
                                          "slack, discord, email, webhook")
    digest.add_argument("--dry-run", action="store_true", help="print it (--format, default text), send nothing")
    digest.add_argument("--format", choices=("text", "json", "slack", "discord", "email"),
                        help="print it this way (what that channel would get); with --dry-run, default text")
    digest.add_argument("--prometheus-url", help="default prometheus_url, $ATE_PROMETHEUS_URL or "
                                                 "http://127.0.0.1:9090")
    digest.add_argument("--config", help="YAML settings file ($ATE_CONFIG): the channels and their secrets")
    digest.add_argument("--keys-file", help="the key file: names and tenants (default keys_file, $ATE_KEYS_FILE)")
    digest.add_argument("--timeout", type=float, default=30.0, help="seconds per Prometheus query")
    digest.set_defaults(func=cmd_digest)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
