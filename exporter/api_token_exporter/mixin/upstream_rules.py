"""Rules for the proxy's upstream credential pool (docs/proxy.md), rendered with the others from
the ``upstream:`` section of prometheus/thresholds.yml.

The pool's quota is counted per account, not per credential: GitHub's tokens of one account
share one quota, and each of them reports it. ``apitoken_upstream_credential_info`` gives each
credential its account; an account counts once (the lowest remaining any credential or replica
reports, the freshest within a window), a window whose reset passed counts as full again, and
invalid credentials count not at all.
"""
from __future__ import annotations

from typing import List

from .promql import ThresholdError, seconds

JOIN = "* on (job, instance, credential, provider) group_left (account) apitoken_upstream_credential_info"
VALID = ('unless on (credential, provider) '
         '(max by (credential, provider) (apitoken_upstream_credential_status{status="invalid"}) == 1)')
REMAINING = "account_provider_resource:apitoken_upstream_rate_limit_remaining:min"
LIMIT = "account_provider_resource:apitoken_upstream_rate_limit_limit:max"
POOL_REMAINING = "provider_resource:apitoken_upstream_rate_limit_remaining:sum"
POOL_LIMIT = "provider_resource:apitoken_upstream_rate_limit_limit:sum"
HEADROOM = "provider_resource:apitoken_upstream_headroom:ratio"
NEXT_RESET = "provider_resource:apitoken_upstream_rate_limit_reset_timestamp_seconds:min"


def validate(t: dict) -> None:
    u = t.get("upstream")
    if not isinstance(u, dict):
        raise ThresholdError("thresholds: upstream is missing")
    try:
        for key in ("headroom_for", "invalid_for", "exhausted_for", "exhaustion_for"):
            seconds(u[key])
        seconds(u["exhaustion"]["range"]), seconds(u["exhaustion"]["horizon"])
    except (KeyError, TypeError):
        raise ThresholdError("thresholds: upstream needs headroom_warning, headroom_for, invalid_for, "
                             "exhausted_for, exhaustion.range, exhaustion.horizon, exhaustion_for") from None
    share = u.get("headroom_warning")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ThresholdError("thresholds: upstream.headroom_warning must be between 0 and 1")


def recording_rules(t: dict) -> List[dict]:
    key = "on (job, instance, credential, provider, resource)"
    rules = [
        {"record": REMAINING,
         "expr": ("min by (account, provider, resource) (\n"
                  f"  (\n    apitoken_upstream_rate_limit_remaining\n"
                  f"      unless {key} (apitoken_upstream_rate_limit_reset_timestamp_seconds <= time())\n"
                  "    or apitoken_upstream_rate_limit_limit\n  )\n"
                  f"  {JOIN}\n  {VALID}\n)")},
        {"record": LIMIT,
         "expr": f"max by (account, provider, resource) (\n  apitoken_upstream_rate_limit_limit\n  {JOIN}\n  {VALID}\n)"},
        {"record": POOL_REMAINING, "expr": f"sum by (provider, resource) ({REMAINING})"},
        {"record": POOL_LIMIT, "expr": f"sum by (provider, resource) ({LIMIT})"},
        {"record": HEADROOM, "expr": f"{POOL_REMAINING}\n/ on (provider, resource)\n({POOL_LIMIT} > 0)"},
        {"record": NEXT_RESET,
         "expr": ("min by (provider, resource) (\n"
                  f"  (apitoken_upstream_rate_limit_reset_timestamp_seconds > time())\n  {VALID}\n)")},
    ]
    return [{"name": "apitoken.upstream.recording", "rules": rules}]


def alert_rules(t: dict, alert) -> List[dict]:
    u = t["upstream"]
    share = u["headroom_warning"]
    ex = u["exhaustion"]
    horizon = int(seconds(ex["horizon"]))
    return [{"name": "apitoken.upstream", "rules": [
        alert(t, "ApiTokenUpstreamPoolHeadroomLow", "warning", f"{HEADROOM} < {share:g}", u["headroom_for"],
              "The {{ $labels.provider }} credential pool is running low on {{ $labels.resource }}",
              ("{{ $value | humanizePercentage }} of the {{ $labels.provider }} pool's {{ $labels.resource }} "
               f"quota is left across its accounts (warning below {share * 100:g}%): the proxy will soon "
               "answer 429 to its clients."),
              threshold=f"{share * 100:g}% left", value="{{ $value | humanizePercentage }} left"),
        alert(t, "ApiTokenUpstreamCredentialInvalid", "warning",
              'max by (credential, provider) (apitoken_upstream_credential_status{status="invalid"}) == 1',
              u["invalid_for"],
              "Upstream credential {{ $labels.credential }} is refused by {{ $labels.provider }}",
              ("The upstream answers 401 (or 403 without rate-limit headers) to credential "
               "{{ $labels.credential }}: it is out of the pool, which has that much less quota. Revoked, "
               "expired or mistyped: replace its secret."),
              threshold="401 from the upstream"),
        alert(t, "ApiTokenUpstreamPoolExhausted", "critical",
              'max by (provider) (apitoken_upstream_credential_status{status="active"}) == 0',
              u["exhausted_for"],
              "No {{ $labels.provider }} credential of the pool can take requests",
              ("Every {{ $labels.provider }} credential of the proxy's pool is rate limited, invalid or cooling "
               "down: clients get 429 (with Retry-After at the earliest reset) or 503."),
              threshold="no active credential"),
        alert(t, "ApiTokenUpstreamExhaustionPredicted", "warning",
              (f"-predict_linear({POOL_REMAINING}[{ex['range']}], {horizon}) > 0\n"
               f"and {POOL_REMAINING} > 0\n"
               f"and ({NEXT_RESET} - time()) > {horizon}"),
              u["exhaustion_for"],
              f"The {{{{ $labels.provider }}}} pool runs out of {{{{ $labels.resource }}}} within {ex['horizon']}",
              (f"At the pace of the last {ex['range']}, the {{{{ $labels.provider }}}} pool's "
               f"{{{{ $labels.resource }}}} quota reaches 0 within {ex['horizon']}, before any of its windows "
               "resets (about {{ $value | printf \"%.0f\" }} more than it has left)."),
              threshold=f"0 left within {ex['horizon']}",
              value=f'{{{{ $value | printf "%.0f" }}}} short in {ex["horizon"]}'),
    ]}]
