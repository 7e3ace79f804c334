"""LLM prices per 1M tokens from a YAML file (the packaged pricing.yml by default)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import yaml

from . import validation

DEFAULT_PRICING_FILE = os.path.join(os.path.dirname(__file__), "pricing.yml")


class PricingError(ValueError):
    pass


@dataclass(frozen=True)
class Price:
    input: float     # USD per 1M input tokens
    output: float    # USD per 1M output tokens

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


def _price(where: str, raw) -> Price:
    if not isinstance(raw, dict) or set(raw) - {"input", "output"} or not raw:
        raise PricingError(f"{where}: expected {{input: USD, output: USD}} per 1M tokens")
    values = {}
    for side in ("input", "output"):
        try:
            values[side] = validation.number(f"{where}.{side}", raw.get(side), 0.0, 1e9)
        except validation.ValidationError as exc:
            raise PricingError(f"{exc} (a price in USD per 1M tokens)") from None
    return Price(**values)


class Pricing:
    def __init__(self, prices: Dict[str, Dict[str, Price]], default: Optional[Price] = None):
        self.prices = {s.lower(): {m: p for m, p in models.items()} for s, models in prices.items()}
        self.default = default
        self._cache: Dict[Tuple[str, str], Optional[Price]] = {}

    @classmethod
    def load(cls, path: Optional[str] = None) -> "Pricing":
        path = path or DEFAULT_PRICING_FILE
        try:
            with open(path, "r", encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PricingError(f"pricing file {path}: {exc}") from None
        if not isinstance(doc.get("services"), dict):
            raise PricingError(f"pricing file {path}: needs a 'services:' mapping")
        if doc.get("currency", "USD") != "USD":
            raise PricingError(f"pricing file {path}: only USD prices are supported")
        prices = {}
        for service, models in doc["services"].items():
            if not isinstance(models, dict):
                raise PricingError(f"pricing file {path}: services.{service} must map models to prices")
            prices[str(service)] = {str(m): _price(f"services.{service}.{m}", p)
                                    for m, p in models.items()}
        default = doc.get("default")
        return cls(prices, _price("default", default) if default is not None else None)

    def price(self, service: str, model: str) -> Optional[Price]:
        """The price of a model, the longest listed prefix ending at a '-', or the default."""
        key = (service, model)
        if key in self._cache:
            return self._cache[key]
        models = self.prices.get(service.lower(), {})
        found = models.get(model)
        if found is None:
            best = ""
            for name in models:
                if model.startswith(name + "-") and len(name) > len(best):
                    best = name
            found = models.get(best) if best else None
        if found is None:
            found = self.default
        if len(self._cache) < 10_000:
            self._cache[key] = found
        return found
