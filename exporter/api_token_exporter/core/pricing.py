"""LLM prices per 1M tokens: the user's pricing file (YAML) over the shipped price snapshot
(price_snapshot.py). Cost is computed when usage is counted, with the prices then in force:
changing a price never rewrites what was already spent."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import yaml

from . import price_snapshot, validation
from .usage import LLMUsage

DEFAULT_PRICING_FILE = os.path.join(os.path.dirname(__file__), "pricing.yml")
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "reasoning")
Table = Dict[str, Dict[str, "Price"]]


class PricingError(ValueError):
    pass


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens of each type; a cache or reasoning price not given is the input or
    output price."""
    input: float
    output: float
    cached_input: Optional[float] = None
    cache_write: Optional[float] = None
    reasoning: Optional[float] = None

    def per_type(self) -> Dict[str, float]:
        return {"input": self.input, "output": self.output,
                "cached_input": self.input if self.cached_input is None else self.cached_input,
                "cache_write": self.input if self.cache_write is None else self.cache_write,
                "reasoning": self.output if self.reasoning is None else self.reasoning}

    def cost(self, usage: LLMUsage) -> float:
        rates = self.per_type()
        return sum(n * rates[kind] for kind, n in usage.parts().items()) / 1_000_000


def _price(where: str, raw) -> Price:
    if not isinstance(raw, dict) or set(raw) - set(PRICE_FIELDS) or not {"input", "output"} <= set(raw):
        raise PricingError(f"{where}: expected {{input: USD, output: USD}} per 1M tokens, and optionally "
                           "cached_input, cache_write, reasoning")
    values = {}
    for side in PRICE_FIELDS:
        if raw.get(side) is None and side not in ("input", "output"):
            continue
        try:
            values[side] = validation.number(f"{where}.{side}", raw.get(side), 0.0, 1e9)
        except validation.ValidationError as exc:
            raise PricingError(f"{exc} (a price in USD per 1M tokens)") from None
    return Price(**values)


# a snapshot name stands for its dated releases only: gpt-4o-2024-08-06, claude-x-20250929,
# model-latest, a Bedrock model's version; not for other models that share its start
RELEASE_SUFFIX = re.compile(r"^(-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest|v\d+(:\d+)?)|@.+)$")


def _match(models: Dict[str, Price], model: str, releases_only: bool) -> Optional[Price]:
    """The entry under the exact name, else under the longest listed name the model starts
    with followed by '-' (for the snapshot: followed by a release suffix only)."""
    found = models.get(model)
    if found is not None:
        return found
    best = ""
    for name in models:
        if len(name) > len(best) and model.startswith(name) and (
                RELEASE_SUFFIX.match(model[len(name):]) if releases_only else model.startswith(name + "-")):
            best = name
    return models[best] if best else None


@functools.lru_cache(maxsize=4)
def _load_snapshot(path: str, mtime_ns: int) -> Tuple[Table, str, str, Optional[str]]:
    """The snapshot's prices, version, digest and date, read once per version of the file (every
    app and worker loads prices at start)."""
    try:
        snap = price_snapshot.load(path)
        table = {str(service): {str(m): _price(f"{service}.{m}", p) for m, p in models.items()}
                 for service, models in snap["services"].items()}
    except (price_snapshot.SnapshotError, PricingError) as exc:
        raise PricingError(f"price snapshot {path}: {exc}") from None
    return table, str(snap["version"]), _digest(table), snap.get("date")


def _digest(table: Table) -> str:
    return hashlib.sha256(json.dumps(
        {s: {m: asdict(p) for m, p in models.items()} for s, models in table.items()},
        sort_keys=True).encode()).hexdigest()


class Pricing:
    """Prices by (service, model): the user's table first, by exact name, else by the longest
    listed name the model starts with followed by '-'; then the snapshot, by exact name or a
    listed name followed by a release suffix; then the default."""

    def __init__(self, prices: Table, default: Optional[Price] = None, snapshot: Optional[Table] = None,
                 version: str = "none", snapshot_digest: Optional[str] = None, date: Optional[str] = None):
        self.tables: List[Table] = [
            {s.lower(): dict(models) for s, models in table.items()} for table in (prices, snapshot or {})]
        self.default = default
        self.listed = frozenset(m for table in self.tables for models in table.values() for m in models)
        self.version = version
        self.date = date                 # the day the snapshot was taken, where it says
        self._cache: Dict[Tuple[str, str], Optional[Price]] = {}
        self.checksum = hashlib.sha256("".join(
            [snapshot_digest or _digest(self.tables[1]), _digest(self.tables[0]), repr(self.default)]).encode()
        ).hexdigest()[:12]

    @classmethod
    def load(cls, path: Optional[str] = None, snapshot_path: Optional[str] = None) -> "Pricing":
        """The pricing file (the packaged one, which lists no prices, by default) over the price
        snapshot (the packaged one by default)."""
        snapshot_path = snapshot_path or price_snapshot.DEFAULT_SNAPSHOT_FILE
        try:
            snapshot, version, digest, date = _load_snapshot(snapshot_path, os.stat(snapshot_path).st_mtime_ns)
        except OSError as exc:
            raise PricingError(f"price snapshot {snapshot_path}: {exc.strerror}") from None
        path = path or DEFAULT_PRICING_FILE
        try:
            with open(path, "r", encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PricingError(f"pricing file {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise PricingError(f"pricing file {path}: needs a 'services:' mapping")
        services = doc.get("services") or {}
        if not isinstance(services, dict):
            raise PricingError(f"pricing file {path}: needs a 'services:' mapping")
        if doc.get("currency", "USD") != "USD":
            raise PricingError(f"pricing file {path}: only USD prices are supported")
        prices = {}
        for service, models in services.items():
            if not isinstance(models, dict):
                raise PricingError(f"pricing file {path}: services.{service} must map models to prices")
            prices[str(service)] = {str(m): _price(f"services.{service}.{m}", p) for m, p in models.items()}
        default = doc.get("default")
        return cls(prices, _price("default", default) if default is not None else None, snapshot, version, digest,
                   date)

    def _find(self, service: str, model: str) -> Tuple[Optional[Price], str]:
        service = service.lower()
        for table, name in zip(self.tables, ("pricing file", "snapshot")):
            found = _match(table.get(service, {}), model, releases_only=name == "snapshot")
            if found is not None:
                return found, name
        if self.default is not None:
            return self.default, "default"
        return None, "none"

    def lists_model(self, model: str) -> bool:
        """Whether a table lists the model by its exact name (for any service): such a model
        keeps its own series whatever else is sent."""
        return model in self.listed

    def price(self, service: str, model: str) -> Optional[Price]:
        key = (service, model)
        if key in self._cache:
            return self._cache[key]
        found = self._find(service, model)[0]
        if len(self._cache) < 10_000:
            self._cache[key] = found
        return found

    def source(self, service: str, model: str) -> str:
        """Where a model's price comes from: 'pricing file', 'snapshot', 'default' or 'none'."""
        return self._find(service, model)[1]
