"""Find LLM usage in response bodies: OpenAI, Anthropic and Cohere JSON, and the streamed
(server-sent events) forms of OpenAI (the final chunk with `usage`) and Anthropic
(`message_start` and `message_delta`).

Returns raw candidate values; the caller validates them like any other usage report.
"""
from __future__ import annotations

import json
from typing import List, Optional, Tuple

Found = Tuple[str, str, object, object]   # service, model, input tokens, output tokens


def _from_object(doc, model_hint: Optional[str]) -> Optional[Found]:
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    model = doc.get("model") or model_hint or "unknown"
    if isinstance(usage, dict):
        if "prompt_tokens" in usage or "completion_tokens" in usage:          # OpenAI
            return ("openai", model, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        billed = usage.get("billed_units")
        if isinstance(billed, dict):                                           # Cohere v2
            return ("cohere", model, billed.get("input_tokens", 0), billed.get("output_tokens", 0))
        if "input_tokens" in usage or "output_tokens" in usage:               # Anthropic
            return ("anthropic", model, usage.get("input_tokens", 0), usage.get("output_tokens", 0))
    meta = doc.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("billed_units"), dict):  # Cohere v1
        billed = meta["billed_units"]
        return ("cohere", model, billed.get("input_tokens", 0), billed.get("output_tokens", 0))
    return None


def _from_events(text: str, model_hint: Optional[str]) -> Optional[Found]:
    service = model = None
    input_tokens = output_tokens = None
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
            service, model = "anthropic", message.get("model") or model
            usage = message.get("usage") or {}
            input_tokens = usage.get("input_tokens", input_tokens)
            output_tokens = usage.get("output_tokens", output_tokens)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            service = service or "anthropic"
            output_tokens = event["usage"].get("output_tokens", output_tokens)
        elif isinstance(event.get("usage"), dict):                                # OpenAI
            found = _from_object(event, model_hint)
            if found:
                service, model, input_tokens, output_tokens = found
        elif event.get("model") and model is None:
            model = event["model"]
    if service is None:
        return None
    return (service, model or model_hint or "unknown", input_tokens or 0, output_tokens or 0)


def extract_usage(content_type: str, body: bytes, model_hint: Optional[str] = None) -> Optional[Found]:
    """Usage reported in a response body, or None if it carries none."""
    content_type = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if content_type == "text/event-stream":
        return _from_events(text, model_hint)
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return _from_object(json.loads(text), model_hint)
        except ValueError:
            return None
    return None


__all__: List[str] = ["extract_usage"]
