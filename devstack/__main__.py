"""``python -m devstack demo|backfill|sink`` (devstack/cli.py)."""
import sys

from .cli import main

sys.exit(main())
