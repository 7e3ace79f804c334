"""The ASGI middleware under its public name: ``from api_token_exporter.asgi import TokenAnalytics``
(it lives in ``api_token_exporter.web.asgi``)."""
from .web.asgi import TokenAnalytics, current_token, record_llm_usage

__all__ = ["TokenAnalytics", "current_token", "record_llm_usage"]
