"""API keys in a YAML file: stored as SHA-256 hashes, reloaded when the file changes.

The raw key exists only in the response to ``keys add`` and in the client's hands. A request's
key is hashed and looked up by hash, so no comparison ever runs over the raw secret.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from . import validation
from .timestamps import TimestampError, parse_datetime
from .ratelimit import WINDOW_ORDER as WINDOWS
BUDGET_PERIODS = ("daily", "monthly")
KEY_PREFIX = "atk_"
MAX_KEY_LENGTH = 256


class KeyStoreError(ValueError):
    """The key file or a key entry is malformed; the message says where."""


try:          # CPython's own SHA-256: OpenSSL's costs several µs more per request (an EVP fetch)
    from _sha2 import sha256 as _sha256            # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _sha256      # Python 3.11
    except ImportError:
        _sha256 = hashlib.sha256


def hash_key(raw_key: str) -> str:
    return "sha256:" + _sha256(raw_key.encode("utf-8")).hexdigest()


_UNKNOWN: Tuple[None, bool] = (None, False)


def _digest(key_hash: str) -> bytes:
    """The raw SHA-256 of a stored ``sha256:<hex>`` hash: what a request's key is looked up by."""
    return bytes.fromhex(key_hash[len("sha256:"):])


def mask_key(raw_key: str) -> str:
    """`atk_abcd…wxyz`: enough to recognise a key, never enough to use it."""
    if len(raw_key) <= 12:
        return raw_key[:2] + "…"
    head = raw_key[: len(KEY_PREFIX) + 4] if raw_key.startswith(KEY_PREFIX) else raw_key[:4]
    return f"{head}…{raw_key[-4:]}"


def well_formed_key(raw_key: str) -> bool:
    """1-256 printable ASCII characters, no spaces (str methods: cheaper than a regex)."""
    return (0 < len(raw_key) <= MAX_KEY_LENGTH and raw_key.isascii() and raw_key.isprintable()
            and " " not in raw_key)


def valid_token_id(token_id: str) -> bool:
    try:
        validation.token_id("id", token_id)
        return True
    except validation.ValidationError:
        return False


def _parse_time(value) -> Optional[dt.datetime]:
    if value in (None, ""):
        return None
    try:
        return parse_datetime(value)
    except TimestampError as exc:
        raise KeyStoreError(str(exc)) from None


SENSITIVITIES = ("low", "medium", "high")    # anomaly band widths: docs/alerts.md


@dataclass
class PreviousSecret:
    key_hash: str
    masked: str
    valid_until: dt.datetime

    def __post_init__(self):
        self.valid_until_ts = self.valid_until.timestamp()

    def to_dict(self) -> dict:
        return {"hash": self.key_hash, "masked": self.masked, "valid_until": self.valid_until.isoformat()}


@dataclass
class ApiKey:
    id: str
    key_hash: str
    name: str = ""
    tenant: str = ""
    active: bool = True
    expires_at: Optional[dt.datetime] = None
    rate_limits: Dict[str, int] = field(default_factory=dict)
    budget_usd: Dict[str, float] = field(default_factory=dict)
    masked: str = ""
    created_at: Optional[dt.datetime] = None
    anomaly_sensitivity: str = ""      # low, medium or high; "" for the thresholds.yml default
    description: str = ""
    updated_at: Optional[dt.datetime] = None
    last_rotated_at: Optional[dt.datetime] = None
    previous: Optional["PreviousSecret"] = None   # the secret a rotation replaced, in its grace period

    def previous_valid(self, now: Optional[float] = None) -> bool:
        return self.previous is not None and (now if now is not None else time.time()) < self.previous.valid_until_ts

    def expired(self, now: Optional[float] = None) -> bool:
        if self.expires_at is None:
            return False
        return (now if now is not None else time.time()) >= self.expires_at.timestamp()

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "ApiKey":
        if not isinstance(raw, dict):
            raise KeyStoreError(f"{where}: a key entry must be a mapping")
        token_id = raw.get("id")
        if not valid_token_id(token_id):
            raise KeyStoreError(
                f"{where}: id {token_id!r} must be 1-64 characters of letters, digits, _ . : -")
        key_hash = str(raw.get("hash", ""))
        if not re.match(r"^sha256:[0-9a-f]{64}$", key_hash):
            raise KeyStoreError(f"{where} ({token_id}): hash must be 'sha256:' and 64 hex digits")
        limits = raw.get("rate_limits") or {}
        if not isinstance(limits, dict) or any(w not in WINDOWS for w in limits):
            raise KeyStoreError(f"{where} ({token_id}): rate_limits takes minute, hour, day")
        for window, value in limits.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise KeyStoreError(
                    f"{where} ({token_id}): rate_limits.{window} must be a whole number >= 0")
        budget = raw.get("budget_usd") or {}
        if not isinstance(budget, dict) or any(p not in BUDGET_PERIODS for p in budget):
            raise KeyStoreError(f"{where} ({token_id}): budget_usd takes daily, monthly")
        for period, value in budget.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise KeyStoreError(f"{where} ({token_id}): budget_usd.{period} must be >= 0")
        sensitivity = raw.get("anomaly_sensitivity") or ""
        if sensitivity not in ("",) + SENSITIVITIES:
            raise KeyStoreError(f"{where} ({token_id}): anomaly_sensitivity must be low, medium or high")
        previous = raw.get("previous")
        try:
            expires_at = _parse_time(raw.get("expires_at"))
            created_at = _parse_time(raw.get("created_at"))
            updated_at = _parse_time(raw.get("updated_at"))
            last_rotated_at = _parse_time(raw.get("last_rotated_at"))
            if previous is not None:
                if not isinstance(previous, dict) or not re.match(r"^sha256:[0-9a-f]{64}$",
                                                                  str(previous.get("hash", ""))):
                    raise KeyStoreError("previous needs hash ('sha256:' and 64 hex digits), masked, valid_until")
                until = _parse_time(previous.get("valid_until"))
                if until is None:
                    raise KeyStoreError("previous.valid_until is missing")
                previous = PreviousSecret(previous["hash"], str(previous.get("masked", "") or ""), until)
        except KeyStoreError as exc:
            raise KeyStoreError(f"{where} ({token_id}): {exc}") from None
        return cls(
            id=token_id,
            key_hash=key_hash,
            name=str(raw.get("name", "") or ""),
            tenant=str(raw.get("tenant", "") or ""),
            active=bool(raw.get("active", True)),
            expires_at=expires_at,
            rate_limits={w: int(v) for w, v in limits.items()},
            budget_usd={p: float(v) for p, v in budget.items()},
            masked=str(raw.get("masked", "") or ""),
            created_at=created_at,
            anomaly_sensitivity=sensitivity,
            description=str(raw.get("description", "") or ""),
            updated_at=updated_at,
            last_rotated_at=last_rotated_at,
            previous=previous,
        )

    def to_dict(self) -> dict:
        out = {"id": self.id, "name": self.name, "tenant": self.tenant, "hash": self.key_hash,
               "masked": self.masked, "active": self.active}
        if self.description:
            out["description"] = self.description
        for name in ("created_at", "updated_at", "last_rotated_at"):
            if getattr(self, name):
                out[name] = getattr(self, name).isoformat()
        if self.previous is not None:
            out["previous"] = self.previous.to_dict()
        if self.expires_at:
            out["expires_at"] = self.expires_at.isoformat()
        if self.rate_limits:
            out["rate_limits"] = dict(self.rate_limits)
        if self.budget_usd:
            out["budget_usd"] = dict(self.budget_usd)
        if self.anomaly_sensitivity:
            out["anomaly_sensitivity"] = self.anomaly_sensitivity
        return out


class KeyStore:
    """Keys from a YAML file, re-read when its modification time or size changes.

    The file is checked at most every ``check_interval`` seconds, on use and by a watcher
    thread (``watch()``), so a broken file is noticed without traffic. A file that fails to
    parse, or is missing or empty (unless ``allow_empty``), leaves the last good set in place
    and the error in ``last_error``; at start-up it is an error.
    """

    def __init__(self, path: Optional[str] = None, keys: Iterable[ApiKey] = (),
                 check_interval: float = 1.0, logger=None, allow_empty: bool = False,
                 last_good: Optional[str] = None):
        """``last_good``: where each good version of the file is copied, and what a store whose
        file is broken when it starts serves instead (a gunicorn worker started while the file
        is broken keeps the keys its siblings have, rather than failing to boot)."""
        self.path = path
        self.last_good = last_good
        self.check_interval = check_interval
        self.allow_empty = allow_empty
        self._lock = threading.Lock()
        self._by_digest: Dict[bytes, Tuple[ApiKey, bool]] = {}   # (key, True for a rotated-away secret)
        self._by_id: Dict[str, ApiKey] = {}
        self._stamp = self._bad_stamp = None
        self._last_check = float("-inf")
        self._logger = logger
        self.last_error: Optional[str] = None
        self.last_success: Optional[float] = None     # Unix time of the last good load
        self.on_install: List = []          # callbacks given each newly installed key list
        self.on_error: List = []            # callbacks called once per failed version of the file
        self._watcher: Optional[threading.Thread] = None
        self._stop = threading.Event()
        if keys:
            self._install(list(keys))
            self.last_success = time.time()
        if path:
            self.reload(force=True)

    def watch(self) -> None:
        """Check the file every ``check_interval`` seconds in a daemon thread (again in a
        forked child, where threads do not survive)."""
        if not self.path or (self._watcher is not None and self._watcher.is_alive()):
            return
        self._stop = threading.Event()
        ref = weakref.ref(self)            # the thread must not keep a discarded store alive

        def run(stop=self._stop, interval=self.check_interval, logger=self._logger):
            while not stop.wait(interval):
                store = ref()
                if store is None:
                    return
                try:
                    store.reload()
                except Exception:                 # never let the watcher die silently
                    if logger:
                        logger.exception("key file watcher")
                del store

        self._watcher = threading.Thread(target=run, name="key-file-watcher", daemon=True)
        self._watcher.start()
        _WATCHED.add(self)

    def stop_watching(self) -> None:
        self._stop.set()
        _WATCHED.discard(self)

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    # -- reading -----------------------------------------------------------------------------
    def _install(self, keys: List[ApiKey]) -> None:
        by_id, by_digest = {}, {}
        for key in keys:
            if key.id in by_id:
                raise KeyStoreError(f"duplicate key id {key.id!r}")
            secrets_ = [(key.key_hash, False)] + ([(key.previous.key_hash, True)] if key.previous else [])
            for h, previous in secrets_:
                digest = _digest(h)
                owner = by_digest.get(digest)
                if owner is not None:
                    raise KeyStoreError(f"key {key.id!r} has the same hash as {owner[0].id!r}")
                by_digest[digest] = (key, previous)
            by_id[key.id] = key
        self._by_id, self._by_digest = by_id, by_digest
        for callback in self.on_install:
            callback(keys)

    def reload(self, force: bool = False) -> bool:
        """Re-read the file if it changed. Returns True when a new set was installed."""
        if not self.path:
            return False
        now = time.monotonic()
        if not force and now - self._last_check < self.check_interval:
            return False
        with self._lock:
            self._last_check = now
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                stamp = None
            else:
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if not force and (stamp == self._stamp and self.last_error is None
                              or stamp == self._bad_stamp and self.last_error is not None):
                return False
            try:
                if stamp is None and not self.allow_empty:
                    raise KeyStoreError("the key file does not exist (allow_empty_keys: true to "
                                        "run without keys)")
                data = read_key_file(self.path) if stamp else b""
                keys = parse_keys(data) if stamp else []
                if not keys and not self.allow_empty:
                    raise KeyStoreError("the key file has no keys (allow_empty_keys: true to run "
                                        "without keys)")
                self._install(keys)
                if self.last_good and stamp:
                    _write_private(self.last_good, data)
            except (KeyStoreError, yaml.YAMLError, OSError) as exc:
                self.last_error = f"{self.path}: {exc}"
                self._bad_stamp = stamp
                if self._logger:
                    self._logger.error("key file not reloaded, keeping the previous keys: %s",
                                       self.last_error)
                if force and self._stamp is None and not self._by_id and not self._from_last_good():
                    raise KeyStoreError(self.last_error) from None
                for callback in self.on_error:
                    callback()
                return False
            self._stamp = stamp
            self.last_success = time.time()
            self.last_error = None
            return True

    def _from_last_good(self) -> bool:
        """Install the last good copy of the file, if there is one that parses."""
        if not self.last_good:
            return False
        try:
            keys = parse_keys(read_key_file(self.last_good))
        except (KeyStoreError, yaml.YAMLError, OSError):
            return False
        self._install(keys)
        self.last_error += " (serving the last good version of the file)"
        return True

    def lookup(self, raw_key: str) -> Optional[ApiKey]:
        """The key of a current secret, or of a rotated one still in its grace period."""
        key, previous = self.lookup_secret(raw_key)
        return key if not previous or key.previous_valid() else None

    def lookup_secret(self, raw_key: str) -> Tuple[Optional[ApiKey], bool]:
        """(key, True when ``raw_key`` is the secret a rotation replaced, in grace or not)."""
        self.reload()
        return self._by_digest.get(_sha256(raw_key.encode("utf-8")).digest(), _UNKNOWN)

    def get(self, token_id: str) -> Optional[ApiKey]:
        self.reload()
        return self._by_id.get(token_id)

    def all(self) -> List[ApiKey]:
        self.reload()
        return list(self._by_id.values())

    def visible_to(self, key: ApiKey) -> List[str]:
        """The key ids an API key may see in analytics and the console: its tenant's tokens, or
        its own for a key without a tenant."""
        if not key.tenant:
            return [key.id]
        return [k.id for k in self.all() if k.tenant == key.tenant]

    def __len__(self) -> int:
        return len(self._by_id)


_WATCHED: "weakref.WeakSet[KeyStore]" = weakref.WeakSet()

def _after_fork_in_child() -> None:
    for store in list(_WATCHED):
        store._lock = threading.Lock()       # the parent's watcher may have held it
        store.watch()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def last_good_copy(state_dir: Optional[str]) -> Optional[str]:
    """Where the processes sharing ``state_dir`` keep the last good version of the key file."""
    return os.path.join(state_dir, ".keys-last-good.yml") if state_dir else None


def load_keys(path: str) -> List[ApiKey]:
    return parse_keys(read_key_file(path))


def read_key_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _write_private(path: str, data: bytes) -> None:
    """``data`` into ``path`` atomically (temp file + rename), readable by this user only."""
    fd, tmp = tempfile.mkstemp(prefix=".keys-", suffix=".yml", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_keys(data: bytes) -> List[ApiKey]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise KeyStoreError(f"the key file is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}): "
                            "save it as UTF-8") from None
    doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("keys", []), list):
        raise KeyStoreError("the key file must be a mapping with a 'keys:' list")
    return [ApiKey.from_dict(raw, f"keys[{i}]") for i, raw in enumerate(doc.get("keys") or [])]


def save_keys(path: str, keys: Iterable[ApiKey]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    text = "# api-token-exporter key store: hashes only, never raw keys.\n" + yaml.safe_dump(
        {"keys": [k.to_dict() for k in keys]}, sort_keys=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_private(path, text.encode("utf-8"))


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: str, token_id: str, name: str = "", tenant: str = "",
            rate_limits: Optional[Dict[str, int]] = None,
            budget_usd: Optional[Dict[str, float]] = None,
            expires_at: Optional[str] = None, raw_key: Optional[str] = None,
            anomaly_sensitivity: str = "", description: str = "") -> str:
    """Add a key to the file and return the raw secret (the only time it is seen)."""
    keys = load_keys(path) if os.path.exists(path) else []
    if not valid_token_id(token_id):
        raise KeyStoreError(
            f"id {token_id!r} must be 1-64 characters of letters, digits, _ . : - "
            "(it becomes a metric label; do not use the secret as an id)")
    if any(k.id == token_id for k in keys):
        raise KeyStoreError(f"a key with id {token_id!r} exists already")
    raw_key = raw_key or generate_key()
    if not well_formed_key(raw_key):
        raise KeyStoreError("a key must be 1-256 printable ASCII characters without spaces")
    entry = ApiKey.from_dict({
        "id": token_id, "name": name, "tenant": tenant, "hash": hash_key(raw_key),
        "rate_limits": rate_limits or {}, "budget_usd": budget_usd or {},
        "expires_at": expires_at, "active": True, "anomaly_sensitivity": anomaly_sensitivity,
        "description": description,
    }, "new key")
    entry.masked = mask_key(raw_key)
    entry.created_at = _now()
    if any(k.key_hash == entry.key_hash for k in keys):
        raise KeyStoreError("that key is already in the file under another id")
    save_keys(path, keys + [entry])
    return raw_key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def update_key(path: str, token_id: str, **changes) -> ApiKey:
    """Change fields of one key (None: unchanged; ``expires_at`` "" removes the expiry) and stamp
    updated_at."""
    keys = load_keys(path)
    for key in keys:
        if key.id == token_id:
            for name, value in changes.items():
                if name == "expires_at" and value is not None:
                    value = _parse_time(value) if value != "" else None
                    setattr(key, name, value)
                elif value is not None:
                    setattr(key, name, value)
            key.updated_at = _now()
            ApiKey.from_dict(key.to_dict(), "updated key")          # still a valid entry
            save_keys(path, keys)
            return key
    raise KeyStoreError(f"no key with id {token_id!r} in {path}")


def set_active(path: str, token_id: str, active: bool) -> ApiKey:
    return update_key(path, token_id, active=active)


def rotate_key(path: str, token_id: str, grace_seconds: float, raw_key: Optional[str] = None) -> Tuple[str, ApiKey]:
    """Give ``token_id`` a new secret; the current one stays valid for ``grace_seconds`` (0: not
    at all). Same id, so the same labels, limits, budget and history. Returns (new secret, key)."""
    keys = load_keys(path)
    key = next((k for k in keys if k.id == token_id), None)
    if key is None:
        raise KeyStoreError(f"no key with id {token_id!r} in {path}")
    if not 0 <= grace_seconds <= 90 * 86400:
        raise KeyStoreError("the grace period must be from 0 to 90 days")
    raw_key = raw_key or generate_key()
    digest = hash_key(raw_key)
    if any(digest in (k.key_hash, k.previous.key_hash if k.previous else None) for k in keys):
        raise KeyStoreError("that secret is already in the file")
    now = _now()
    key.previous = PreviousSecret(key.key_hash, key.masked,
                                  now + dt.timedelta(seconds=grace_seconds)) if grace_seconds > 0 else None
    key.key_hash, key.masked = digest, mask_key(raw_key)
    key.last_rotated_at = key.updated_at = now
    save_keys(path, keys)
    return raw_key, key
