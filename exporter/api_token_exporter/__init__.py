"""api-token-exporter: per-API-token usage analytics for Prometheus.

    from api_token_exporter import TokenAnalytics
    TokenAnalytics(app, keys_file="keys.yml")            # Flask or any WSGI app

    from api_token_exporter.asgi import TokenAnalytics    # FastAPI, Starlette, any ASGI app

The package is layered (docs/architecture.md): ``core`` (keys, validation, rate limits, the
store, the metric catalogue, the recording core), ``mixin`` (rules, dashboards, thresholds),
``alerting``, ``analytics``, ``web`` (the WSGI and ASGI faces over one request pipeline, the
built-in endpoints, the console, the server), ``proxy`` and ``cli``.
"""
import importlib

__version__ = "0.1.0"

# name -> module: imported on first use, so `api-token-exporter --help` and the submodules a
# command needs load no web framework they do not use
_EXPORTS = {
    "TokenAnalytics": "web.wsgi", "record_llm_usage": "web.wsgi", "current_token": "web.wsgi",
    "Settings": "core.config", "load_settings": "core.config", "ConfigError": "core.errors",
    "KeyStore": "core.keystore", "KeyStoreError": "core.keystore", "hash_key": "core.keystore",
    "mask_key": "core.keystore", "UsageError": "core.usage", "ValidationError": "core.validation",
    "PricingError": "core.pricing", "DurationError": "core.durations", "TimestampError": "core.timestamps",
    "ThresholdError": "mixin.promql", "AlertService": "alerting.checks",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
