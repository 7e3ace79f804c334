"""``python -m api_token_exporter.cli``."""
import sys

from . import main

sys.exit(main())
