"""`api-token-exporter prices`: a model's price and where it comes from; a new price snapshot."""
from __future__ import annotations

import os
import sys

from .common import command_settings


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
        settings = command_settings(args, pricing_file=args.pricing_file, prices_file=args.prices_file)
        pricing = Pricing.load(settings.pricing_file, settings.prices_file)
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
