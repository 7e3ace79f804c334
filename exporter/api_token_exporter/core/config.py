"""One settings object, from keyword arguments, a YAML file and ATE_* environment variables.

Precedence: explicit keyword arguments > environment > YAML file > defaults. Secrets (ingest,
admin, metrics credentials) are read from the environment or from a file named by
``*_file``/``ATE_*_FILE`` so they never have to live in the repository.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import yaml

from . import digest_settings
from .durations import DurationError, parse_duration
from .errors import ConfigError, optional_import
from .geo import parse_trusted_proxies
from .ratelimit import WINDOW_ORDER

__all__ = ["Settings", "load_settings", "ConfigError", "optional_import", "duration_setting"]

DEFAULT_RATE_LIMITS = dict(zip(WINDOW_ORDER, (100, 1000, 10000)))  # per minute, hour and day


@dataclass
class Settings:
    # -- keys: who may call: API keys, admin and ingest credentials
    keys_file: Optional[str] = None
    allow_empty_keys: bool = False          # a missing or empty key file is an error unless True
    header_name: str = "X-API-Key"
    exempt_paths: List[str] = field(default_factory=lambda: ["/healthz"])
    trusted_proxies: List[str] = field(default_factory=list)   # CIDRs whose X-Forwarded-For is believed
    admin_token: Optional[str] = None       # enables /admin/* when set
    admin_rate_limit: int = 60              # analytics and admin requests per minute per credential
    auth_failure_limit: int = 20            # failed credentials per minute per client address; then 429 (0: off)
    ingest_token: Optional[str] = None      # enables the ingest endpoint when set
    ingest_allow_unknown_tokens: bool = False
    ingest_max_events: int = 1000
    ingest_max_bytes: int = 1_048_576
    # -- limits: rate limits
    rate_limits: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    observe_only: bool = False
    # -- storage: rate-limit storage and the metric store
    storage_uri: str = "memory://"
    storage_timeout: float = 0.1            # seconds to connect to and hear from Redis
    storage_failure_mode: str = "open"      # while Redis is away: open, closed (503) or local
    state_dir: Optional[str] = None         # metric files kept here survive restarts
    store_capacity: int = 4_000_000         # values (8 bytes each) one process's store can hold
    # -- metrics: what /metrics exports and who may read it
    metrics_path: str = "/metrics"
    metrics_port: Optional[int] = None      # serve /metrics on its own port instead of the app
    metrics_addr: str = "127.0.0.1"
    metrics_basic_user: Optional[str] = None
    metrics_basic_password: Optional[str] = None
    metrics_bearer_token: Optional[str] = None
    metrics_public: bool = False            # True: the app's /metrics answers without credentials
    max_tokens: int = 10_000                # distinct token label values per family
    max_routes: int = 500
    max_models: int = 200
    max_series_per_token: int = 1000        # label combinations of one token; then __overflow__
    known_routes: List[str] = field(default_factory=list)   # route templates a flood cannot push out
    max_clients: int = 100                  # clients with their own failed-authentication series
    country_lookup: bool = False            # count requests by the client's country (the geo extra)
    geo_database: Optional[str] = None      # a MaxMind-format country database; built-in RIR data if unset
    max_countries_per_token: int = 10
    pricing_file: Optional[str] = None      # your LLM prices; the packaged pricing.yml (none) by default
    prices_file: Optional[str] = None       # the price snapshot (prices update); the packaged one by default
    capture_llm_usage: bool = False         # read usage from OpenAI/Anthropic/Cohere responses
    capture_max_bytes: int = 1_048_576      # larger responses are not inspected
    recent_requests: int = 100              # ring buffer behind /admin/stats
    server_timing: bool = False             # a Server-Timing header with the middleware's own time
    # -- alerting: the alert API
    alertmanager_url: Optional[str] = None  # with admin_token: the alert API (active, history, acknowledge)
    alert_db_url: Optional[str] = None      # alert history: sqlite:///path or postgresql://...; state_dir/alerts.db
    alert_webhook_token: Optional[str] = None   # enables the webhook Alertmanager posts notifications to
    alert_sync_interval: float = 30.0       # seconds between syncs with Alertmanager and ALERTS (0: on demand)
    alert_rules_dir: Optional[str] = None   # rule files Prometheus reads: alert settings re-render them there
    thresholds_file: Optional[str] = None   # the thresholds the rules are rendered from (unset: the packaged ones)
    alertmanager_config_file: Optional[str] = None   # Alertmanager's file: alert settings change its channels
    # -- analytics: the analytics API, answered from Prometheus
    prometheus_url: Optional[str] = None    # enables the analytics API, answered from Prometheus
    prometheus_timeout: float = 10.0        # a deadline for a whole analytics answer
    analytics_max_days: int = 92            # the longest range /analytics/tokens answers
    analytics_cache_seconds: float = 10.0   # the same question within this time gets the same answer
    analytics_max_concurrent: int = 4       # answers computed from Prometheus at once, per process
    analytics_max_per_caller: int = 2       # of those, by one credential (a console page asks 2 at once)
    analytics_breaker_failures: int = 3     # answers in a row Prometheus could not give: then paused
    analytics_breaker_cooldown: float = 30.0    # how long analytics stay paused before a probe
    # -- console: the console (/ui)
    console_refresh_seconds: float = 30.0   # how often the console's pages refresh (0: only by the button)
    console_session_lifetime: float = 43200.0   # seconds a console sign-in lasts (12h)
    console_secret: Optional[str] = None    # signs console sessions; derived from admin_token if unset
    console_live_viewers: int = 10          # live views streaming at once, per process; more get 503
    console_live_seconds: float = 300.0     # a live view's stream ends after this; the page reconnects
    # -- digests: usage digests
    digest_schedule: str = "off"            # usage digests from the exporter service: off, daily or weekly
    digest_time: str = "08:00"              # when (UTC) the scheduled digest goes out
    digest_weekday: str = "monday"          # the weekly digest's day (it covers the 7 days before it)
    digest_scope: str = "overall"           # overall, or per-tenant: one digest per tenant of the key file
    digest_top_n: int = 5                   # tokens, endpoints and models listed
    digest_slack_webhook_url: Optional[str] = None     # secret (also *_file)
    digest_discord_webhook_url: Optional[str] = None   # secret (also *_file)
    digest_webhook_url: Optional[str] = None           # the digest JSON is posted here; secret (also *_file)
    digest_webhook_token: Optional[str] = None         # sent as a bearer token to digest_webhook_url
    digest_email_to: List[str] = field(default_factory=list)
    digest_smtp_host: Optional[str] = None
    digest_smtp_port: int = 587
    digest_smtp_tls: str = "starttls"       # starttls, ssl (port 465) or none
    digest_smtp_user: Optional[str] = None
    digest_smtp_password: Optional[str] = None         # secret (also *_file)
    digest_smtp_from: Optional[str] = None
    # -- proxy: the proxy's upstream
    upstream_pool_file: Optional[str] = None   # the proxy's upstream credentials (docs/proxy.md)
    upstream_url: Optional[str] = None      # the proxy's upstream base URL, over the pool file's
    upstream_connect_timeout: float = 5.0   # seconds to connect to the upstream
    upstream_read_timeout: float = 300.0    # seconds the upstream may stay silent, within a stream too
    upstream_max_connections: int = 20      # kept-alive upstream connections per process
    # -- serving: what one client may hold of `serve` and `proxy`
    http_header_timeout: float = 10.0       # seconds for a request's line and headers to arrive
    http_body_timeout: float = 30.0         # seconds for its body (each read of a streamed one)
    http_keepalive_timeout: float = 5.0     # an idle kept-alive connection is closed after this
    http_max_connections: int = 1000        # per worker process; more requests are answered 503

    def validate(self) -> "Settings":
        for window, value in self.rate_limits.items():
            if window not in DEFAULT_RATE_LIMITS:
                raise ConfigError(f"rate_limits: unknown window {window!r} ({', '.join(WINDOW_ORDER)})")
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"rate_limits.{window} must be a whole number >= 0")
        if not self.header_name or not self.header_name.replace("-", "").isalnum():
            raise ConfigError(f"header_name {self.header_name!r} is not a valid header name")
        if not 0 <= self.alert_sync_interval <= 86400:
            raise ConfigError("alert_sync_interval must be from 0 (sync on demand) to 86400 seconds")
        if self.alertmanager_url and not self.admin_token:
            raise ConfigError("alertmanager_url enables the alert API, which needs admin_token")
        if self.console_refresh_seconds != 0 and not 2 <= self.console_refresh_seconds <= 3600:
            raise ConfigError("console_refresh_seconds must be 0 (refresh by the button only) or from 2 to 3600")
        if not 60 <= self.console_session_lifetime <= 30 * 86400:
            raise ConfigError("console_session_lifetime must be from 60 seconds (1m) to 30 days (30d)")
        if self.console_secret is not None and len(self.console_secret) < 16:
            raise ConfigError("console_secret must be at least 16 characters")
        if not 10 <= self.console_live_seconds <= 86400:
            raise ConfigError("console_live_seconds must be from 10 to 86400")
        if not 0 <= self.analytics_cache_seconds <= 3600:
            raise ConfigError("analytics_cache_seconds must be from 0 to 3600")
        if self.storage_failure_mode not in ("open", "closed", "local"):
            raise ConfigError(f"storage_failure_mode must be open, closed or local, got "
                              f"{self.storage_failure_mode!r}")
        if not self.metrics_path.startswith("/"):
            raise ConfigError("metrics_path must start with /")
        if bool(self.metrics_basic_user) != bool(self.metrics_basic_password):
            raise ConfigError("metrics basic auth needs both user and password")
        parse_trusted_proxies(self.trusted_proxies)          # a bad entry is named at start-up
        digest_settings.check(self)
        for route in self.known_routes:
            if not isinstance(route, str) or not route.startswith("/"):
                raise ConfigError(f"known_routes: {route!r} is not a route template starting with /")
        for name in ("max_tokens", "max_routes", "max_models", "max_series_per_token", "max_clients", "max_countries_per_token",
                     "ingest_max_events",
                     "recent_requests", "capture_max_bytes", "store_capacity", "analytics_max_days",
                     "admin_rate_limit", "upstream_max_connections", "http_max_connections",
                     "analytics_max_concurrent", "analytics_max_per_caller", "analytics_breaker_failures",
                     "console_live_viewers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.auth_failure_limit < 0:
            raise ConfigError("auth_failure_limit must be 0 (off) or more")
        return self

    def section(self, name: str) -> Dict[str, object]:
        """The settings of one section (SECTIONS), by their names."""
        return {field_name: getattr(self, field_name) for field_name in SECTIONS[name]}


# The sections of the settings, as the YAML file may group them: ``metrics: {max_tokens: 5000}``
# is ``max_tokens: 5000``, ATE_MAX_TOKENS=5000 and --max-tokens 5000 (one name everywhere).
SECTIONS: Dict[str, Tuple[str, ...]] = {
    "keys": ("keys_file", "allow_empty_keys", "header_name", "exempt_paths", "trusted_proxies",
             "admin_token", "admin_rate_limit", "auth_failure_limit", "ingest_token", "ingest_allow_unknown_tokens",
             "ingest_max_events", "ingest_max_bytes"),
    "limits": ("rate_limits", "observe_only"),
    "storage": ("storage_uri", "storage_timeout", "storage_failure_mode", "state_dir", "store_capacity"),
    "metrics": ("metrics_path", "metrics_port", "metrics_addr", "metrics_basic_user",
                "metrics_basic_password", "metrics_bearer_token", "metrics_public", "max_tokens",
                "max_routes", "max_models", "max_series_per_token", "known_routes", "max_clients", "country_lookup", "geo_database",
                "max_countries_per_token", "pricing_file", "prices_file", "capture_llm_usage",
                "capture_max_bytes", "recent_requests", "server_timing"),
    "alerting": ("alertmanager_url", "alert_db_url", "alert_webhook_token", "alert_sync_interval",
                 "alert_rules_dir", "thresholds_file", "alertmanager_config_file"),
    "analytics": ("prometheus_url", "prometheus_timeout", "analytics_max_days", "analytics_cache_seconds",
                  "analytics_max_concurrent", "analytics_max_per_caller", "analytics_breaker_failures",
                  "analytics_breaker_cooldown"),
    "console": ("console_refresh_seconds", "console_session_lifetime", "console_secret", "console_live_viewers",
                "console_live_seconds"),
    "digests": ("digest_schedule", "digest_time", "digest_weekday", "digest_scope", "digest_top_n",
                "digest_slack_webhook_url", "digest_discord_webhook_url", "digest_webhook_url",
                "digest_webhook_token", "digest_email_to", "digest_smtp_host", "digest_smtp_port",
                "digest_smtp_tls", "digest_smtp_user", "digest_smtp_password", "digest_smtp_from"),
    "proxy": ("upstream_pool_file", "upstream_url", "upstream_connect_timeout", "upstream_read_timeout",
              "upstream_max_connections"),
    "serving": ("http_header_timeout", "http_body_timeout", "http_keepalive_timeout", "http_max_connections"),
}


_SECRET_FIELDS = ("metrics_basic_password", "metrics_bearer_token", "admin_token", "ingest_token",
                  "alert_webhook_token", "console_secret", "digest_slack_webhook_url",
                  "digest_discord_webhook_url", "digest_webhook_url", "digest_webhook_token",
                  "digest_smtp_password")
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
_DURATIONS = {"prometheus_timeout", "storage_timeout", "upstream_connect_timeout", "upstream_read_timeout",
              "console_session_lifetime", "http_header_timeout", "http_body_timeout", "http_keepalive_timeout",
              "analytics_breaker_cooldown"}
_OPTIONAL_INTS = {"metrics_port"}


def duration_setting(name: str, value) -> float:
    """A positive duration setting (core/durations.py's grammar), or a ConfigError naming it."""
    try:
        seconds = parse_duration(value, name)
    except DurationError as exc:
        raise ConfigError(str(exc)) from None
    if seconds <= 0:
        raise ConfigError(f"{name} must be a positive duration, got {value!r}")
    return seconds


def _coerce(name: str, value, template):
    if name in _DURATIONS:
        return duration_setting(name, value)
    if name in _OPTIONAL_INTS:
        template = 0
    if isinstance(template, bool):
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in _BOOLEANS:
            raise ConfigError(f"{name} must be true or false (also yes/no, on/off, 1/0), got {value!r}")
        return _BOOLEANS[word]
    if isinstance(template, float) and not isinstance(value, (int, float)):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(template, float) and (isinstance(value, bool) or not math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(template, int) and isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if isinstance(template, int) and not isinstance(value, int):
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(template, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(template, dict) and isinstance(value, str):
        out = {}
        for part in value.split(","):
            k, _, v = part.partition("=")
            try:
                out[k.strip()] = int(v)
            except ValueError:
                raise ConfigError(f"{name}: expected window=N pairs, got {part!r}") from None
        return out
    return value


def _read_secret_file(name: str, path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{name}_file {path}: {exc.strerror}") from None


def _flatten_sections(doc: dict, where: str) -> dict:
    """A settings file's mapping with its sections opened: each section holds settings by their
    own names (and a secret's ``*_file``); the flat form is accepted as well."""
    flat = {name: value for name, value in doc.items() if name not in SECTIONS}
    for section, names in SECTIONS.items():
        if section not in doc:
            continue
        body = doc[section]
        if not isinstance(body, dict):
            raise ConfigError(f"config file {where}: {section} must be a mapping of settings "
                              f"({', '.join(names)})")
        for name, value in body.items():
            base = name[:-len("_file")] if str(name).endswith("_file") else None
            if name not in names and not (base in names and base in _SECRET_FIELDS):
                home = next((s for s, members in SECTIONS.items() if name in members), None)
                raise ConfigError(f"config file {where}: {section}.{name} is not a setting of the {section} "
                                  "section" + (f" (it belongs in {home})" if home else ""))
            if name in flat:
                raise ConfigError(f"config file {where}: {name} is given twice (at the top and in {section})")
            flat[name] = value
    return flat


def load_settings(config_file: Optional[str] = None, environ=None, **overrides) -> Settings:
    environ = os.environ if environ is None else environ
    defaults = Settings()
    values: Dict[str, object] = {}
    config_file = config_file or environ.get("ATE_CONFIG")
    if config_file:
        try:
            with open(config_file, "r", encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping")
        values.update(_flatten_sections(doc, config_file))
    known = {f.name for f in fields(Settings)}
    for f in fields(Settings):
        env_value = environ.get("ATE_" + f.name.upper())
        if env_value is not None:
            values[f.name] = env_value
        if f.name in _SECRET_FIELDS:
            file_value = values.pop(f.name + "_file", None) or environ.get(
                "ATE_" + f.name.upper() + "_FILE")
            if file_value and f.name not in values:
                values[f.name] = _read_secret_file(f.name, file_value)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    for name, value in list(values.items()):
        values[name] = _coerce(name, value, getattr(defaults, name))
    if "rate_limits" in values:
        values["rate_limits"] = {**DEFAULT_RATE_LIMITS, **values["rate_limits"]}
    return Settings(**values).validate()
