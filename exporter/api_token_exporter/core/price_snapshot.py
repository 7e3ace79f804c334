"""The shipped LLM price table: a pinned snapshot of LiteLLM's model price map.

LiteLLM (MIT, https://github.com/BerriAI/litellm) keeps ``model_prices_and_context_window.json``,
prices per token for thousands of models, and its wheel carries a copy
(``litellm/model_prices_and_context_window_backup.json``). ``convert`` keeps its text models
(modes chat, completion and responses), names them as usage reports do (service = the provider,
model = the name without the provider's ``provider/`` prefix) and turns the prices per token into
USD per 1M tokens for each token type. ``api-token-exporter prices update --from FILE`` writes a
new snapshot from a newer file or wheel; the snapshot records the source's version and sha256
and the day it was taken (``date``: a price table ages, and the source files carry no date).

Tiered prices (above 200k prompt tokens), batch prices and audio or image tokens are not kept.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import zipfile
from typing import Dict, Optional, Tuple

DEFAULT_SNAPSHOT_FILE = os.path.join(os.path.dirname(__file__), "llm-prices.json")
LITELLM_MEMBER = "litellm/model_prices_and_context_window_backup.json"
TEXT_MODES = ("chat", "completion", "responses")
# price field -> LiteLLM's per-token field
FIELDS = {"input": "input_cost_per_token", "output": "output_cost_per_token",
          "cached_input": "cache_read_input_token_cost", "cache_write": "cache_creation_input_token_cost",
          "reasoning": "output_cost_per_reasoning_token"}
# LiteLLM providers that are one service as usage reports name it
SERVICE_ALIASES = {"cohere_chat": "cohere", "text-completion-openai": "openai", "bedrock_converse": "bedrock",
                   "text-completion-codestral": "codestral"}


VERSION = re.compile(r"^[\x20-\x7e]{1,100}$")    # a label value of apitoken_pricing_info
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
HEADER = ("source", "version", "source_sha256", "date", "currency", "unit")


class SnapshotError(ValueError):
    pass


def service_name(provider: str) -> str:
    provider = provider.strip().lower()
    if provider.startswith("vertex_ai"):          # vertex_ai-language-models, vertex_ai-anthropic_models, ...
        return "vertex_ai"
    return SERVICE_ALIASES.get(provider, provider)


def _per_million(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return None
    return float(f"{value * 1_000_000:.10g}")     # 2.5e-06 -> 2.5, not 2.4999999999999996


def convert(source: dict) -> Dict[str, Dict[str, Dict[str, float]]]:
    """services -> model -> {input, output[, cached_input, cache_write, reasoning]} per 1M tokens."""
    services: Dict[str, Dict[str, Dict[str, float]]] = {}
    prefixed: Dict[Tuple[str, str], bool] = {}
    for key, entry in source.items():
        if not isinstance(entry, dict) or entry.get("mode") not in TEXT_MODES:
            continue
        provider = entry.get("litellm_provider")
        if not isinstance(provider, str) or not provider:
            continue
        price = {name: _per_million(entry.get(field)) for name, field in FIELDS.items()}
        if price["input"] is None or price["output"] is None:
            continue
        service = service_name(provider)
        model, had_prefix = key, False
        for prefix in {provider, service}:
            if model.lower().startswith(prefix + "/"):
                model, had_prefix = model[len(prefix) + 1:], True
                break
        if (service, model) in prefixed and not prefixed[(service, model)]:
            continue                              # the bare name's entry wins over "provider/name"
        prefixed[(service, model)] = had_prefix
        services.setdefault(service, {})[model] = {k: v for k, v in price.items() if v is not None}
    return {s: dict(sorted(models.items())) for s, models in sorted(services.items())}


def read_source(path: str) -> Tuple[dict, str, str]:
    """(LiteLLM price map, version, sha256 of the map's bytes) from the JSON file or a LiteLLM
    wheel; a bare JSON file's version is its checksum's start."""
    try:
        if path.endswith(".whl"):
            with zipfile.ZipFile(path) as wheel:
                data = wheel.read(LITELLM_MEMBER)
                meta = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
                text = wheel.read(meta).decode("utf-8", "replace") if meta else ""
                found = re.search(r"^Version:\s*(\S+)", text, re.M)
                version = f"litellm {found.group(1)}" if found else None
        else:
            with open(path, "rb") as fh:
                data = fh.read()
            version = None
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise SnapshotError(f"{path}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SnapshotError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SnapshotError(f"{path}: expected LiteLLM's model price map (an object of models)")
    return doc, version or f"sha256:{digest[:12]}", digest


def build(path: str, version: Optional[str] = None, today: Optional[dt.date] = None) -> dict:
    """A snapshot of the LiteLLM map at ``path``, taken ``today`` (UTC by default)."""
    if version is not None and not VERSION.match(version):
        raise SnapshotError("--version must be 1-100 printable characters")
    source, found_version, digest = read_source(path)
    services = convert(source)
    if not services:
        raise SnapshotError(f"{path}: no text model with input and output prices: is it LiteLLM's price map?")
    return {"source": "LiteLLM model_prices_and_context_window.json (MIT, Copyright (c) 2023 Berri AI)",
            "version": version or found_version, "source_sha256": digest,
            "date": (today or dt.datetime.now(dt.timezone.utc).date()).isoformat(),
            "currency": "USD", "unit": "per 1M tokens", "services": services}


def write(snapshot: dict, path: str) -> None:
    """One model a line: small diffs when prices change."""
    lines = ["{"]
    for key in (k for k in HEADER if k in snapshot):
        lines.append(f"  {json.dumps(key)}: {json.dumps(snapshot[key])},")
    lines.append('  "services": {')
    services = list(snapshot["services"].items())
    for i, (service, models) in enumerate(services):
        lines.append(f"    {json.dumps(service)}: {{")
        rows = list(models.items())
        for j, (model, price) in enumerate(rows):
            lines.append(f"      {json.dumps(model)}: {json.dumps(price, separators=(', ', ': '))}"
                         + ("," if j + 1 < len(rows) else ""))
        lines.append("    }" + ("," if i + 1 < len(services) else ""))
    lines += ["  }", "}", ""]
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path: Optional[str] = None) -> dict:
    path = path or DEFAULT_SNAPSHOT_FILE
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SnapshotError(str(exc)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict) or not doc.get("version"):
        raise SnapshotError("needs 'version' and 'services' (write one with: api-token-exporter prices "
                            "update --from FILE)")
    bad = next((s for s, models in doc["services"].items() if not isinstance(models, dict)), None)
    if bad is not None:
        raise SnapshotError(f"services.{bad} must map models to prices")
    if not VERSION.match(str(doc["version"])):
        raise SnapshotError("version must be 1-100 printable characters")
    if "date" in doc and not DATE.match(str(doc["date"])):
        raise SnapshotError("date must be a day, YYYY-MM-DD")
    return doc


def compare(before: dict, after: dict) -> Dict[str, list]:
    """What a new snapshot changes: the (service, model) pairs ``added``, ``removed`` and
    ``repriced``, each sorted."""
    old = {(s, m): p for s, models in before["services"].items() for m, p in models.items()}
    new = {(s, m): p for s, models in after["services"].items() for m, p in models.items()}
    return {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
            "repriced": sorted(k for k in new.keys() & old.keys() if new[k] != old[k])}
