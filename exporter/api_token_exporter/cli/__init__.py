"""Command line: ``api-token-exporter COMMAND``, one module per command.

Each command module has ``register(sub)``, which adds its parser, and ``run(args)``, which
imports what the command needs only when it runs: ``--help`` stays fast and needs no extra.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ("keys", "serve", "proxy", "prices", "history", "rules", "dashboards", "report", "digest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="api-token-exporter",
                                     description="Per-API-token usage analytics for Prometheus.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..core.errors import ConfigError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:          # a bad setting, file or flag: named, never a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
