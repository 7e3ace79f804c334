"""The console's one formatter (static/format.js), run in Node against a table: thousands
separators, K/M/B units that keep their leading digits, dollars with cents, ISO dates in UTC."""
import json
import pathlib
import subprocess

import pytest

from support import require_binary

FORMAT_JS = (pathlib.Path(__file__).resolve().parent.parent / "exporter" / "api_token_exporter" / "web"
             / "console" / "static" / "format.js")

CASES = [
    ("number", [1000], "1,000"), ("number", [1100], "1,100"), ("number", [2500], "2,500"),
    ("number", [0.25], "0.25"), ("number", [1.5e9], "1,500,000,000"), ("number", [351240500], "351,240,500"),
    ("number", [1316.4567], "1,316.457"), ("number", [0.000123456], "0.000123"), ("number", [None], "–"),
    ("compact", [999], "999"), ("compact", [1000], "1K"), ("compact", [1100], "1.1K"), ("compact", [2500], "2.5K"),
    ("compact", [0.25], "0.25"), ("compact", [1.5e9], "1.5B"), ("compact", [1500e6], "1.5B"),
    ("compact", [999999], "1M"), ("compact", [12345678], "12.3M"), ("compact", [0], "0"), ("compact", [-2500], "-2.5K"),
    ("usd", [0.25], "$0.25"), ("usd", [1234.5], "$1,234.50"), ("usd", [0], "$0.00"), ("usd", [0.0012], "$0.0012"),
    ("usd", [1.5e9], "$1,500,000,000.00"), ("usd", [None], "–"),
    ("usdTick", [0.25, 0.25], "$0.25"), ("usdTick", [0.5, 0.25], "$0.50"), ("usdTick", [150, 50], "$150"),
    ("usdTick", [0.005, 0.001], "$0.005"),
    ("isoDate", [1765065600], "2025-12-07"), ("isoDateTime", [1765114200], "2025-12-07 13:30 UTC"),
    ("isoTime", [1765114207.9], "13:30:07"), ("isoTime", [None], "–"),
]


def test_the_console_formats_every_case_of_the_table():
    node = require_binary("node")
    script = (f"const F = require({json.dumps(str(FORMAT_JS))});\n"
              f"const cases = {json.dumps([[name, args] for name, args, _ in CASES])};\n"
              "console.log(JSON.stringify(cases.map(([name, args]) => F[name](...args))));")
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [(n, a, g) for (n, a, _), g in zip(CASES, got)] == [(n, a, want) for n, a, want in CASES]


@pytest.mark.parametrize("page", ["console.js", "usage.js", "capacity.js", "alerts.js", "tokens.js"])
def test_pages_format_numbers_only_through_it(page):
    """No page formats numbers its own way (toPrecision, toFixed with units, locale calls)."""
    text = (FORMAT_JS.parent / page).read_text()
    assert "toPrecision" not in text and "toLocaleString" not in text, page
