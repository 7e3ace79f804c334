"""Alert settings through the API: the ``alert_thresholds`` shape, anomaly sensitivity
and learning period, and which channels get which severity.

A change is put in force by re-rendering the rules from ``thresholds.yml`` with the stored
overrides, checking them (promtool where installed), replacing the rule files and reloading
Prometheus; channels by rewriting the severity receivers of Alertmanager's configuration and
reloading it. Anything that fails puts the previous files back: nothing changed. The rules stay
plain PromQL with constants, which promtool's unit tests cover and a reader can follow; per-token
threshold gauges joined in every rule would have made each rule longer and every threshold depend
on the exporter being scraped.
"""
from __future__ import annotations

import copy
import os
import shutil
import re
import socket
import subprocess
import tempfile
import threading
from typing import Dict, List, Optional

import yaml

from ..mixin import rules as rulegen
from ..mixin import thresholds
from ..mixin.promql import ThresholdError, seconds
from ..core.timestamps import format_timestamp
from .client import Alertmanager, Prometheus, UpstreamError

SEVERITIES = ("critical", "warning")
CHANNELS = {"email": "email_configs", "slack": "slack_configs", "webhook": "webhook_configs"}
# (settings path, thresholds.yml path, check)
_NUMBER = (int, float)
THRESHOLDS = [
    ("alert_thresholds.response_time.warning", "latency.warning", ("seconds", 0.001, 3600)),
    ("alert_thresholds.response_time.critical", "latency.critical", ("seconds", 0.001, 3600)),
    ("alert_thresholds.error_rate.warning", "error_rate.warning", ("ratio", 0.0001, 1)),
    ("alert_thresholds.error_rate.critical", "error_rate.critical", ("ratio", 0.0001, 1)),
    ("alert_thresholds.usage_spike.warning", "usage_spike.warning", ("factor", 1.01, 1000)),
    ("alert_thresholds.usage_spike.critical", "usage_spike.critical", ("factor", 1.01, 1000)),
    ("alert_thresholds.unauthorized_access.critical", "unauthorized.critical", ("count", 1, 1_000_000)),
    ("alert_thresholds.unauthorized_access.api_wide_warning", "unauthorized.api_wide_warning",
     ("count", 1, 100_000_000)),
    ("alert_thresholds.rate_limit.approaching", "rate_limit.approaching_ratio", ("ratio", 0.01, 0.999)),
    ("anomaly.sensitivity", "anomaly.sensitivity", ("choice", "low", "medium", "high")),
    ("anomaly.learning_period", "anomaly.learning_period", ("duration", 86400, 90 * 86400)),
]
_EMAIL = re.compile(r"^[^@\s,<>\"]+@[^@\s,<>\"]+\.[^@\s,<>\"]+$")


class SettingsError(ValueError):
    """A bad value: the message names the field; nothing was changed."""


class ApplyError(RuntimeError):
    """Prometheus or Alertmanager refused the change: the previous files are back."""


class SettingsBusy(RuntimeError):
    """Another change is being put in force."""


SETTINGS_LEASE = 120.0


def _part(stored: dict, part: str):
    if part == "rules":
        return stored.get("overrides") or {}
    return stored.get("channels"), stored.get("recipients")


def _get(doc: dict, path: str):
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(doc: dict, path: str, value) -> None:
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _check(field: str, value, rule):
    kind = rule[0]
    if kind == "choice":
        if value not in rule[1:]:
            raise SettingsError(f"{field} must be one of {', '.join(rule[1:])}")
        return value
    if kind == "duration":
        try:
            secs = seconds(value)
        except ThresholdError:
            raise SettingsError(f"{field} must be a duration such as 12h, 1d or 8d") from None
        if not rule[1] <= secs <= rule[2]:
            raise SettingsError(f"{field} must be from 1d to 90d")
        return value
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or value != value:
        raise SettingsError(f"{field} must be a number")
    if kind == "count" and int(value) != value:
        raise SettingsError(f"{field} must be a whole number")
    if not rule[1] <= value <= rule[2]:
        raise SettingsError(f"{field} must be from {rule[1]} to {rule[2]}")
    return int(value) if kind == "count" else float(value)


def _known_paths(doc, prefix="") -> List[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _known_paths(value, path + ".")
        else:
            out.append(path)
    return out


class AlertSettings:
    def __init__(self, history, thresholds_file: str, rules_dir: Optional[str],
                 prometheus: Optional[Prometheus], alertmanager_config_file: Optional[str] = None,
                 alertmanager: Optional[Alertmanager] = None):
        self.history, self.thresholds_file, self.rules_dir = history, thresholds_file, rules_dir
        self.prometheus, self.am_file, self.am = prometheus, alertmanager_config_file, alertmanager
        self._lock = threading.Lock()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    # -- reading ----------------------------------------------------------------------------
    def stored(self) -> dict:
        found = self.history.get_settings()
        return found[0] if found else {}

    def thresholds(self, stored: Optional[dict] = None) -> dict:
        return thresholds.load_thresholds(self.thresholds_file, (stored if stored is not None else self.stored())
                                       .get("overrides") or {})

    def current(self) -> dict:
        found = self.history.get_settings()
        stored = found[0] if found else {}
        t = self.thresholds(stored)
        out: dict = {}
        for field, source, _rule in THRESHOLDS:
            _set(out, field, _get(t, source))
        channels, recipients = self._read_channels()
        out["channels"], out["recipients"] = channels, recipients
        out["updated_at"] = format_timestamp(found[1]) if found else None
        out["updated_by"] = found[2] if found else None
        return out

    def _am_config(self) -> Optional[dict]:
        if not self.am_file:
            return None
        with open(self.am_file, "r", encoding="utf-8") as fh:
            return yaml.safe_load(fh)

    def _read_channels(self):
        cfg = self._am_config()
        if cfg is None:
            return None, None
        receivers = {r["name"]: r for r in cfg.get("receivers", [])}
        channels = {sev: [c for c, key in CHANNELS.items() if receivers.get(sev, {}).get(key)]
                    for sev in SEVERITIES}
        emails, slack = [], None
        for sev in SEVERITIES:
            for e in receivers.get(sev, {}).get("email_configs", []):
                emails += [a.strip() for a in str(e.get("to", "")).split(",") if a.strip() and a.strip() not in emails]
            for s in receivers.get(sev, {}).get("slack_configs", []):
                slack = slack or s.get("channel")
        return channels, {"email": emails, "slack_channel": slack}

    # -- validating -------------------------------------------------------------------------
    def validate(self, body) -> dict:
        """The stored document after ``body`` (a partial settings document) is applied."""
        if not isinstance(body, dict):
            raise SettingsError("settings must be a JSON object")
        allowed = {f for f, _s, _r in THRESHOLDS}
        stored = copy.deepcopy(self.stored())
        overrides = stored.setdefault("overrides", {})
        for path in _known_paths({k: v for k, v in body.items() if k not in ("channels", "recipients")}):
            if path in ("updated_at", "updated_by", "by"):
                continue
            if path not in allowed:
                raise SettingsError(f"{path} is not a setting (one of: {', '.join(sorted(allowed))}, "
                                    "channels, recipients)")
        for field, source, rule in THRESHOLDS:
            value = _get(body, field)
            if value is not None:
                if not self.rules_dir:
                    raise SettingsError(f"{field}: thresholds need alert_rules_dir (the rule files "
                                        "Prometheus reads), which is not set")
                _set(overrides, source, _check(field, value, rule))
        try:
            self.thresholds(stored)
        except ThresholdError as exc:           # in this API's names, not thresholds.yml's
            message = str(exc).replace("thresholds: ", "")
            for field, source, _rule in THRESHOLDS:
                message = re.sub(rf"\b{re.escape(source)}\b", field, message)
            raise SettingsError(message) from None
        channels, recipients = self._read_channels()
        given = {k: body[k] for k in ("channels", "recipients")
                 if k in body and body[k] != {"channels": channels, "recipients": recipients}[k]}
        if given:                          # what GET answered, sent back unchanged, is no change
            if self.am_file is None:
                raise SettingsError("channels and recipients need alertmanager_config_file (the file "
                                    "Alertmanager reads), which is not set")
            stored["channels"] = self._check_channels(given.get("channels"), stored.get("channels") or channels)
            stored["recipients"] = self._check_recipients(given.get("recipients"), stored.get("recipients"))
        return stored

    def _check_channels(self, given, before) -> Optional[dict]:
        if given is None:
            return before
        if not isinstance(given, dict):
            raise SettingsError("channels must be an object: {\"critical\": [...], \"warning\": [...]}")
        out = dict(before)
        templates = self._templates()
        for severity, kinds in given.items():
            if severity not in SEVERITIES:
                raise SettingsError(f"channels.{severity}: severities are {', '.join(SEVERITIES)}")
            if not isinstance(kinds, list) or any(k not in CHANNELS for k in kinds):
                raise SettingsError(f"channels.{severity} must be a list of {', '.join(CHANNELS)}")
            for kind in kinds:
                if kind not in templates:
                    raise SettingsError(f"channels.{severity}: {kind} is not configured in Alertmanager's "
                                        f"configuration (no receiver has {CHANNELS[kind]})")
            out[severity] = list(dict.fromkeys(kinds))
        return out

    def _check_recipients(self, given, before) -> Optional[dict]:
        if given is None:
            return before
        if not isinstance(given, dict) or set(given) - {"email", "slack_channel"}:
            raise SettingsError("recipients has email (a list of addresses) and slack_channel")
        out = dict(before or {})
        templates = self._templates()
        for field, kind in (("email", "email"), ("slack_channel", "slack")):
            if field in given and kind not in templates:
                raise SettingsError(f"recipients.{field}: {kind} is not configured in Alertmanager's "
                                    f"configuration (no receiver has {CHANNELS[kind]})")
        if "email" in given:
            emails = given["email"]
            if not isinstance(emails, list) or not emails or not all(
                    isinstance(a, str) and _EMAIL.match(a) for a in emails):
                raise SettingsError("recipients.email must be a non-empty list of email addresses")
            out["email"] = emails
        if "slack_channel" in given:
            channel = given["slack_channel"]
            if not isinstance(channel, str) or not re.fullmatch(r"[#@][\w.-]{1,80}", channel):
                raise SettingsError("recipients.slack_channel must look like #channel or @user")
            out["slack_channel"] = channel
        return out

    def _templates(self) -> Dict[str, list]:
        """One configuration per channel kind, as a severity receiver in Alertmanager's file has
        it (read each time: an operator's edit of the file wins; a kind no receiver has any
        more cannot be switched on here, and no receiver's secrets are copied elsewhere)."""
        found: Dict[str, list] = {}
        cfg = self._am_config() or {}
        for receiver in cfg.get("receivers", []):
            if receiver.get("name") in SEVERITIES:
                for kind, key in CHANNELS.items():
                    if receiver.get(key) and kind not in found:
                        found[kind] = receiver[key]
        return found

    # -- applying ---------------------------------------------------------------------------
    def update(self, body, by: str) -> dict:
        """Validate, put in force, then store: one change at a time across workers and replicas
        (a lease in the database), so none is lost and none is half done."""
        with self._lock:
            if not self.history.try_lease("settings", self.holder, SETTINGS_LEASE):
                raise SettingsBusy("Another alert settings change is being put in force; try again in a moment")
            try:
                previous = self.stored()
                stored = self.validate(body)
                parts = {part for part in ("rules", "channels")
                         if _part(stored, part) != _part(previous, part)}
                try:
                    self.apply(stored, parts=parts)
                except ApplyError:
                    self.apply(previous or {}, parts=parts)    # the part that went through goes back too
                    raise
                self.history.put_settings(stored, by)
            finally:
                self.history.release_lease("settings", self.holder)
            return self.current()

    def apply(self, stored: dict, must_reload: bool = True, parts=("rules", "channels")) -> bool:
        """Put ``stored`` in force; False when the files already say it."""
        changed = False
        if "rules" in parts and self.rules_dir:
            changed |= self._apply_rules(self.thresholds(stored), must_reload)
        if "channels" in parts and stored.get("channels") and self.am_file:
            changed |= self._apply_channels(stored, must_reload)
        return changed

    def converge(self) -> bool:
        """Put the stored settings in force where the files differ: what another replica stored,
        or what a redeploy overwrote. Prometheus away is no error here: it reads the files when
        it starts."""
        with self._lock:
            if not self.history.try_lease("settings", self.holder, SETTINGS_LEASE):
                return False
            try:
                return self.apply(self.stored() or {}, must_reload=False)
            finally:
                self.history.release_lease("settings", self.holder)

    def _apply_rules(self, t: dict, must_reload: bool = True) -> bool:
        rendered = rulegen.render(t)
        if not rulegen.stale(t, self.rules_dir):
            return False
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in rendered.items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                    fh.write(text)
            _promtool_check([os.path.join(tmp, name) for name in rendered])
        os.makedirs(self.rules_dir, exist_ok=True)
        _replace_files({os.path.join(self.rules_dir, n): text for n, text in rendered.items()},
                       self.prometheus.reload if self.prometheus else None, "Prometheus", must_reload)
        return True

    def _apply_channels(self, stored: dict, must_reload: bool = True) -> bool:
        templates = self._templates()
        cfg = self._am_config()
        recipients = stored.get("recipients") or {}
        for receiver in cfg.get("receivers", []):
            severity = receiver.get("name")
            if severity not in SEVERITIES or severity not in stored["channels"]:
                continue
            for kind, key in CHANNELS.items():
                if kind not in stored["channels"][severity]:
                    receiver.pop(key, None)
                elif not receiver.get(key) and kind in templates:      # a receiver keeps its own
                    receiver[key] = copy.deepcopy(templates[kind])
            for email in receiver.get("email_configs", []):
                if recipients.get("email"):
                    email["to"] = ", ".join(recipients["email"])
            for slack in receiver.get("slack_configs", []):
                if recipients.get("slack_channel"):
                    slack["channel"] = recipients["slack_channel"]
        text = yaml.safe_dump(cfg, sort_keys=False, width=1000)
        with open(self.am_file, "r", encoding="utf-8") as fh:
            if fh.read() == text:
                return False
        _replace_files({self.am_file: text}, self.am.reload if self.am else None, "Alertmanager", must_reload)
        return True


def _promtool_check(paths: List[str]) -> None:
    promtool = shutil.which("promtool")
    if not promtool:            # Prometheus's reload checks them too, and refuses bad ones
        return
    result = subprocess.run([promtool, "check", "rules", *paths], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ApplyError(f"promtool refused the rendered rules: {(result.stdout + result.stderr).strip()[-500:]}")


def _replace_files(files: Dict[str, str], reload, name: str, must_reload: bool = True) -> None:
    """Write every file (atomically each), then reload; on a refusal put the old ones back (and
    when ``must_reload``, also when the server does not answer)."""
    before = {}
    for path in files:
        try:
            with open(path, "r", encoding="utf-8") as fh:
                before[path] = fh.read()
        except FileNotFoundError:
            before[path] = None
    try:
        _write_all(files)
    except OSError as exc:
        _write_all(before)
        raise ApplyError(f"cannot write {exc.filename}: {exc.strerror}") from None
    if reload is None:
        return
    try:
        reload()
    except UpstreamError as exc:
        if not must_reload and exc.status is None:
            return
        _write_all(before)
        try:
            reload()
        except UpstreamError:
            pass
        verb = "did not answer" if exc.status is None else "refused the change"
        raise ApplyError(f"{name} {verb}; the previous configuration is back: {exc}") from None


def _write_all(files: Dict[str, Optional[str]]) -> None:
    for path, text in files.items():
        if text is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)                 # readable by Prometheus or Alertmanager
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
