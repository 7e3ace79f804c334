"""`api-token-exporter digest`: a usage digest sent to the configured channels, or printed."""
from __future__ import annotations

import os
import sys
import time

from .common import command_settings


def register(sub) -> None:
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
    digest.set_defaults(func=run)


def run(args) -> int:
    from ..analytics import digest_channels as channels
    from ..analytics.digest import (EXIT_BAD_ARGUMENTS, EXIT_DELIVERY, EXIT_PROMETHEUS, alerts_source,
                                    audiences, build_digest, resolve_period)
    from ..analytics.queries import AnalyticsError, PrometheusClient, PrometheusUnavailable
    from ..core.config import ConfigError
    from ..core.digest_settings import CHANNELS, configured
    from ..core.keystore import KeyStore, KeyStoreError
    err = sys.stderr
    try:
        settings = command_settings(args)
    except ConfigError as exc:
        print(f"error: {channels.scrub(str(exc), None)}", file=err)
        return EXIT_BAD_ARGUMENTS
    url = args.prometheus_url or settings.prometheus_url or "http://127.0.0.1:9090"
    client = PrometheusClient(url, args.timeout)
    keys_file = args.keys_file or settings.keys_file or "keys.yml"
    wanted = [c.strip() for c in (args.channel or "").split(",") if c.strip()]
    try:
        for c in wanted:
            if c not in CHANNELS:
                raise AnalyticsError(f"--channel {c!r}: one of {', '.join(CHANNELS)}")
        period = resolve_period(args.period, args.start, args.end, time.time())
        keystore = None
        if keys_file and os.path.exists(keys_file):
            keystore = KeyStore(keys_file, allow_empty=True)
        elif args.tenant or (args.scope or settings.digest_scope) == "per-tenant":
            raise AnalyticsError(f"the key file {keys_file} does not exist: a tenant's digest needs it (--keys-file)")
        who_for = audiences(args.scope or settings.digest_scope, keystore, args.tenant)
        targets = [] if args.dry_run else configured(settings, wanted or None)
        if not args.dry_run and not targets:
            raise AnalyticsError("no digest channel is configured" + (f" among {', '.join(wanted)}" if wanted else "")
                                 + ": set digest_slack_webhook_url, digest_discord_webhook_url, digest_webhook_url "
                                   "or digest_email_to (docs/configuration.md), or use --dry-run to print it")
    except (AnalyticsError, KeyStoreError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_BAD_ARGUMENTS
    source = alerts_source(settings, client)
    failed = False
    for audience in who_for:
        try:
            doc = build_digest(client, period, audience, keystore, source, settings.digest_top_n)
        except PrometheusUnavailable as exc:
            print(f"error: {exc}", file=err)
            return EXIT_PROMETHEUS
        if args.dry_run or args.format:
            sys.stdout.write(channels.render(doc, args.format or "text", settings))
        for result in channels.deliver(doc, settings, targets):
            print(f"{audience.key} {period.label}: {result}", file=err)
            failed = failed or not result.ok
    return EXIT_DELIVERY if failed else 0
