"""api-token-exporter: per-API-token usage analytics for Prometheus.

    from api_token_exporter import TokenAnalytics
    TokenAnalytics(app, keys_file="keys.yml")
"""
from .alerting.checks import AlertService
from .core.config import Settings, load_settings
from .core.keystore import KeyStore, hash_key, mask_key
from .web.wsgi import TokenAnalytics, current_token, record_llm_usage
from .core.usage import UsageError

__version__ = "0.1.0"
__all__ = ["TokenAnalytics", "record_llm_usage", "current_token", "Settings", "load_settings",
           "KeyStore", "hash_key", "mask_key", "UsageError", "AlertService",
           "__version__"]
