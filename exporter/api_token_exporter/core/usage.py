"""Validation of LLM usage values, shared by the public call, the ingest endpoint, the capture
of provider answers and the import.

``input_tokens`` and ``output_tokens`` are totals, as OpenAI reports them: the prompt's tokens
with the cached ones included, the answer's with the reasoning ones included. The details are
parts of those totals. In ``apitoken_llm_tokens_total`` the ``type`` label splits them into
disjoint parts (TOKEN_TYPES), so a sum over types is the total and each part has its own price.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from . import validation
from .validation import ValidationError

MAX_TOKENS_PER_REQUEST = 10_000_000   # more than any model's context; larger is a bug upstream
INPUT_TYPES = ("input", "cached_input", "cache_write")   # uncached prompt, cache read, cache write
OUTPUT_TYPES = ("output", "reasoning")                  # visible answer, reasoning
TOKEN_TYPES = INPUT_TYPES + OUTPUT_TYPES
DETAIL_FIELDS = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")


class UsageError(ValidationError):
    """A usage value was refused; the message names the field and the reason."""


@dataclass(frozen=True)
class LLMUsage:
    service: str
    model: str
    input_tokens: int                # every prompt token, cached ones included
    output_tokens: int               # every answer token, reasoning included
    cached_input_tokens: int = 0     # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0      # of input_tokens: written to it
    reasoning_tokens: int = 0        # of output_tokens

    def parts(self) -> Dict[str, int]:
        """Tokens by type (TOKEN_TYPES), disjoint: they add up to input plus output."""
        return {"input": self.input_tokens - self.cached_input_tokens - self.cache_write_tokens,
                "cached_input": self.cached_input_tokens, "cache_write": self.cache_write_tokens,
                "output": self.output_tokens - self.reasoning_tokens, "reasoning": self.reasoning_tokens}

    def exported_parts(self) -> Dict[str, int]:
        """The parts that get a series: input and output always, the others once they occur."""
        return {k: n for k, n in self.parts().items() if n or k in ("input", "output")}


def validate_usage(service, model, input_tokens=0, output_tokens=0, cached_input_tokens=0,
                   cache_write_tokens=0, reasoning_tokens=0) -> LLMUsage:
    try:
        counts = {name: validation.whole_number(name, value, MAX_TOKENS_PER_REQUEST) for name, value in (
            ("input_tokens", input_tokens), ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens), ("cache_write_tokens", cache_write_tokens),
            ("reasoning_tokens", reasoning_tokens))}
        usage = LLMUsage(validation.name("service", service).lower(), validation.name("model", model), **counts)
    except UsageError:
        raise
    except ValidationError as exc:
        raise UsageError(str(exc)) from None
    if usage.cached_input_tokens + usage.cache_write_tokens > usage.input_tokens:
        raise UsageError(f"cached_input_tokens + cache_write_tokens ({usage.cached_input_tokens + usage.cache_write_tokens})"
                         f" is more than input_tokens ({usage.input_tokens}), which counts every prompt token, "
                         "cached ones included")
    if usage.reasoning_tokens > usage.output_tokens:
        raise UsageError(f"reasoning_tokens ({usage.reasoning_tokens}) is more than output_tokens "
                         f"({usage.output_tokens}), which counts every answer token, reasoning included")
    return usage
