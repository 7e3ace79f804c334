"""Find LLM usage in response bodies: OpenAI (Chat Completions and Responses), Anthropic and
Cohere JSON, and the streamed (server-sent events) forms of OpenAI (the final chunk with `usage`,
or the closing `response.completed` / `.incomplete` / `.failed`) and Anthropic (`message_start` and `message_delta`).

Cached and reasoning tokens are read where the provider reports them: OpenAI's
`prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens` and
`completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`, which
are parts of its totals; Anthropic's `cache_read_input_tokens` and `cache_creation_input_tokens`,
which are not part of its `input_tokens` and are added to it here, so that the input total
counts every prompt token for every provider (usage.py).

Returns raw candidate values; the caller validates them like any other usage report.
"""
from __future__ import annotations

import json
from typing import List, NamedTuple, Optional


# a Responses stream ends with one of these, each carrying the usage billed so far
RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


class Found(NamedTuple):
    """The arguments of validate_usage, in its order."""
    service: str
    model: str
    input_tokens: object
    output_tokens: object
    cached_input_tokens: object = 0
    cache_write_tokens: object = 0
    reasoning_tokens: object = 0


def _detail(usage: dict, section: str, name: str):
    part = usage.get(section)
    return part.get(name, 0) or 0 if isinstance(part, dict) else 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _anthropic(model: str, usage: dict) -> Found:
    cache_read = usage.get("cache_read_input_tokens") or 0
    cache_write = usage.get("cache_creation_input_tokens") or 0
    base = usage.get("input_tokens") or 0
    parts = (base, cache_read, cache_write)
    total = sum(parts) if all(map(_is_number, parts)) else base    # validation names the bad one
    return Found("anthropic", model, total, usage.get("output_tokens", 0), cache_read, cache_write)


def _from_object(doc, model_hint: Optional[str]) -> Optional[Found]:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    model = doc.get("model") or model_hint or "unknown"
    if isinstance(usage, dict):
        if "prompt_tokens" in usage or "completion_tokens" in usage:          # OpenAI chat
            return Found("openai", model, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                         _detail(usage, "prompt_tokens_details", "cached_tokens"), 0,
                         _detail(usage, "completion_tokens_details", "reasoning_tokens"))
        billed = usage.get("billed_units")
        if isinstance(billed, dict):                                           # Cohere v2
            return Found("cohere", model, billed.get("input_tokens", 0), billed.get("output_tokens", 0))
        if "input_tokens_details" in usage or "output_tokens_details" in usage \
                or doc.get("object") == "response":                            # OpenAI Responses
            return Found("openai", model, usage.get("input_tokens", 0), usage.get("output_tokens", 0),
                         _detail(usage, "input_tokens_details", "cached_tokens"), 0,
                         _detail(usage, "output_tokens_details", "reasoning_tokens"))
        if "input_tokens" in usage or "output_tokens" in usage:               # Anthropic
            return _anthropic(model, usage)
    meta = doc.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("billed_units"), dict):  # Cohere v1
        billed = meta["billed_units"]
        return Found("cohere", model, billed.get("input_tokens", 0), billed.get("output_tokens", 0))
    return None


def _from_events(text: str, model_hint: Optional[str]) -> Optional[Found]:
    found: Optional[Found] = None
    anthropic: dict = {}                 # Anthropic's usage, updated by each event (cumulative)
    model = None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):   # Anthropic
            message = event["message"]
            model = message.get("model") or model
            if isinstance(message.get("usage"), dict):
                anthropic.update((k, v) for k, v in message["usage"].items() if v is not None)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):   # cumulative; null: unchanged
            anthropic.update((k, v) for k, v in event["usage"].items() if v is not None)
        elif kind in RESPONSE_ENDS and isinstance(event.get("response"), dict):   # OpenAI Responses
            found = _from_object(dict(event["response"], object="response"), model_hint) or found
        elif isinstance(event.get("usage"), dict):                                # OpenAI chat
            found = _from_object(event, model_hint) or found
        elif event.get("model") and model is None:
            model = event["model"]
    if anthropic:
        return _anthropic(model or model_hint or "unknown", anthropic)
    return found


def media_type(content_type: str) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def carries_usage(content_type: str) -> bool:
    """Whether a body of this Content-Type can report usage (JSON or server-sent events): the
    middleware keeps no copy of any other body."""
    return _reports_usage(media_type(content_type))


def _reports_usage(kind: str) -> bool:
    return kind == "text/event-stream" or kind == "application/json" or kind.endswith("+json")


# every usage report holds one of these keys, as such or, in JSON, with \u escapes
_MARKERS = (b"usage", b"billed_units", b"\\u")


def extract_usage(content_type: str, body: bytes, model_hint: Optional[str] = None) -> Optional[Found]:
    """Usage reported in a response body, or None if it carries none."""
    kind = media_type(content_type)
    if not _reports_usage(kind) or not any(marker in body for marker in _MARKERS):
        return None                      # most answers of an API: no parse at all
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if kind == "text/event-stream":
        return _from_events(text, model_hint)
    try:
        return _from_object(json.loads(text), model_hint)
    except ValueError:
        return None


__all__: List[str] = ["extract_usage", "carries_usage", "Found"]
