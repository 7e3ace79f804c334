"""The upstream credential pool behind the proxy: several upstream tokens, the next
one taken when the current one runs low, each watched.

Choosing: the current credential while it is usable and has at least ``rotate_below`` left of
what the request needs; else the usable one with the most left relative to its limit, ties to
the earliest reset. Statuses: ``invalid`` after a 401 (or a 403 without rate-limit headers),
``rate_limited`` while a resource it needs is at 0 before its reset (a 429 sets that until
``Retry-After`` or the reset), ``cooling_down`` for ``cooldown`` after ``cooldown_after``
failures in a row (5xx or no answer), else ``active``. GitHub's quota is per account: the
credentials of one ``account`` share one quota here too.

One pool per process. Under several workers each learns from its own answers (every answer
carries the upstream's remaining count, so they agree after one request each); with a shared
``state_dir`` they also adopt each other's findings through the metric store every
``sync_interval``: an invalid credential, a resource at 0. Cooling down stays per process.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import yaml

from . import upstream_limits as ul
from ..core.config import ConfigError, duration_setting
from ..core.metrics import UPSTREAM_STATUSES
from ..core.stats import time_str
from ..core.validation import ValidationError, token_id as valid_id

log = logging.getLogger("api_token_exporter")

AUTH = {"github": ("Authorization", "Bearer "), "openai": ("Authorization", "Bearer "),
        "anthropic": ("x-api-key", ""), "generic": ("Authorization", "Bearer ")}
SECRET_PREFIXES = ("github_pat_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "sk-ant-api03-", "sk-ant-",
                   "sk-proj-", "sk-svcacct-", "sk-")
ROTATION_REASONS = ("threshold", "rate_limited", "invalid", "cooling_down")
MAX_ENDPOINTS = 200                     # distinct endpoints remembered per credential
OTHER_ENDPOINTS = "__other__"
POOL_KEYS = {"upstream", "provider", "rotate_below", "cooldown_after", "cooldown", "refresh_interval",
             "sync_interval", "default_retry_after", "retry_body_max_bytes", "forward_rate_limit_headers",
             "routes", "auth_header", "auth_scheme", "rate_limit_headers", "credentials", "recent_requests"}
CREDENTIAL_KEYS = {"id", "secret_env", "secret_file", "provider", "account"}


def mask_secret(secret: str) -> str:
    """``ghp_xxxx...yyyy``: the known prefix, four characters and the last four."""
    prefix = next((p for p in SECRET_PREFIXES if secret.startswith(p)), "")
    head = secret[:len(prefix) + 4]
    if len(secret) - len(head) < 12:             # too short to show both ends safely
        return (prefix or secret[:2]) + "..."
    return f"{head}...{secret[-4:]}"


class Credential:
    """One upstream credential. Its secret stays in here: repr, the id and the masked form
    never show it."""

    __slots__ = ("id", "provider", "account", "masked", "header", "_scheme", "_value", "secret_file",
                 "secret_env", "_mtime", "index")

    def __init__(self, cid: str, provider: str, account: str, secret: str, header: Tuple[str, str],
                 secret_file: Optional[str] = None, secret_env: Optional[str] = None, index: int = 0):
        self.id, self.provider, self.account = cid, provider, account
        self.header, self._scheme = header
        self.secret_file, self.secret_env, self.index = secret_file, secret_env, index
        self._mtime = _mtime(secret_file)
        self._set(secret)

    def _set(self, secret: str) -> None:
        self.masked = mask_secret(secret)
        self._value = self._scheme + secret

    def auth(self) -> Tuple[str, str]:
        """The header that carries the secret upstream."""
        return self.header, self._value

    def __repr__(self) -> str:
        return f"Credential({self.id!r}, {self.provider})"


def _mtime(path: Optional[str]) -> Optional[float]:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


class PoolConfig:
    def __init__(self, **values):
        self.upstream: Optional[str] = values.get("upstream")
        self.provider: str = values.get("provider", "generic")    # what the requests' resources are
        self.rotate_below: Dict[str, float] = values.get("rotate_below", {"default": 100})
        self.cooldown_after: int = values.get("cooldown_after", 3)
        self.cooldown: float = values.get("cooldown", 30.0)
        self.refresh_interval: float = values.get("refresh_interval", 300.0)
        self.sync_interval: float = values.get("sync_interval", 5.0)
        self.default_retry_after: float = values.get("default_retry_after", 60.0)
        self.retry_body_max_bytes: int = values.get("retry_body_max_bytes", 1_048_576)
        self.forward_rate_limit_headers: bool = values.get("forward_rate_limit_headers", False)
        self.routes: List[str] = values.get("routes", [])
        self.rate_limit_headers = values.get("rate_limit_headers", ul.GenericHeaders())
        self.recent_requests: int = values.get("recent_requests", 100)
        self.credentials: List[Credential] = values.get("credentials", [])

    def threshold(self, resource: str) -> float:
        return self.rotate_below.get(resource, self.rotate_below.get("default", 0))


def _secret(where: str, raw: dict, environ) -> str:
    env, path = raw.get("secret_env"), raw.get("secret_file")
    if "secret" in raw:
        raise ConfigError(f"{where}: a secret is never written in the pool file: use secret_env (an "
                          "environment variable's name) or secret_file")
    if bool(env) == bool(path):
        raise ConfigError(f"{where}: give exactly one of secret_env and secret_file")
    if env:
        value = environ.get(env)
        if not value:
            raise ConfigError(f"{where}: environment variable {env} is not set or empty")
        return value.strip()
    try:
        with open(path, "r", encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: secret_file {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{where}: secret_file {path} is empty")
    return value


def load_pool(path: str, environ=None, upstream: Optional[str] = None) -> PoolConfig:
    """Read and check a pool file; errors name the entry and the field, never a secret."""
    environ = os.environ if environ is None else environ
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"pool file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"pool file {path}: expected a mapping with credentials:")
    return pool_from_dict(doc, environ, upstream, where=f"pool file {path}")


def pool_from_dict(doc: dict, environ=None, upstream: Optional[str] = None, where: str = "pool") -> PoolConfig:
    environ = os.environ if environ is None else environ
    unknown = sorted(set(doc) - POOL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict = {}
    url = upstream or doc.get("upstream")
    if not url or not str(url).startswith(("http://", "https://")):
        raise ConfigError(f"{where}: upstream must be the upstream's base URL (http:// or https://), "
                          "in the pool file or given with --upstream")
    values["upstream"] = str(url).rstrip("/")
    default_provider = doc.get("provider", "generic")
    if default_provider not in ul.PROVIDERS:
        raise ConfigError(f"{where}: provider must be one of {', '.join(ul.PROVIDERS)}")
    values["provider"] = default_provider
    rotate = doc.get("rotate_below", 100)
    rotate = rotate if isinstance(rotate, dict) else {"default": rotate}
    for resource, n in rotate.items():
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0:
            raise ConfigError(f"{where}: rotate_below.{resource} must be a number >= 0")
    values["rotate_below"] = {str(k).replace("-", "_"): float(v) for k, v in rotate.items()}
    for name in ("cooldown", "refresh_interval", "sync_interval", "default_retry_after"):
        if name in doc:
            values[name] = 0.0 if doc[name] in (0, "0") else duration_setting(name, doc[name])
    for name in ("cooldown_after", "retry_body_max_bytes", "recent_requests"):
        if name in doc:
            n = doc[name]
            if isinstance(n, bool) or not isinstance(n, int) or n < (0 if name == "retry_body_max_bytes" else 1):
                raise ConfigError(f"{where}: {name} must be a whole number")
            values[name] = n
    if "forward_rate_limit_headers" in doc:
        values["forward_rate_limit_headers"] = bool(doc["forward_rate_limit_headers"])
    routes = doc.get("routes") or []
    if not isinstance(routes, list) or not all(isinstance(r, str) and r.startswith("/") for r in routes):
        raise ConfigError(f"{where}: routes must be a list of path templates such as /repos/<owner>/<repo>")
    values["routes"] = routes
    names = doc.get("rate_limit_headers") or {}
    if not isinstance(names, dict) or set(names) - {"limit", "remaining", "reset", "reset_format", "resource"}:
        raise ConfigError(f"{where}: rate_limit_headers takes limit, remaining, reset, reset_format, resource")
    generic = ul.GenericHeaders(**{k: str(v) for k, v in names.items()})
    if generic.reset_format not in ul.RESET_FORMATS:
        raise ConfigError(f"{where}: rate_limit_headers.reset_format must be one of {', '.join(ul.RESET_FORMATS)}")
    if not ul.resource_name(generic.resource):
        raise ConfigError(f"{where}: rate_limit_headers.resource must be a lower-case name")
    values["rate_limit_headers"] = generic
    auth_header = doc.get("auth_header")
    auth_scheme = doc.get("auth_scheme")
    entries = doc.get("credentials")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: credentials must list at least one credential")
    creds: List[Credential] = []
    seen_ids, seen_secrets = set(), {}
    for i, raw in enumerate(entries):
        at = f"{where}: credentials[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{at}: expected a mapping with id and secret_env or secret_file")
        extra = sorted(set(raw) - CREDENTIAL_KEYS - {"secret"})
        if extra:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(extra)}")
        provider = raw.get("provider", default_provider)
        if provider not in ul.PROVIDERS:
            raise ConfigError(f"{at}: provider must be one of {', '.join(ul.PROVIDERS)}")
        secret = _secret(at, raw, environ)
        digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
        cid = raw.get("id") or f"cred-{digest[:10]}"
        try:
            valid_id("id", cid)
        except ValidationError:
            raise ConfigError(f"{at}: id must be 1-64 letters, digits, _ . : - (it becomes a label)") from None
        if secret in cid or (len(cid) >= 12 and cid in secret):
            raise ConfigError(f"{at}: the id must not be (part of) the secret: it is shown everywhere")
        if cid in seen_ids:
            raise ConfigError(f"{at}: id {cid} is used twice")
        if digest in seen_secrets:
            raise ConfigError(f"{at}: same secret as {seen_secrets[digest]}")
        seen_ids.add(cid)
        seen_secrets[digest] = cid
        account = str(raw.get("account") or cid)
        try:
            valid_id("account", account)
        except ValidationError:
            raise ConfigError(f"{at}: account must be 1-64 letters, digits, _ . : -") from None
        header = AUTH[provider]
        if provider == "generic":
            header = (auth_header or header[0], header[1] if auth_scheme is None else (f"{auth_scheme} " if auth_scheme else ""))
        creds.append(Credential(cid, provider, account, secret, header, raw.get("secret_file"),
                                raw.get("secret_env"), index=i))
    values["credentials"] = creds
    return PoolConfig(**values)


class _State:
    __slots__ = ("invalid", "invalid_at", "cooling_until", "failures", "endpoints", "written", "written_at",
                 "refreshed_at", "last_used")

    def __init__(self):
        self.invalid = False
        self.invalid_at = self.cooling_until = self.refreshed_at = self.last_used = 0.0
        self.failures = 0
        self.endpoints: collections.Counter = collections.Counter()
        self.written: Optional[str] = None       # the status this process last wrote or adopted
        self.written_at = 0.0


class _Account:
    __slots__ = ("limits", "stamps", "credentials")

    def __init__(self):
        self.limits: Dict[str, ul.Limit] = {}
        self.stamps: Dict[str, float] = {}       # when each resource was last observed
        self.credentials: List[Credential] = []


class _Recorder:
    """Writes the pool's families (metrics.upstream_catalogue) into the metric store."""

    def __init__(self, metrics):
        self.store = metrics.store
        f = metrics.upstream
        self.requests = f["apitoken_upstream_requests_total"]
        self.selections = f["apitoken_upstream_selections_total"]
        self.rotations = f["apitoken_upstream_rotations_total"]
        self.exhausted = f["apitoken_upstream_exhausted_total"]
        self.limit = f["apitoken_upstream_rate_limit_limit"]
        self.remaining = f["apitoken_upstream_rate_limit_remaining"]
        self.reset = f["apitoken_upstream_rate_limit_reset_timestamp_seconds"]
        self.status = f["apitoken_upstream_credential_status"]
        self.info = f["apitoken_upstream_credential_info"]
        self.last_used = f["apitoken_upstream_credential_last_used_timestamp_seconds"]

    def add(self, family, key: tuple, amount: float = 1.0) -> None:
        store = self.store
        with store.lock:
            store.add(family, store.slot(family, key), amount)

    def set(self, family, key: tuple, value: float, now: float) -> None:
        store = self.store
        with store.lock:
            store.set_recent(store.slot(family, key), value, now)

    def touch(self, cred: Credential, now: float) -> None:
        store = self.store
        with store.lock:
            store.set_max(store.slot(self.last_used, (cred.id, cred.provider)), now)


class CredentialPool:
    def __init__(self, config: PoolConfig, metrics=None, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.credentials = list(config.credentials)
        self.by_id = {c.id: c for c in self.credentials}
        self._lock = threading.Lock()
        self._state = {c.id: _State() for c in self.credentials}
        self._accounts: Dict[str, _Account] = {}
        for c in self.credentials:
            self._accounts.setdefault(c.account, _Account()).credentials.append(c)
        self._current: Dict[tuple, Credential] = {}
        self._recent = collections.deque(maxlen=config.recent_requests)
        self.metrics = metrics
        self.recorder = _Recorder(metrics) if metrics is not None else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._fetch = None
        for name, account in self._accounts.items():
            if len(account.credentials) > 1:
                log.info("credentials %s share the quota of account %s: together they add one account's limit",
                         ", ".join(c.id for c in account.credentials), name)
        if metrics is not None:
            metrics.store.on_reopen.append(self._initial_series)
            self._initial_series()

    # -- metrics -------------------------------------------------------------------------------
    def _initial_series(self) -> None:
        """Counters at 0 before their first event; info; the status, unless another process of
        this store already published one (then it is adopted, not overwritten)."""
        r = self.recorder
        now = self.clock()
        self.sync(now)
        for c in self.credentials:
            key = (c.id, c.provider)
            r.add(r.selections, key, 0.0)
            for reason in ROTATION_REASONS:
                r.add(r.rotations, key + (reason,), 0.0)
            r.set(r.info, key + (c.account,), 1.0, now)
        r.add(r.exhausted, (self.config.provider,), 0.0)
        self._publish(self.credentials, now)

    def _publish(self, creds: Iterable[Credential], now: float) -> None:
        """Write the status of each credential whose status changed in this process's view."""
        if self.recorder is None:
            return
        r = self.recorder
        for c in creds:
            state = self._state[c.id]
            current = self._status(c, now)
            if current == state.written:
                continue
            state.written, state.written_at = current, now
            for s in UPSTREAM_STATUSES:
                r.set(r.status, (c.id, c.provider, s), 1.0 if s == current else 0.0, now)

    def _publish_limits(self, account: _Account, resources: Iterable[str], now: float) -> None:
        if self.recorder is None:
            return
        r = self.recorder
        for resource in resources:
            lim = account.limits[resource]
            for c in account.credentials:
                key = (c.id, c.provider, resource)
                if lim.limit is not None:
                    r.set(r.limit, key, lim.limit, now)
                if lim.remaining is not None:
                    r.set(r.remaining, key, lim.remaining, now)
                if lim.reset_at is not None:
                    r.set(r.reset, key, lim.reset_at, now)

    # -- state ---------------------------------------------------------------------------------
    def _status(self, cred: Credential, now: float) -> str:
        state = self._state[cred.id]
        if state.invalid:
            return "invalid"
        if state.cooling_until > now:
            return "cooling_down"
        limits = self._accounts[cred.account].limits
        for resource in ul.primary(cred.provider, self.config.rate_limit_headers):
            lim = limits.get(resource)
            if lim is not None and lim.exhausted(now):
                return "rate_limited"
        return "active"

    def status(self, cred_id: str, now: Optional[float] = None) -> str:
        with self._lock:
            return self._status(self.by_id[cred_id], self.clock() if now is None else now)

    def _blocked_until(self, cred: Credential, resources, now: float) -> Optional[float]:
        """None when usable for these resources; else when it may be again (inf: never)."""
        state = self._state[cred.id]
        if state.invalid:
            return float("inf")
        until = state.cooling_until if state.cooling_until > now else None
        limits = self._accounts[cred.account].limits
        for resource in resources:
            lim = limits.get(resource)
            if lim is not None and lim.exhausted(now):
                reset = lim.reset_at if lim.reset_at is not None else now + self.config.default_retry_after
                until = max(until or 0.0, reset)
        return until

    def _standing(self, cred: Credential, resources, now: float):
        """Sort key: below the threshold last, then most left relative to the limit, then the
        earliest reset, then the pool file's order."""
        limits = self._accounts[cred.account].limits
        below, ratio, reset = False, 1.0, float("inf")
        for resource in resources:
            lim = limits.get(resource)
            if lim is None:
                continue
            lim = lim.current(now)
            if lim.remaining is not None and lim.remaining < self.config.threshold(resource):
                below = True
            r = lim.ratio()
            if r is not None:
                ratio = min(ratio, r)
            if lim.reset_at is not None:
                reset = min(reset, lim.reset_at)
        return (below, -ratio, reset, cred.index)

    def acquire(self, resources: Tuple[str, ...], exclude: Iterable[str] = (),
                now: Optional[float] = None) -> Optional[Credential]:
        """The credential for a request that needs ``resources``, or None when none can take it.
        Counts the selection, and a rotation when it moves away from the current one."""
        now = self.clock() if now is None else now
        reason = None
        with self._lock:
            current = self._current.get(resources)
            keep = (current is not None and current.id not in exclude
                    and self._blocked_until(current, resources, now) is None)
            if keep and not self._standing(current, resources, now)[0]:
                chosen = current
            else:
                usable = [c for c in self.credentials
                          if c.id not in exclude and self._blocked_until(c, resources, now) is None]
                standing = {c.id: self._standing(c, resources, now) for c in usable}
                chosen = min(usable, key=lambda c: standing[c.id]) if usable else None
                # under the threshold, the current one stays unless another is not: all low,
                # moving on every request would only spread the last requests thin
                if keep and (chosen is None or standing[chosen.id][0]):
                    chosen = current
                if current is not None and chosen is not None and chosen is not current:
                    reason = self._why_left(current, resources, exclude, now)
                if chosen is not None:
                    self._current[resources] = chosen
        if self.recorder is not None:
            r = self.recorder
            if reason is not None:
                r.add(r.rotations, (current.id, current.provider, reason))
                log.info("upstream pool: rotating from %s to %s (%s)", current.id, chosen.id, reason)
            if chosen is not None:
                r.add(r.selections, (chosen.id, chosen.provider))
            else:
                r.add(r.exhausted, (self.config.provider,))
        return chosen

    def _why_left(self, cred: Credential, resources, exclude, now: float) -> str:
        state = self._state[cred.id]
        if state.invalid:
            return "invalid"
        if state.cooling_until > now:
            return "cooling_down"
        if cred.id in exclude or self._blocked_until(cred, resources, now) is not None:
            return "rate_limited"
        return "threshold"

    def retry_at(self, resources: Tuple[str, ...], now: Optional[float] = None) -> Optional[float]:
        """When the first credential may take such a request again; None if never (all invalid)."""
        now = self.clock() if now is None else now
        with self._lock:
            times = [self._blocked_until(c, resources, now) for c in self.credentials]
        times = [t for t in times if t is not None and t != float("inf")]
        return min(times) if times else None

    def observe(self, cred: Credential, code: int, headers, resources: Tuple[str, ...], endpoint: str = "",
                client: Optional[str] = None, now: Optional[float] = None) -> str:
        """Learn from an upstream answer. Returns ``ok`` (pass the answer on), ``invalid`` or
        ``rate_limited`` (the credential could not serve it: try another)."""
        now = self.clock() if now is None else now
        obs = ul.parse(cred.provider, headers, now, self.config.rate_limit_headers)
        if code == 401:
            obs.limits.clear()           # GitHub's are the caller address's then, not the credential's
        account = self._accounts[cred.account]
        verdict = "ok"
        with self._lock:
            state = self._state[cred.id]
            changed = []
            for resource, lim in list(obs.limits.items()):
                if resource not in account.limits and len(account.limits) >= ul.MAX_RESOURCES:
                    continue
                if lim.reset_at is None and lim.remaining is not None and lim.remaining <= 0:
                    # spent with no reset said: try again later, not never
                    lim = obs.limits[resource] = ul.Limit(lim.limit, lim.remaining,
                                                          now + self.config.default_retry_after, lim.used)
                account.limits[resource] = lim
                account.stamps[resource] = now
                changed.append(resource)
            exhausted_reported = any(obs.limits.get(r) is not None and obs.limits[r].exhausted(now)
                                     for r in resources)
            if code == 401 or (code == 403 and not obs.has_rate_limit_headers):
                verdict = "invalid"
                if not state.invalid:
                    log.warning("upstream credential %s (%s) was refused with %d: taken out of the pool",
                                cred.id, cred.masked, code)
                state.invalid, state.invalid_at = True, now
            elif code == 429 or (code == 403 and (obs.retry_after is not None or exhausted_reported)):
                verdict = "rate_limited"
                until = obs.retry_after
                if until is None:
                    resets = [account.limits[r].reset_at for r in resources
                              if r in account.limits and account.limits[r].reset_at]
                    until = max(resets) if resets else now + self.config.default_retry_after
                until = max(until, now + 1.0)
                targets = [r for r in resources if obs.limits.get(r) is not None
                           and obs.limits[r].remaining is not None and obs.limits[r].remaining <= 0]
                for resource in targets or resources:    # 0 left until then, as the upstream says
                    if resource not in account.limits and len(account.limits) >= ul.MAX_RESOURCES:
                        continue
                    old = account.limits.get(resource) or ul.Limit()
                    account.limits[resource] = ul.Limit(old.limit, 0.0, until, old.used)
                    account.stamps[resource] = now
                    if resource not in changed:
                        changed.append(resource)
                log.warning("upstream credential %s rate limited until %s", cred.id, time_str(until))
            if code >= 500:
                self._failed(cred, state, now)
            elif verdict == "ok":
                state.failures = 0
            state.last_used = now
            self._count_endpoint(state, endpoint)
            self._recent.append((now, endpoint, cred.masked, code, client))
            self._publish_limits(account, changed, now)
            self._publish(account.credentials, now)
        if self.recorder is not None:
            r = self.recorder
            r.add(r.requests, (cred.id, cred.provider, str(code)))
            r.touch(cred, now)
        return verdict

    def failure(self, cred: Credential, endpoint: str = "", client: Optional[str] = None,
                now: Optional[float] = None) -> None:
        """No answer came (connection refused, timeout)."""
        now = self.clock() if now is None else now
        with self._lock:
            state = self._state[cred.id]
            self._failed(cred, state, now)
            state.last_used = now
            self._count_endpoint(state, endpoint)
            self._recent.append((now, endpoint, cred.masked, 0, client))
            self._publish([cred], now)
        if self.recorder is not None:
            r = self.recorder
            r.add(r.requests, (cred.id, cred.provider, "error"))
            r.touch(cred, now)

    def _failed(self, cred: Credential, state: _State, now: float) -> None:
        state.failures += 1
        if state.failures >= self.config.cooldown_after and self.config.cooldown > 0:
            state.failures = 0
            state.cooling_until = now + self.config.cooldown
            log.warning("upstream credential %s failed %d times in a row: cooling down for %gs",
                        cred.id, self.config.cooldown_after, self.config.cooldown)

    @staticmethod
    def _count_endpoint(state: _State, endpoint: str) -> None:
        if not endpoint:
            return
        if endpoint not in state.endpoints and len(state.endpoints) >= MAX_ENDPOINTS:
            endpoint = OTHER_ENDPOINTS
        state.endpoints[endpoint] += 1

    # -- upkeep: time-based changes, idle refresh, other workers, secret files --------------
    def tick(self, now: Optional[float] = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            self._publish(self.credentials, now)

    def sync(self, now: Optional[float] = None) -> None:
        """Adopt what other processes sharing the metric store (state_dir) found out: invalid
        credentials (and ones valid again), resources at 0 before their reset, fresher counts."""
        if self.recorder is None or not self.recorder.store.directory:
            return
        now = self.clock() if now is None else now
        r = self.recorder
        store = r.store
        with store.snapshot():
            statuses = store.recent_values(r.status)
            remaining = store.recent_values(r.remaining)
            limits = store.recent_values(r.limit)
            resets = store.recent_values(r.reset)
        newest: Dict[str, Tuple[float, str]] = {}
        for (cid, _, status), (value, at) in statuses.items():
            if value == 1.0 and at > newest.get(cid, (0.0, ""))[0]:
                newest[cid] = (at, status)
        with self._lock:
            adopted = []
            for cid, (at, status) in newest.items():
                state = self._state.get(cid)
                if state is None or at <= state.written_at:
                    continue
                state.written_at = at
                adopted.append(cid)
                if status == "invalid" and not state.invalid:
                    state.invalid, state.invalid_at = True, at
                elif status != "invalid" and state.invalid and state.invalid_at < at:
                    state.invalid = False
            for (cid, _, resource), (value, at) in remaining.items():
                cred = self.by_id.get(cid)
                if cred is None:
                    continue
                account = self._accounts[cred.account]
                if at <= account.stamps.get(resource, 0.0):
                    continue
                if resource not in account.limits and len(account.limits) >= ul.MAX_RESOURCES:
                    continue
                lim = limits.get((cid, cred.provider, resource))
                reset = resets.get((cid, cred.provider, resource))
                account.limits[resource] = ul.Limit(lim[0] if lim else None, value, reset[0] if reset else None)
                account.stamps[resource] = at
            for cid in adopted:        # published by the other process: not written again from here
                self._state[cid].written = self._status(self.by_id[cid], now)

    def reload_secrets(self, now: Optional[float] = None) -> List[str]:
        """Credentials whose secret file changed get the new secret and a clean slate."""
        now = self.clock() if now is None else now
        reloaded = []
        for cred in self.credentials:
            if not cred.secret_file:
                continue
            mtime = _mtime(cred.secret_file)
            if mtime is None or mtime == cred._mtime:
                continue
            try:
                with open(cred.secret_file, "r", encoding="utf-8") as fh:
                    secret = fh.read().strip()
            except OSError:
                continue
            if not secret:
                continue
            with self._lock:
                cred._mtime = mtime
                cred._set(secret)
                state = self._state[cred.id]
                state.invalid, state.cooling_until, state.failures = False, 0.0, 0
                state.written_at = 0.0
                self._publish([cred], now)
            reloaded.append(cred.id)
            log.info("upstream credential %s: secret file changed, using the new secret", cred.id)
        return reloaded

    def refresh(self, fetch, now: Optional[float] = None) -> List[str]:
        """GitHub: ``GET /rate_limit`` (free) for credentials idle for ``refresh_interval`` and
        for invalid ones (a token valid again comes back). ``fetch(cred)`` returns (status,
        headers, body bytes) or raises OSError."""
        import json
        now = self.clock() if now is None else now
        interval = self.config.refresh_interval
        if interval <= 0:
            return []
        done = []
        for cred in self.credentials:
            if cred.provider != "github":
                continue
            state = self._state[cred.id]
            if now - max(state.last_used, state.refreshed_at) < interval:
                continue
            state.refreshed_at = now
            try:
                code, headers, body = fetch(cred)
            except Exception as exc:            # the next round tries again
                log.info("upstream credential %s: rate_limit refresh failed (%s)", cred.id, type(exc).__name__)
                continue
            with self._lock:
                account = self._accounts[cred.account]
                if code == 200:
                    try:
                        doc = json.loads(body)
                    except ValueError:
                        doc = None
                    obs = ul.github_rate_limit_body(doc, now)
                    for resource, lim in obs.limits.items():
                        account.limits[resource] = lim
                        account.stamps[resource] = now
                    if state.invalid:
                        log.info("upstream credential %s answers again: back in the pool", cred.id)
                    state.invalid = False
                    self._publish_limits(account, list(obs.limits), now)
                elif code == 401:
                    state.invalid, state.invalid_at = True, now
                self._publish(account.credentials, now)
            done.append(cred.id)
        return done

    def start(self, fetch=None, period: float = 1.0) -> None:
        """The upkeep thread: statuses that change with time every ``period``, other workers'
        findings every ``sync_interval``, idle GitHub credentials every ``refresh_interval``."""
        if self._thread is not None:
            return
        self._fetch = fetch

        def run():
            last_sync = 0.0
            while not self._stop.wait(period):
                try:
                    now = self.clock()
                    if self.config.sync_interval and now - last_sync >= self.config.sync_interval:
                        last_sync = now
                        self.sync(now)
                        self.reload_secrets(now)
                    self.tick(now)
                    if self._fetch is not None:
                        self.refresh(self._fetch, now)
                except Exception:
                    log.exception("upstream pool upkeep failed; trying again")
        self._thread = threading.Thread(target=run, name="upstream-pool", daemon=True)
        self._thread.start()

    def restart(self, fetch=None) -> None:
        """start() in a process that may have inherited a stopped copy (a fork)."""
        self._stop, self._thread = threading.Event(), None
        self.start(fetch)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the admin JSON -----------------------------------------------------------------
    def _read(self):
        """Per credential from the metric store (every worker of a shared state_dir): counts,
        last use, limits and status; endpoints and recent requests are this process's."""
        r = self.recorder
        out = {c.id: {"usage": 0, "success": 0, "limits": {}, "status": None, "last_used": None}
               for c in self.credentials}
        if r is None:                      # no metrics: this process's view only
            with self._lock:
                for c in self.credentials:
                    out[c.id]["limits"] = {res: {k: v for k, v in (("limit", lim.limit), ("remaining", lim.remaining),
                                                                   ("reset_at", lim.reset_at)) if v is not None}
                                           for res, lim in self._accounts[c.account].limits.items()}
            return out, 0
        store = r.store
        with store.snapshot():
            counts = store.values_by_key(r.requests)
            last = store.values_by_key(r.last_used)
            lims = {name: store.values_by_key(f) for name, f in
                    (("limit", r.limit), ("remaining", r.remaining), ("reset_at", r.reset))}
            statuses = store.recent_values(r.status)
            exhausted = sum(store.values_by_key(r.exhausted).values())
        for (cid, _, code), n in counts.items():
            if cid in out:
                out[cid]["usage"] += int(n)
                if code != "error" and int(code) < 400:
                    out[cid]["success"] += int(n)
        for (cid, _), ts in last.items():
            if cid in out and ts:
                out[cid]["last_used"] = ts
        for name, values in lims.items():
            for (cid, _, resource), value in values.items():
                if cid in out:
                    out[cid]["limits"].setdefault(resource, {})[name] = value
        newest: Dict[str, Tuple[float, str]] = {}
        for (cid, _, status), (value, at) in statuses.items():
            if value == 1.0 and at >= newest.get(cid, (-1.0, ""))[0]:
                newest[cid] = (at, status)
        for cid, (_, status) in newest.items():
            if cid in out:
                out[cid]["status"] = status
        return out, int(exhausted)

    def _shown_status(self, data: dict, own: str) -> str:
        """Several workers (a shared store): the latest status any of them published; one
        process: its own view, which is current to the second."""
        if self.recorder is not None and self.recorder.store.directory:
            return data["status"] or own
        return own

    def _primary_limit(self, cred: Credential, limits: dict, now: float) -> Optional[dict]:
        for resource in ul.primary(cred.provider, self.config.rate_limit_headers):
            values = limits.get(resource)
            if values and "limit" in values:
                reset = values.get("reset_at")
                lim = ul.Limit(values["limit"], values.get("remaining"), reset).current(now)
                return {"resource": resource, "limit": int(lim.limit),
                        "remaining": int(lim.remaining) if lim.remaining is not None else None,
                        "reset_at": lim.reset_at}
        return None

    def token_details(self, now: Optional[float] = None) -> dict:
        now = self.clock() if now is None else now
        data, _ = self._read()
        tokens = []
        with self._lock:
            endpoints = {c.id: collections.Counter(self._state[c.id].endpoints) for c in self.credentials}
            own = {c.id: self._status(c, now) for c in self.credentials}
        for c in self.credentials:
            d = data[c.id]
            primary = self._primary_limit(c, d["limits"], now)
            used = endpoints[c.id]
            tokens.append({
                "token_id": c.masked,
                "id": c.id,
                "provider": c.provider,
                "account": c.account,
                "usage_count": d["usage"],
                "success_count": d["success"],
                "error_count": d["usage"] - d["success"],
                "status": self._shown_status(d, own[c.id]),
                "rate_limit": {"remaining": primary["remaining"], "limit": primary["limit"],
                               "reset": time_str(primary["reset_at"])} if primary else
                              {"remaining": None, "limit": None, "reset": None},
                "rate_limits": {res: {"limit": _int(v.get("limit")), "remaining": _int(v.get("remaining")),
                                      "reset": time_str(v.get("reset_at"))}
                                for res, v in sorted(d["limits"].items())},
                "last_used": time_str(d["last_used"]),
                "endpoints_used": dict(used.most_common()),
                "top_endpoints": [[e, n] for e, n in used.most_common(5)],
            })
        return {"tokens": tokens, "total_tokens": len(tokens), "timestamp": time_str(now)}

    def stats(self, now: Optional[float] = None) -> dict:
        now = self.clock() if now is None else now
        data, exhausted = self._read()
        counts = dict.fromkeys(UPSTREAM_STATUSES, 0)
        with self._lock:
            own = {c.id: self._status(c, now) for c in self.credentials}
            primary = ul.resources_for(self.config.provider, "GET", "/", self.config.rate_limit_headers)
            current = self._current.get(primary) or next(iter(self._current.values()), None)
            recent = list(self._recent)
        per_account: Dict[str, Optional[int]] = {}
        limits: List[int] = []
        for c in self.credentials:
            d = data[c.id]
            status = self._shown_status(d, own[c.id])
            counts[status] += 1
            primary = self._primary_limit(c, d["limits"], now)
            if primary:
                limits.append(primary["limit"])
            if status != "invalid":              # an account counts once, however many tokens it has
                per_account[c.account] = max(per_account.get(c.account) or 0, primary["limit"] if primary else 0)
        per_token = collections.Counter(limits).most_common(1)[0][0] if limits else None
        chosen = current or next((c for c in self.credentials if own[c.id] == "active"), None)
        now_limit = self._primary_limit(chosen, data[chosen.id]["limits"], now) if chosen else None
        total = sum(d["usage"] for d in data.values())
        success = sum(d["success"] for d in data.values())
        return {
            "tokens": {
                "count": len(self.credentials),
                "effective_limit": sum(v or per_token or 0 for v in per_account.values()),   # unseen: per_token
                "per_token_limit": per_token,
                "active": counts["active"],
                "rate_limited": counts["rate_limited"],
                "invalid": counts["invalid"],
                "cooling_down": counts["cooling_down"],
                "accounts": len(self._accounts),
            },
            "current_token": chosen.masked if chosen else None,
            "current_rate_limit": ({"remaining": now_limit["remaining"], "limit": now_limit["limit"],
                                    "reset": int(now_limit["reset_at"]) if now_limit["reset_at"] else None}
                                   if now_limit else None),
            "reset_time": time_str(now_limit["reset_at"]) if now_limit else None,
            "total_requests": total,
            "success_count": success,
            "error_count": total - success,
            "exhausted_requests": exhausted,
            "recent_requests": [{"timestamp": int(ts), "endpoint": endpoint, "token": masked, "status": code,
                                 "time_str": time_str(ts), "client": client}
                                for ts, endpoint, masked, code, client in recent[::-1]],
        }


def _int(value) -> Optional[int]:
    return int(value) if value is not None else None

