"""The one timestamp grammar: settings, flags, query parameters, the key file, imported rows and
the answers of Alertmanager and Prometheus.

A timestamp is Unix seconds (``1796112000``, ``1796112000.5``) or ISO 8601 / RFC 3339: a date
(``2026-12-01``, midnight UTC) or a date and time with ``Z`` or an offset, up to nanoseconds as
Go writes them; without a zone it is UTC. Times are shown as RFC 3339 in UTC with milliseconds.
"""
from __future__ import annotations

import datetime as dt
import math
import re
from typing import Union

UTC = dt.timezone.utc
_ISO = re.compile(r"(\d{4}-\d\d-\d\d)(?:[T ](\d\d:\d\d(?::\d\d)?)(?:\.(\d+))?)?\s*(Z|z|[+-]\d\d:?\d\d)?")


class TimestampError(ValueError):
    pass


def parse_timestamp(value: Union[str, int, float, dt.datetime, dt.date], name: str = "time") -> float:
    """Unix seconds of ``value``; a TimestampError naming ``name`` when it is not a time."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, bool):
        raise TimestampError(f"{name} must be an ISO 8601 date or time, or Unix seconds, got {value!r}")
    elif isinstance(value, (int, float)):
        return _finite(float(value), name, value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return _finite(number, name, value)
        moment = _parse_iso(text, name)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_iso(text: str, name: str) -> dt.datetime:
    found = _ISO.fullmatch(text)
    try:
        if not found:
            raise ValueError
        day, clock, fraction, zone = found.groups()
        zone = "+00:00" if zone in (None, "Z", "z") else zone
        moment = dt.datetime.fromisoformat(f"{day}T{clock or '00:00'}{zone}")
        if fraction:                    # Go writes nanoseconds; datetime keeps microseconds
            moment += dt.timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
        return moment
    except ValueError:
        raise TimestampError(f"{name} must be an ISO 8601 date or time, or Unix seconds, "
                             f"got {text[:40]!r}") from None


def _finite(seconds: float, name: str, value) -> float:
    if not math.isfinite(seconds):
        raise TimestampError(f"{name}: not a finite number: {value}")
    return seconds


def parse_datetime(value, name: str = "time") -> dt.datetime:
    """``parse_timestamp`` as an aware datetime in UTC."""
    return dt.datetime.fromtimestamp(parse_timestamp(value, name), UTC)


def format_timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-12-01T08:00:00.000Z."""
    return dt.datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
