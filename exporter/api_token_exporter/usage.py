"""Validation of LLM usage values, shared by the public call and the ingest endpoint."""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TOKENS_PER_REQUEST = 10_000_000   # more than any model's context; larger is a bug upstream
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,99}$")


class UsageError(ValueError):
    """A usage value was refused; the message names the field and the reason."""


@dataclass(frozen=True)
class LLMUsage:
    service: str
    model: str
    input_tokens: int
    output_tokens: int


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {type(value).__name__}")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise UsageError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    if value < 0:
        raise UsageError(f"{name} must not be negative, got {value}")
    if value > MAX_TOKENS_PER_REQUEST:
        raise UsageError(f"{name} {value} is larger than {MAX_TOKENS_PER_REQUEST:,} "
                         "tokens per request")
    return value


def _name(field: str, value) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UsageError(f"{field} must be 1-100 characters of letters, digits and _ . : / @ + -")
    return value


def validate_usage(service, model, input_tokens=0, output_tokens=0) -> LLMUsage:
    return LLMUsage(_name("service", service).lower(), _name("model", model),
                    _count("input_tokens", input_tokens), _count("output_tokens", output_tokens))
