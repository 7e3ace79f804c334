"""One place that decides what may enter the metric store, from any path: the middleware,
ingest events, LLM usage (called, captured or posted), prices, and later the proxy.

Label values are text Prometheus and every exposition parser accept: valid UTF-8 (no lone
surrogates), no control characters, bounded length. Numbers are finite, and non-negative where
a counter adds them. A refusal is a ``ValidationError`` whose message names the field and the
rule, never the value (it may be a secret pasted into the wrong field).
"""
from __future__ import annotations

import math
import re
import unicodedata

MAX_LABEL_LENGTH = 200
STANDARD_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                              "PATCH"))
OTHER_METHOD = "_OTHER"            # OpenTelemetry's value for any method outside the standard set
_TOKEN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,99}")


class ValidationError(ValueError):
    """A value was refused; the message names the field and the rule, not the value."""


def _is_clean_text(value: str) -> bool:
    try:
        value.encode("utf-8")                      # lone surrogates cannot be encoded
    except UnicodeEncodeError:
        return False
    if value.isprintable():                        # fast path: no control or format characters
        return True
    # Cf: invisible and direction characters (U+200B, U+202E, U+2066, U+FEFF...), with which a
    # shown route could pass for another
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") or ch in "\u2028\u2029" for ch in value)


def label_value(field: str, value, max_length: int = MAX_LABEL_LENGTH) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{field} must be a non-empty string")
    if len(value) > max_length:
        raise ValidationError(f"{field} must be at most {max_length} characters")
    if not _is_clean_text(value):
        raise ValidationError(f"{field} must be valid UTF-8 text without control, invisible or direction characters")
    return value


def route(field: str, value) -> str:
    value = label_value(field, value)
    if not value.startswith("/"):
        raise ValidationError(f"{field} must be a path template starting with /")
    return value


def method(value) -> str:
    """The method label: a standard method in upper case, anything else _OTHER (never refused:
    the request happened)."""
    if isinstance(value, str):
        upper = value.upper()
        if upper in STANDARD_METHODS:
            return upper
    return OTHER_METHOD


def token_id(field: str, value) -> str:
    if not isinstance(value, str) or not _TOKEN_ID.fullmatch(value):
        raise ValidationError(f"{field} must be 1-64 characters of letters, digits, _ . : - "
                              "(a key id, not the key)")
    return value


def name(field: str, value) -> str:
    """A service or model name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValidationError(f"{field} must be 1-100 characters of letters, digits and _ . : / @ + -")
    return value


def number(field: str, value, minimum: float = 0.0, maximum: float = math.inf) -> float:
    """A finite number within [minimum, maximum] (JSON booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number")
    try:
        value = float(value)
    except OverflowError:                      # an integer of hundreds of digits
        raise ValidationError(f"{field} must be a finite number") from None
    if not math.isfinite(value):
        raise ValidationError(f"{field} must be a finite number")
    if not minimum <= value <= maximum:
        high = "" if maximum == math.inf else f" and at most {maximum:g}"
        raise ValidationError(f"{field} must be at least {minimum:g}{high}")
    return value


def whole_number(field: str, value, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise ValidationError(f"{field} must be a whole number")
    value = int(value)
    if value < 0:
        raise ValidationError(f"{field} must not be negative")
    if value > maximum:
        raise ValidationError(f"{field} must be at most {maximum:,}")
    return value


def json_depth(doc, limit: int) -> bool:
    """True if ``doc`` nests no deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return False
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return True
