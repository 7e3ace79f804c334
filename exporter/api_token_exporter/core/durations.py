"""The one duration grammar: settings, flags, the alert API, the key file and the thresholds.

A duration is a number of seconds (``90``, ``0.5``) or a number with a unit: ``ms``, ``s``,
``m``, ``h``, ``d``, ``w`` (``500ms``, ``1.5s``, ``10m``, ``7d``, ``2w``), or several of those
largest first as Prometheus writes them (``1h30m``). Where the text itself goes into PromQL
(rule windows, ``for:``), ``prometheus_duration`` also requires whole numbers with units.
"""
from __future__ import annotations

import math
import re
from typing import Union

UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
EXAMPLES = "seconds, or 500ms, 10s, 5m, 12h, 7d, 2w"
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_PROMETHEUS = re.compile(r"(?:\d+(?:ms|s|m|h|d|w))+")
_ORDER = ("w", "d", "h", "m", "s", "ms")


class DurationError(ValueError):
    pass


def parse_duration(value: Union[str, int, float], name: str = "duration") -> float:
    """Seconds in ``value``; a DurationError naming ``name`` if it is not a duration >= 0."""
    if isinstance(value, bool):
        raise DurationError(f"{name} must be a duration ({EXAMPLES}), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        seconds = _parse_text(str(value).strip().lower(), name)
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError(f"{name} must be a positive duration or 0, got {value!r}")
    return seconds


def _parse_text(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    position, total, last = 0, 0.0, -1
    for found in _PART.finditer(text):
        rank = _ORDER.index(found.group(2))
        if found.start() != position or rank <= last:
            break
        position, last = found.end(), rank
        total += float(found.group(1)) * UNITS[found.group(2)]
    if position == 0 or position != len(text):
        raise DurationError(f"{name} must be a duration ({EXAMPLES}), got {text!r}")
    return total


def prometheus_duration(value, name: str = "duration") -> float:
    """Seconds in a duration Prometheus accepts as it is written (``30s``, ``5m``, ``1h30m``)."""
    if not isinstance(value, str) or not _PROMETHEUS.fullmatch(value):
        raise DurationError(f"{name}: not a Prometheus duration: {value!r} (e.g. 30s, 5m, 1h)")
    return parse_duration(value, name)


def format_duration(seconds: float) -> str:
    """The shortest whole-unit form: 86400 -> 1d, 5400 -> 90m, 45 -> 45s."""
    total = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total and total % size == 0:
            return f"{total // size}{unit}"
    return f"{total}s"
