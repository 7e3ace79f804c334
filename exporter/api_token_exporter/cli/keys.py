"""`api-token-exporter keys`: add, list, show, update, rotate, revoke and activate keys."""
from __future__ import annotations

import os
import sys

from .common import KEYS_FILE_HELP, command_settings, keys_file_of


def register(sub) -> None:
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
        p.add_argument("--keys-file", "--file", dest="keys_file", help=KEYS_FILE_HELP)
        p.add_argument("--config", help="YAML settings file ($ATE_CONFIG)")
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
    keys.set_defaults(func=run)


def run(args) -> int:
    from ..core.keystore import KeyStoreError, add_key, load_keys, rotate_key, set_active, update_key
    args.file = keys_file_of(args)
    try:
        if args.keys_cmd == "add":
            budget = {p: v for p, v in (("daily", args.daily_budget),
                                        ("monthly", args.monthly_budget)) if v is not None}
            raw = add_key(args.file, args.id, name=args.name, tenant=args.tenant,
                          rate_limits=window_limits(args), budget_usd=budget,
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
                             k.expires_at.isoformat() if k.expires_at else "-", limits, rotation(k)))
            widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        elif args.keys_cmd in ("revoke", "activate"):
            key = set_active(args.file, args.id, args.keys_cmd == "activate")
            print(f"{key.id} is now {'active' if key.active else 'inactive'}")
        elif args.keys_cmd == "rotate":
            from ..core.durations import DurationError, parse_duration
            try:
                grace = parse_duration(args.grace, "--grace")
            except DurationError:
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
            return show_key(args)
    except KeyStoreError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def window_limits(args) -> dict:
    return {w: getattr(args, w) for w in ("minute", "hour", "day") if getattr(args, w) is not None}


def rotation(key) -> str:
    if key.previous is None:
        return "-"
    if key.previous_valid():
        return f"old {key.previous.masked} valid until {key.previous.valid_until.isoformat()}"
    return f"old {key.previous.masked} refused since {key.previous.valid_until.isoformat()}"


def show_key(args) -> int:
    """One key's details, and its usage from Prometheus when there is one to ask (the caller
    reports a key file that cannot be read)."""
    from ..core.keystore import load_keys
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
             ("last rotated", when(key.last_rotated_at)), ("rotation", rotation(key)),
             ("limits", ", ".join(f"{w} {n}" for w, n in key.rate_limits.items()) or "the defaults"),
             ("budget", ", ".join(f"{p} ${v:g}" for p, v in key.budget_usd.items()) or "-")]
    url = command_settings(args, prometheus_url=args.prometheus_url).prometheus_url
    if url:
        import datetime as dt
        import time as _time
        from ..analytics.queries import PrometheusClient, PrometheusUnavailable
        client = PrometheusClient(url, 10.0)
        from ..mixin.promql import exact_increase
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
