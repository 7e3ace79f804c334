"""`api-token-exporter prices`: a model's price and where it comes from; a new price snapshot."""
from __future__ import annotations

import os
import sys

from .common import command_settings

MAX_REMOVED = 0.10       # a new snapshot that drops more of the models is refused without --force
SHOWN = 10               # models named per kind of change


def register(sub) -> None:
    prices = sub.add_parser("prices", help="the LLM price table: show a model's price, update the snapshot")
    prices_sub = prices.add_subparsers(dest="prices_cmd", required=True)
    show = prices_sub.add_parser("show", help="the price a model gets and where it comes from")
    show.add_argument("service")
    show.add_argument("model")
    show.add_argument("--pricing-file", "--pricing", dest="pricing_file",
                      help="your pricing file (default: pricing_file of the settings, $ATE_PRICING_FILE)")
    show.add_argument("--prices-file", "--prices", dest="prices_file",
                      help="price snapshot (default: prices_file of the settings, $ATE_PRICES_FILE, or the shipped one)")
    show.add_argument("--config", help="YAML settings file ($ATE_CONFIG)")
    update = prices_sub.add_parser("update", help="write a price snapshot from LiteLLM's price map",
                                   description="Convert LiteLLM's model_prices_and_context_window.json, or a "
                                               "LiteLLM wheel that carries it (pip download litellm --no-deps), "
                                               "into a price snapshot.")
    update.add_argument("--from", dest="source", required=True, metavar="FILE", help="the .json file or a .whl")
    update.add_argument("--output", help="where to write it (default: prices_file of the settings, "
                                          "$ATE_PRICES_FILE, or llm-prices.json)")
    update.add_argument("--config", help="YAML settings file ($ATE_CONFIG)")
    update.add_argument("--version", help="the version to record (default: the wheel's, or the file's sha256)")
    update.add_argument("--force", action="store_true",
                        help=f"write it even if it removes more than {MAX_REMOVED:.0%} of the models the "
                             "snapshot there has")
    prices.set_defaults(func=run)


def run(args) -> int:
    from ..core import price_snapshot
    from ..core.pricing import Pricing, PricingError
    if args.prices_cmd == "update":
        args.output = args.output or command_settings(args).prices_file or "llm-prices.json"
        try:
            snapshot = price_snapshot.build(args.source, args.version)
            previous = None
            if os.path.exists(args.output):
                try:
                    previous = price_snapshot.load(args.output)
                except price_snapshot.SnapshotError:
                    pass
            changes = price_snapshot.compare(previous, snapshot) if previous else None
            before = sum(len(models) for models in previous["services"].values()) if previous else 0
            if changes and len(changes["removed"]) > MAX_REMOVED * before and not args.force:
                print(f"error: {args.source} would remove {len(changes['removed']):,} of the {before:,} models of "
                      f"{args.output} ({len(changes['removed']) / before:.0%}; more than {MAX_REMOVED:.0%}), "
                      f"e.g. {_names(changes['removed'])}: is it the whole price map? Nothing was written; "
                      "--force writes it anyway", file=sys.stderr)
                return 2
            price_snapshot.write(snapshot, args.output)
            Pricing.load(None, args.output)               # what was written loads
        except (price_snapshot.SnapshotError, PricingError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 2
        models = sum(len(ms) for ms in snapshot["services"].values())
        line = (f"wrote {args.output}: {snapshot['version']} of {snapshot['date']}, {models:,} models of "
                f"{len(snapshot['services'])} services")
        if changes is not None:
            line += (f" (was {previous['version']}: {len(changes['added'])} added, "
                     f"{len(changes['removed'])} removed, {len(changes['repriced'])} repriced)")
        print(line)
        for kind, found in (changes or {}).items():
            if found:
                print(f"  {kind}: {_names(found)}")
        if os.path.abspath(args.output) != os.path.abspath(price_snapshot.DEFAULT_SNAPSHOT_FILE):
            print(f"use it with prices_file: {os.path.abspath(args.output)} (or ATE_PRICES_FILE); "
                  "costs already counted keep the prices they were counted at")
        return 0
    try:
        settings = command_settings(args, pricing_file=args.pricing_file, prices_file=args.prices_file)
        pricing = Pricing.load(settings.pricing_file, settings.prices_file)
    except PricingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    price = pricing.price(args.service, args.model)
    print(f"price table: {pricing.version}, taken {pricing.date or 'on an unknown day'} (checksum {pricing.checksum})")
    if price is None:
        print(f"{args.service}/{args.model}: no price: its usage is counted as unpriced")
        return 1
    print(f"{args.service}/{args.model} from the {pricing.source(args.service, args.model)}, USD per 1M tokens:")
    fallback = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}
    for kind, usd in price.per_type().items():
        same = f" (the {fallback[kind]} price)" if getattr(price, kind) is None else ""
        print(f"  {kind:<13} {usd:g}{same}")
    return 0


def _names(pairs) -> str:
    shown = ", ".join(f"{service}/{model}" for service, model in pairs[:SHOWN])
    return shown + (f" and {len(pairs) - SHOWN:,} more" if len(pairs) > SHOWN else "")
