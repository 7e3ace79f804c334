"""PromQL building blocks the rule and dashboard generators share, and the duration grammar of
what goes into PromQL as it is written (core/durations.py's, with whole units only)."""
from __future__ import annotations

from ..core.durations import DurationError, format_duration as fmt_duration, prometheus_duration

__all__ = ["ThresholdError", "seconds", "fmt_duration", "quantile_name", "counts_from_start", "born",
           "exact_increase", "counted",
           "rate_limit", "rate_limit_used", "ERRORS", "TOKEN_STATUS", "USABLE"]


class ThresholdError(ValueError):
    pass


def seconds(duration: str) -> float:
    """A duration as Prometheus writes it (30s, 5m, 1h30m) in seconds, or a ThresholdError."""
    try:
        return prometheus_duration(duration)
    except DurationError as exc:
        raise ThresholdError(str(exc)) from None


ERRORS = 'apitoken_requests_total{code=~"5.."}'


def quantile_name(value: float) -> str:
    """0.95 -> 'p95'."""
    return "p" + f"{value * 100:g}".replace(".", "_")


def counts_from_start(window: str, job: str) -> str:
    """Per target: whether a counter series born within ``window`` counted all of its value in
    the window: the target was up at the window's start, or it is new to Prometheus (no scrape
    in the day before: a new instance, or Prometheus itself new). A target that was down or away
    at the window's start and had been scraped before (back with its counts kept in state_dir,
    or Prometheus back from an outage) is not: its series' values are not this window's.
    Recorded once per target and window (job_instance:apitoken_counts_from_start:WINDOW)."""
    up = f'up{{job=~"{job}"}}'
    return f"{up} offset {window} == 1 or {up} unless on (job, instance) present_over_time({up}[1d] offset {window})"


def born(selector: str, window: str, job: str, recorded: bool = False) -> str:
    """The series of a counter born within ``window`` whose whole value is what they counted in
    the window (``counts_from_start``: its record where the rules keep one for ``window``)."""
    eligible = (f"job_instance:apitoken_counts_from_start:{window}" if recorded
                else f"({counts_from_start(window, job)})")
    return f"(({selector} unless {selector} offset {window}) and on (job, instance) {eligible})"


def exact_increase(counter: str, window: str, job: str, recorded: bool = False) -> str:
    """How much each series of a counter rose over ``window``: the difference of the raw samples,
    no extrapolation, so whole events stay whole; a series born within the window counts in full
    (``born``); one with no sample at the window's start that is not born there, or reset within
    it, counts its rise since its lowest sample in the window."""
    return (f"({counter} - {counter} offset {window} >= 0 or {born(counter, window, job, recorded)}"
            f" or {counter} - min_over_time({counter}[{window}]))")


def counted(selector: str, window: str, job: str, fn: str = "rate", recorded: bool = False) -> str:
    """rate() or increase() of each series, where a series born within the window counts its
    whole value (``born``): rate() starts from a series' first sample, so the events before it
    (a token's first request, its first 5xx, its first 429 in a window) would be lost. Series
    appear at their first event, not at 0 (docs/metrics.md "Series budget")."""
    new = born(selector, window, job, recorded)
    if fn == "rate":
        new += f" / {int(seconds(window))}"
    return f"({new} or {fn}({selector}[{window}]))"


def rate_limit(token_selector: str = "", window_selector: str = "") -> str:
    """Each (token, window)'s limit: its own (``apitoken_rate_limit_limit``, exported only where
    the key sets one) or the default of its window, for every token with that window."""
    def sel(*parts):
        parts = [p for p in parts if p]
        return "{" + ",".join(parts) + "}" if parts else ""
    both = sel(token_selector, window_selector)
    return (f"(max by (token, window) (apitoken_rate_limit_limit{both})\n"
            f" or on (token, window)\n"
            f" (0 * max by (token, window) (apitoken_rate_limit_remaining{both})\n"
            f"  + on (window) group_left () max by (window) (apitoken_rate_limit_default_limit{sel(window_selector)})))")


# apitoken_token_status values (metrics.TOKEN_STATUS_VALUES)
TOKEN_STATUS = "max by (token) (apitoken_token_status)"


USABLE = f"{TOKEN_STATUS} <= 1"                    # active or rate_limited


def per_second(value: str = "$value") -> str:
    """A template showing a request rate as people read it: 0.02, 2.5, 1.234k (``humanize``
    alone writes 20m for 0.02, which reads as minutes)."""
    return (f'{{{{ if lt {value} 1.0 }}}}{{{{ {value} | printf "%.2f" }}}}'
            f'{{{{ else }}}}{{{{ {value} | humanize }}}}{{{{ end }}}}')


def piped(function: str):
    """A template showing a value through one of Prometheus's template functions."""
    return lambda value="$value": f"{{{{ {value} | {function} }}}}"


def rate_limit_used() -> str:
    """Each (token, window)'s share of its limit used, as the token's last request left it (not
    recorded: one alert and one dashboard panel read it)."""
    return ("max by (token, window) (\n"
            f"  1 - apitoken_rate_limit_remaining / on (token, window) group_left () ({rate_limit()} > 0)\n)")
