"""`api-token-exporter rules`: render the Prometheus rules from a thresholds file."""
from __future__ import annotations

import sys

from .common import generator_arguments


def register(sub) -> None:
    p = sub.add_parser("rules", help="render Prometheus rules from the thresholds file",
                       description="Recording, alert, anomaly and key lifecycle rules for Prometheus, "
                                   "rendered from the thresholds file.")
    generator_arguments(p, "rule files", "prometheus/rules")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml
    from ..mixin.rules import stale, write
    from ..mixin.thresholds import ThresholdError, default_thresholds_file, load_thresholds
    try:
        t = load_thresholds(args.thresholds or default_thresholds_file())
    except (OSError, ThresholdError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        outdated = stale(t, args.out)
        for path in outdated:
            print(f"out of date: {path} (run `make rules`)", file=sys.stderr)
        return 1 if outdated else 0
    for path in write(t, args.out):
        print(f"wrote {path}")
    return 0
