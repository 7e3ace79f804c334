"""Upstream rate-limit headers of each provider in one shape: per resource a limit, what
remains and when it resets (Unix seconds), plus ``Retry-After``.

- GitHub: ``x-ratelimit-limit``, ``-remaining``, ``-used``, ``-reset`` (Unix seconds) and
  ``-resource`` (``core``, ``search``, ``graphql``, ...): one resource per response; the body of
  ``GET /rate_limit`` has them all (it costs no quota).
- OpenAI: ``x-ratelimit-{limit,remaining}-{requests,tokens}`` and
  ``x-ratelimit-reset-{requests,tokens}`` as Go durations (``1s``, ``6m0s``, ``12ms``,
  ``1m12.336s``); ``retry-after-ms`` beside ``retry-after`` on a 429.
- Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
  remaining,reset}``, resets in RFC 3339.
- generic: header names from the pool file; resets as Unix seconds, seconds from now, RFC 3339
  or a duration (``auto``: a number above 10^9 is Unix time, a smaller one seconds from now).
- ``Retry-After``: seconds or an HTTP date.

Values that do not parse are ignored, never guessed: a resource needs a limit or a remaining
count to be reported. Resource names become label values, so they are checked here.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Optional, Tuple

PROVIDERS = ("github", "openai", "anthropic", "generic")
# the resources whose exhaustion makes a credential rate_limited (others only refuse the
# requests that need them: GitHub's search limit does not stop core requests)
PRIMARY = {"github": ("core",), "openai": ("requests", "tokens"),
           "anthropic": ("requests", "tokens", "input_tokens", "output_tokens"), "generic": ("default",)}
ANTHROPIC_RESOURCES = ("requests", "tokens", "input-tokens", "output-tokens")
OPENAI_RESOURCES = ("requests", "tokens")
RESET_FORMATS = ("auto", "epoch", "seconds", "rfc3339", "duration")
MAX_RESOURCES = 16                       # per account: more are ignored (label values)
_RESOURCE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Limit:
    limit: Optional[float] = None
    remaining: Optional[float] = None
    reset_at: Optional[float] = None      # Unix seconds
    used: Optional[float] = None

    def current(self, now: float) -> "Limit":
        """As of ``now``: a window whose reset has passed is full again."""
        if self.reset_at is not None and self.reset_at <= now and self.limit is not None:
            return Limit(self.limit, self.limit, None, 0.0)
        return self

    def exhausted(self, now: float) -> bool:
        return (self.remaining is not None and self.remaining <= 0
                and (self.reset_at is None or self.reset_at > now))

    def ratio(self) -> Optional[float]:
        if self.limit and self.remaining is not None:
            return max(0.0, min(1.0, self.remaining / self.limit))
        return None


@dataclass
class Observation:
    limits: Dict[str, Limit] = field(default_factory=dict)
    retry_after: Optional[float] = None   # Unix seconds from which to try again
    resource: Optional[str] = None        # GitHub: the resource this response counted against

    @property
    def has_rate_limit_headers(self) -> bool:
        return bool(self.limits) or self.retry_after is not None


def lower_headers(headers) -> Dict[str, str]:
    """Header names in lower case; the first value of a repeated header wins."""
    items = headers.items() if hasattr(headers, "items") else headers
    out: Dict[str, str] = {}
    for name, value in items:
        out.setdefault(name.lower(), value)
    return out


def number(value) -> Optional[float]:
    if value is None:
        return None
    try:
        n = float(str(value).strip())
    except ValueError:
        return None
    return n if math.isfinite(n) and n >= 0 else None


def parse_duration(text) -> Optional[float]:
    """Seconds in a Go duration as OpenAI sends it: ``1s``, ``6m0s``, ``12ms``, ``1h2m3.5s``;
    a bare number is seconds."""
    if text is None:
        return None
    text = str(text).strip()
    plain = number(text)
    if plain is not None:
        return plain
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos else None


def parse_rfc3339(text) -> Optional[float]:
    if not text:
        return None
    value = str(text).strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", value)
    if match and match.group(2):                 # at most microseconds for fromisoformat
        value = match.group(1) + match.group(2)[:7].ljust(7, "0") + match.group(3)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def parse_retry_after(value, now: float) -> Optional[float]:
    """Unix time from a ``Retry-After`` value: delay seconds or an HTTP date."""
    if value is None:
        return None
    seconds = number(value)
    if seconds is not None:
        return now + seconds
    try:
        parsed = email.utils.parsedate_to_datetime(str(value).strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def resource_name(raw: str) -> Optional[str]:
    name = str(raw).strip().lower().replace("-", "_")
    return name if _RESOURCE_RE.match(name) else None


def _retry(h: Mapping[str, str], now: float) -> Optional[float]:
    ms = number(h.get("retry-after-ms"))
    if ms is not None:
        return now + ms / 1000.0
    return parse_retry_after(h.get("retry-after"), now)


def _limit(limit, remaining, reset_at, used=None) -> Optional[Limit]:
    limit, remaining, used = number(limit), number(remaining), number(used)
    if limit is None and remaining is None:
        return None
    return Limit(limit, remaining, reset_at, used)


def github(headers, now: float) -> Observation:
    h = lower_headers(headers)
    obs = Observation(retry_after=_retry(h, now))
    resource = resource_name(h.get("x-ratelimit-resource") or "core")
    reset = number(h.get("x-ratelimit-reset"))
    found = _limit(h.get("x-ratelimit-limit"), h.get("x-ratelimit-remaining"), reset,
                   h.get("x-ratelimit-used"))
    if found is not None and resource:
        obs.limits[resource] = found
        obs.resource = resource
    return obs


def github_rate_limit_body(doc, now: float) -> Observation:
    """The JSON of GitHub's ``GET /rate_limit``: {"resources": {"core": {"limit", "used",
    "remaining", "reset"}, "search": {...}, ...}}."""
    obs = Observation()
    resources = doc.get("resources") if isinstance(doc, dict) else None
    if not isinstance(resources, dict):
        return obs
    for raw, values in list(resources.items())[:MAX_RESOURCES]:
        name = resource_name(raw)
        if name and isinstance(values, dict):
            found = _limit(values.get("limit"), values.get("remaining"), number(values.get("reset")),
                           values.get("used"))
            if found is not None:
                obs.limits[name] = found
    return obs


def openai(headers, now: float) -> Observation:
    h = lower_headers(headers)
    obs = Observation(retry_after=_retry(h, now))
    for resource in OPENAI_RESOURCES:
        delay = parse_duration(h.get(f"x-ratelimit-reset-{resource}"))
        found = _limit(h.get(f"x-ratelimit-limit-{resource}"), h.get(f"x-ratelimit-remaining-{resource}"),
                       None if delay is None else now + delay)
        if found is not None:
            obs.limits[resource] = found
    return obs


def anthropic(headers, now: float) -> Observation:
    h = lower_headers(headers)
    obs = Observation(retry_after=_retry(h, now))
    for resource in ANTHROPIC_RESOURCES:
        prefix = f"anthropic-ratelimit-{resource}-"
        found = _limit(h.get(prefix + "limit"), h.get(prefix + "remaining"), parse_rfc3339(h.get(prefix + "reset")))
        if found is not None:
            obs.limits[resource.replace("-", "_")] = found
    return obs


@dataclass(frozen=True)
class GenericHeaders:
    """Where a generic upstream reports its limit (the pool file's ``rate_limit_headers``)."""
    limit: str = "x-ratelimit-limit"
    remaining: str = "x-ratelimit-remaining"
    reset: str = "x-ratelimit-reset"
    reset_format: str = "auto"
    resource: str = "default"


def parse_reset(value, fmt: str, now: float) -> Optional[float]:
    if value is None:
        return None
    if fmt == "rfc3339":
        return parse_rfc3339(value)
    if fmt == "duration":
        delay = parse_duration(value)
        return None if delay is None else now + delay
    n = number(value)
    if n is None:
        return None
    if fmt == "epoch" or (fmt == "auto" and n > 1e9):
        return n
    return now + n


def generic(headers, now: float, names: GenericHeaders = GenericHeaders()) -> Observation:
    h = lower_headers(headers)
    obs = Observation(retry_after=_retry(h, now))
    found = _limit(h.get(names.limit.lower()), h.get(names.remaining.lower()),
                   parse_reset(h.get(names.reset.lower()), names.reset_format, now))
    if found is not None:
        obs.limits[names.resource] = found
    return obs


def parse(provider: str, headers, now: float, names: Optional[GenericHeaders] = None) -> Observation:
    if provider == "github":
        return github(headers, now)
    if provider == "openai":
        return openai(headers, now)
    if provider == "anthropic":
        return anthropic(headers, now)
    return generic(headers, now, names or GenericHeaders())


def resources_for(provider: str, method: str, path: str, names: Optional[GenericHeaders] = None) -> Tuple[str, ...]:
    """The resources a request will use: the scarcest of them decides which credential takes it."""
    if provider == "github":
        if path.startswith("/search/code"):
            return ("code_search",)
        if path.startswith("/search/"):
            return ("search",)
        if path.startswith("/graphql"):
            return ("graphql",)
        return ("core",)
    if provider == "generic":
        return ((names or GenericHeaders()).resource,)
    return PRIMARY[provider]


def primary(provider: str, names: Optional[GenericHeaders] = None) -> Tuple[str, ...]:
    if provider == "generic":
        return ((names or GenericHeaders()).resource,)
    return PRIMARY[provider]


# response headers that describe the upstream credential's quota, not the client's: dropped
# before the answer reaches the client unless the pool file says forward_rate_limit_headers
RATE_LIMIT_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "ratelimit", "retry-after-ms")


def is_rate_limit_header(name: str, extra: Iterable[str] = ()) -> bool:
    lname = name.lower()
    return lname.startswith(RATE_LIMIT_HEADER_PREFIXES) or lname in extra
