"""The thresholds every rule, alert, dashboard line and in-process check is rendered from.

The defaults ship in the package (``thresholds.yml`` beside this module, the same file as the
repository's prometheus/thresholds.yml): a pip install renders the rules and the dashboards, and
the alert API changes them, without a checkout.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import yaml

from ..core.metrics import TOKEN_LATENCY_BUCKETS
from . import anomaly_rules, upstream_rules
from .promql import ThresholdError, seconds

PACKAGED_THRESHOLDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "thresholds.yml")
CHECKOUT_THRESHOLDS = os.path.join("prometheus", "thresholds.yml")


def default_thresholds_file() -> str:
    """prometheus/thresholds.yml in the current directory (a checkout, or a user's copy beside
    their rules), else the packaged defaults."""
    return CHECKOUT_THRESHOLDS if os.path.isfile(CHECKOUT_THRESHOLDS) else PACKAGED_THRESHOLDS


def load_thresholds(path: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """The thresholds of ``path`` (the packaged defaults if None), with ``overrides`` merged in,
    validated: a ThresholdError names what is wrong."""
    with open(path or PACKAGED_THRESHOLDS, "r", encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if overrides:
        doc = deep_merge(doc, overrides)
    validate(doc)
    return doc


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(t: dict) -> None:
    def need(path: str, check, what: str):
        node = t
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ThresholdError(f"thresholds: {path} is missing")
            node = node[part]
        if not check(node):
            raise ThresholdError(f"thresholds: {path} must be {what}, got {node!r}")

    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    def duration(v):
        try:
            seconds(v)
            return True
        except ThresholdError:
            return False

    for p in ("rate_window", "coarse_window", "latency.for", "error_rate.for", "usage_spike.for",
              "usage_spike.learning_period",
              "unauthorized.window", "unauthorized.for", "rate_limit.approaching_for",
              "rate_limit.refused_for", "rate_limit.exhaustion_for", "token_state.for",
              "budgets.for", "budgets.forecast_for",
              "exporter.down_for", "exporter.absent_for", "key_file.for", "rate_limit_storage.for",
              "series_budget.for", "notifications.down_for", "notifications.failing_for"):
        need(p, duration, "a duration such as 5m")
    for p in ("key_lifecycle.expiring_within", "key_lifecycle.old_secret_warn_before", "key_lifecycle.for",
              "key_lifecycle.interval"):
        need(p, duration, "a duration such as 7d")
    for p in ("key_lifecycle.unused_for", "key_lifecycle.not_rotated_for"):
        need(p, lambda v: v is None or duration(v), "a duration such as 30d, or null (off)")
    for p in ("latency.warning", "latency.critical", "error_rate.warning", "error_rate.critical",
              "usage_spike.warning", "usage_spike.critical", "unauthorized.critical",
              "latency.min_requests", "error_rate.min_requests",
              "usage_spike.min_requests_per_second", "unauthorized.api_wide_warning"):
        need(p, positive, "a number above 0")
    need("latency.quantile", lambda v: positive(v) and v < 1, "between 0 and 1")
    top = TOKEN_LATENCY_BUCKETS[-1]
    for p in ("latency.warning", "latency.critical"):     # a quantile estimate never exceeds it
        need(p, lambda v: v < top, f"below {top:g} (the last bound of the per-token latency histogram)")
    need("rate_limit.refused_critical_for", lambda v: v is None or duration(v), "a duration or null")
    need("rate_limit.approaching_ratio", lambda v: positive(v) and v <= 1, "between 0 and 1")
    need("budgets.warning", lambda v: positive(v) and v < 1, "between 0 and 1")
    need("budgets.critical", lambda v: positive(v) and v < 1, "between 0 and 1")
    if t["budgets"]["warning"] >= t["budgets"]["critical"]:
        raise ThresholdError("thresholds: budgets.warning must be below budgets.critical")
    for period, spec in t["budgets"]["forecast"].items():
        if period not in ("daily", "monthly"):
            raise ThresholdError(f"thresholds: budgets.forecast.{period}: daily or monthly only")
        seconds(spec["range"]), seconds(spec["horizon"])
    for level in ("latency", "error_rate", "usage_spike"):
        if t[level]["warning"] >= t[level]["critical"]:
            raise ThresholdError(f"thresholds: {level}.warning must be below {level}.critical")
    for window, spec in t["rate_limit"]["exhaustion"].items():
        if window not in ("hour", "day"):
            raise ThresholdError(f"thresholds: rate_limit.exhaustion.{window}: hour or day only")
        seconds(spec["range"]), seconds(spec["horizon"])
    anomaly_rules.validate(t)
    upstream_rules.validate(t)
