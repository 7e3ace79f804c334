"""Validation of LLM usage values, shared by the public call and the ingest endpoint."""
from __future__ import annotations

from dataclasses import dataclass

from . import validation
from .validation import ValidationError

MAX_TOKENS_PER_REQUEST = 10_000_000   # more than any model's context; larger is a bug upstream


class UsageError(ValidationError):
    """A usage value was refused; the message names the field and the reason."""


@dataclass(frozen=True)
class LLMUsage:
    service: str
    model: str
    input_tokens: int
    output_tokens: int


def validate_usage(service, model, input_tokens=0, output_tokens=0) -> LLMUsage:
    try:
        return LLMUsage(validation.name("service", service).lower(), validation.name("model", model),
                        validation.whole_number("input_tokens", input_tokens, MAX_TOKENS_PER_REQUEST),
                        validation.whole_number("output_tokens", output_tokens, MAX_TOKENS_PER_REQUEST))
    except UsageError:
        raise
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
