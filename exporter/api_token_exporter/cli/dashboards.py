"""`api-token-exporter dashboards`: generate the Grafana dashboards."""
from __future__ import annotations

import os
import sys

from .common import generator_arguments


def register(sub) -> None:
    p = sub.add_parser("dashboards", help="generate the Grafana dashboards",
                       description="The Grafana dashboards as JSON, their threshold lines from the thresholds file.")
    generator_arguments(p, "dashboards", "grafana/dashboards")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..mixin.dashboards import render
    from ..mixin.thresholds import default_thresholds_file
    rendered = render(args.thresholds or default_thresholds_file())
    if args.check:
        stale = []
        for name, text in rendered.items():
            path = os.path.join(args.out, name)
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                stale.append(path)
        for path in stale:
            print(f"out of date: {path} (run `make dashboards`)", file=sys.stderr)
        return 1 if stale else 0
    os.makedirs(args.out, exist_ok=True)
    for name, text in rendered.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {os.path.join(args.out, name)}")
    return 0
