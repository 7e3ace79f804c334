"""The one request pipeline under every face: the WSGI and ASGI middleware and the proxy admit,
refuse, limit, capture and record through these functions, so the same request gets the same
status, body, headers and metrics from each.

    key, token, refusal, headers = admit(core, raw_key, observe_only, client_of, request)
    if refusal: answer it (status, {"detail": ...}, headers) and core.record_request
    else: call the app with the headers added to its answer; at its end, record it and
          capture_llm_usage(core, token, response headers, body) when capture is on

The request being handled is the context variable CURRENT (``CURRENT.set(call)``, then
``leave``), which ``current_call`` reads for ``record_llm_usage`` and ``current_token``.
"""
from __future__ import annotations

import contextvars
import math
import time
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..core.keystore import ApiKey
from ..core.ratelimit import WINDOW_ORDER, Decision, StorageUnavailable
from ..core.usage import LLMUsage, UsageError

Headers = List[Tuple[str, str]]
Admission = Tuple[Optional[ApiKey], Optional[str], Optional["Refusal"], Headers]

REFUSALS = {
    "missing": (401, "Missing API key"),
    "invalid": (401, "Invalid API key"),
    "inactive": (403, "API key is inactive"),
    "expired": (401, "API key has expired"),
    "rotated": (401, "API key was rotated and its grace period is over: use the new key"),
}


class Refusal:
    """An answer given instead of the app's: its status, the ``detail`` of its JSON body and
    its headers."""
    __slots__ = ("code", "detail", "headers")

    def __init__(self, code: int, detail: str, headers: Headers = ()):
        self.code, self.detail, self.headers = code, detail, list(headers)

    def body(self) -> dict:
        return {"detail": self.detail}


NO_HEADERS: Headers = ()           # shared: a face only tests it and adds it to a copy


def admit(core, raw_key: Optional[str], observe_only: bool, client_of: Callable, request,
          encoded: bool = False) -> Admission:
    """Authenticate ``raw_key`` and charge its rate limits. ``client_of(request)`` names the caller
    of a failed authentication (called only then).

    Returns (key, token, refusal, headers): the key (also one that was refused), the token whose
    usage the request counts as (None unless it authenticated), a Refusal or None, and the
    rate-limit headers the app's answer gets: (str, str) pairs, or with ``encoded`` (bytes, bytes)
    pairs with lower-case names as ASGI sends them (a refusal's own headers are str pairs either
    way). A tuple, not an object: this is every request's path."""
    key, reason = core.authenticate(raw_key)
    if reason is not None:
        return _refused(core, key, reason, observe_only, client_of, request)
    if observe_only:
        return key, key.id, None, NO_HEADERS
    now = time.time()
    try:
        decision = core.hit(key, now)
    except StorageUnavailable:
        return key, key.id, _unavailable(core), NO_HEADERS
    return _limited(key, decision, now, encoded)


async def admit_async(core, raw_key: Optional[str], observe_only: bool, client_of: Callable, request,
                      encoded: bool = False) -> Admission:
    """``admit`` for an event loop: a shared rate-limit storage is asked without blocking it
    (without one there is no I/O, and ``admit`` answers)."""
    if observe_only or not core.limiter.shared:
        return admit(core, raw_key, observe_only, client_of, request, encoded)
    key, reason = core.authenticate(raw_key)
    if reason is not None:
        return _refused(core, key, reason, observe_only, client_of, request)
    now = time.time()
    try:
        decision = await core.hit_async(key, now)
    except StorageUnavailable:
        return key, key.id, _unavailable(core), NO_HEADERS
    return _limited(key, decision, now, encoded)


def _refused(core, key, reason: str, observe_only: bool, client_of, request) -> Admission:
    core.auth_failure(reason, client_of(request))
    return key, None, None if observe_only else Refusal(*REFUSALS[reason]), NO_HEADERS


def _unavailable(core) -> Refusal:
    """storage_failure_mode closed, while the rate-limit storage does not answer."""
    wait = max(1, math.ceil(core.limiter.breaker.backoff))
    return Refusal(503, "Rate limiting is unavailable, so requests are refused "
                        f"(storage_failure_mode: closed). Try again in {wait} seconds", [("Retry-After", str(wait))])


def _limited(key: ApiKey, decision: Optional[Decision], now: float, encoded: bool = False) -> Admission:
    if decision is None:
        return key, key.id, None, NO_HEADERS
    if decision.allowed:
        return key, key.id, None, rate_limit_headers(decision, now, encoded)
    headers = rate_limit_headers(decision, now)
    refused = decision.refused
    window = decision.plan[refused][0]
    wait = max(0, math.ceil(decision.values[2 * refused + 1] - now))
    return key, key.id, Refusal(429, f"Rate limit exceeded for {window}. Try again in {wait} seconds",
                                headers + [("Retry-After", str(wait))]), headers


_BUILDERS: List[Dict[int, tuple]] = [{}, {}]      # by plan identity: str pairs, (bytes, bytes) pairs


def rate_limit_headers(decision: Decision, now: float, encoded: bool = False) -> Headers:
    """The X-RateLimit-{Window}-{Limit,Remaining,Reset} headers (Reset in seconds) and the IETF
    draft-ietf-httpapi-ratelimit-headers-10 RateLimit-Policy / RateLimit fields; with ``encoded``
    as ASGI sends them, (bytes, bytes) with lower-case names."""
    plan = decision.plan
    if not plan:
        return []
    builders = _BUILDERS[encoded]
    found = builders.get(id(plan))
    if found is None or found[0] is not plan:
        found = builders[id(plan)] = (plan, header_builder(plan, encoded))
    return found[1](decision.values, now)


def header_builder(plan, encoded: bool = False) -> Callable[[List[float], float], Headers]:
    """The function that makes the headers of a decision on ``plan`` from its values (remaining,
    reset time, ... per window) and the time: made once per plan (a limiter keeps one plan object
    per set of limits), with the plan's names and limits written into its code, as
    collections.namedtuple makes its classes, since it runs on every request. ``encoded``: the
    pairs as ASGI wants them (every value is ASCII: digits, and the windows' names)."""
    def pair(name: str, value: Optional[str], code: str = "") -> str:
        if encoded:
            return repr((name.lower().encode(), value.encode())) if value is not None else \
                f"({name.lower().encode()!r}, {code}.encode())"
        return repr((name, value)) if value is not None else f"({name!r}, {code})"
    lines, headers, current = [], [], []
    for i, (window, limit, seconds) in enumerate(plan):
        if window not in WINDOW_ORDER or type(limit) is not int or type(seconds) is not int:
            raise ValueError(f"not a rate-limit window: {window!r}, {limit!r}, {seconds!r}")
        name = f"X-RateLimit-{window.capitalize()}"
        lines.append(f"    r{i} = f'{{values[{2 * i}]}}'\n"
                     f"    t = values[{2 * i + 1}] - now\n"
                     f"    t{i} = f'{{ceil(t)}}' if t > 0 else '0'\n")
        headers += [pair(f"{name}-Limit", str(limit)), pair(f"{name}-Remaining", None, f"r{i}"),
                    pair(f"{name}-Reset", None, f"t{i}")]
        current.append(f'"{window}";r={{r{i}}};t={{t{i}}}')
    policy = ", ".join(f'"{w}";q={limit};w={seconds}' for w, limit, seconds in plan)
    headers += [pair("RateLimit-Policy", policy), pair("RateLimit", None, f"f{', '.join(current)!r}")]
    source = "def build(values, now):\n" + "".join(lines) + f"    return [{', '.join(headers)}]\n"
    namespace = {"ceil": math.ceil}
    exec(source, namespace)
    return namespace["build"]


def with_server_timing(started: float, headers: Headers, refusal: Optional[Refusal],
                       encoded: bool = False) -> Headers:
    """``headers`` and the W3C Server-Timing field, which browsers' developer tools show: the
    middleware's own time on this request since ``started`` (a ``time.perf_counter()``), in
    milliseconds; a refusal's headers get it too. ``encoded``: as ``admit`` gave ``headers``."""
    value = f'apitoken;dur={(time.perf_counter() - started) * 1000:.3f};desc="api-token-exporter"'
    if refusal is not None:
        refusal.headers.append(("Server-Timing", value))
    return [*headers, (b"server-timing", value.encode()) if encoded else ("Server-Timing", value)]


# -- LLM usage in the app's answer ----------------------------------------------------------------
class BodyCapture:
    """The first ``limit`` bytes of a response body, kept while it streams through."""
    __slots__ = ("chunks", "size", "limit")

    def __init__(self, limit: int):
        self.chunks: List[bytes] = []
        self.size = 0
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        if self.size <= self.limit:
            self.chunks.append(chunk)
            self.size += len(chunk)

    @property
    def complete(self) -> bool:
        return self.size <= self.limit

    def body(self) -> bytes:
        return b"".join(self.chunks)


def capture_llm_usage(core, token: str, headers: Iterable[Tuple[str, str]], body: bytes) -> None:
    """Count the LLM usage an answer reports (OpenAI, Anthropic, Cohere JSON or their streams),
    decoding a gzip or deflate body first (a proxied upstream's compressed answer)."""
    content_type = model_hint = encoding = ""
    for name, value in headers:
        lname = name.lower()
        if lname == "content-type":
            content_type = value
        elif lname == "x-llm-model":
            model_hint = value
        elif lname == "content-encoding":
            encoding = value.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        body = decompressed(body, encoding, core.settings.capture_max_bytes)
        if body is None:
            return
    core.capture_llm(token, content_type, body, model_hint)


def decompressed(body: bytes, encoding: str, limit: int) -> Optional[bytes]:
    """At most ``limit`` bytes of a gzip or deflate body; None if it is broken or larger."""
    wbits = 47 if encoding != "deflate" else 15          # gzip or zlib header; deflate as zlib
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(body, limit + 1)
    except zlib.error:
        if encoding != "deflate":
            return None
        try:                                              # raw deflate, as some servers send it
            d = zlib.decompressobj(-15)
            out = d.decompress(body, limit + 1)
        except zlib.error:
            return None
    return out if len(out) <= limit else None


# -- the request being handled -------------------------------------------------------------------
# the face's request object (``key``, ``llm_token``, ``llm_recorded``, ``core``) being handled;
# a face sets it (CURRENT.set(call): one call on the request path) and ``leave``s it
CURRENT: contextvars.ContextVar = contextvars.ContextVar("api_token_exporter_request", default=None)
current_call = CURRENT.get


def leave(context: Optional[contextvars.Token]) -> None:
    if context is not None:
        try:
            CURRENT.reset(context)
        except ValueError:               # finished in another context (a server's thread)
            CURRENT.set(None)


def record_llm_usage(service: str, model: str, input_tokens: int = 0, output_tokens: int = 0,
                     token: Optional[str] = None, *, cached_input_tokens: int = 0,
                     cache_write_tokens: int = 0, reasoning_tokens: int = 0) -> LLMUsage:
    """Count LLM usage (tokens, cost) for the current request's token, or ``token``.

    ``input_tokens`` counts every prompt token and ``output_tokens`` every answer token (OpenAI's
    prompt_tokens and completion_tokens); the cached, cache-write and reasoning tokens are parts
    of them, priced at their own rates. Raises UsageError for bad values, which are then not
    counted at all."""
    call = CURRENT.get()
    if call is None:
        raise RuntimeError("record_llm_usage() called outside a request handled by TokenAnalytics")
    token = token or call.llm_token
    if not token:
        raise UsageError("no API token: call inside an authenticated request or pass token=")
    usage = call.core.count_llm(token, call.core.validate_usage(service, model, input_tokens, output_tokens,
                                                                cached_input_tokens, cache_write_tokens,
                                                                reasoning_tokens))
    call.llm_recorded = True
    return usage
