"""A small client of Alertmanager's API v2 (alerts, silences, reload) and of the parts of
Prometheus the alert API reads (``/api/v1/alerts``, ``ALERTS``, external labels, reload), plus
Alertmanager's alert fingerprint, computed the way Prometheus's common/model does."""
from __future__ import annotations

from typing import Dict, List, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import yaml

from ..core.timestamps import format_timestamp, parse_timestamp

_FNV_OFFSET, _FNV_PRIME, _MASK = 14695981039346656037, 1099511628211, (1 << 64) - 1


def fingerprint(labels: Dict[str, str]) -> str:
    """Alertmanager's id of an alert: FNV-1a 64 over the sorted label names and values, each
    followed by the byte 0xff (model.LabelSet.Fingerprint), as 16 hex digits."""
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode("utf-8") + b"\xff":
                h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return f"{h:016x}"


def parse_time(text: Optional[str]) -> Optional[float]:
    """RFC 3339 with up to nanoseconds (Alertmanager's format) to epoch seconds; Go's zero time
    (an alert with no end yet) to None."""
    if not text or text.startswith("0001-01-01"):
        return None
    return parse_timestamp(text)


class UpstreamError(RuntimeError):
    """Alertmanager or Prometheus did not answer (``status`` None), or refused (its status)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class _Http:
    def __init__(self, url: str, timeout: float, name: str):
        self.url, self.timeout, self.name = url.rstrip("/"), timeout, name
        parts = urlsplit(self.url)         # what messages show: no user or password
        self.shown = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
        self.session = requests.Session()

    def call(self, method: str, path: str, **kwargs):
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise UpstreamError(f"{self.name} at {self.shown} did not answer: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise UpstreamError(f"{self.name} answered {response.status_code} to {method} {path}: "
                                f"{response.text.strip()[:300]}", response.status_code)
        return response


class Alertmanager(_Http):
    def __init__(self, url: str, timeout: float = 10.0):
        super().__init__(url, timeout, "Alertmanager")

    def alerts(self) -> List[dict]:
        """Every alert Alertmanager holds: active, silenced, inhibited and unprocessed."""
        return self.call("GET", "/api/v2/alerts", params={
            "active": "true", "silenced": "true", "inhibited": "true", "unprocessed": "true"}).json()

    def create_silence(self, matchers: Dict[str, str], starts: float, ends: float, created_by: str,
                       comment: str) -> str:
        body = {"matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                             for k, v in sorted(matchers.items())],
                "startsAt": format_timestamp(starts), "endsAt": format_timestamp(ends),
                "createdBy": created_by, "comment": comment}
        return self.call("POST", "/api/v2/silences", json=body).json()["silenceID"]

    def expire_silence(self, silence_id: str) -> None:
        try:
            self.call("DELETE", f"/api/v2/silence/{silence_id}")
        except UpstreamError as exc:
            if exc.status != 404:                 # already gone: nothing to expire
                raise

    def silence(self, silence_id: str) -> Optional[dict]:
        try:
            return self.call("GET", f"/api/v2/silence/{silence_id}").json()
        except UpstreamError as exc:
            if exc.status == 404:
                return None
            raise

    def reload(self) -> None:
        self.call("POST", "/-/reload")


class Prometheus(_Http):
    def __init__(self, url: str, timeout: float = 10.0):
        super().__init__(url, timeout, "Prometheus")

    def alerts(self) -> List[dict]:
        """Prometheus's own view of its alerting rules' alerts, with each alert's value."""
        return self.call("GET", "/api/v1/alerts").json()["data"]["alerts"]

    def external_labels(self) -> Dict[str, str]:
        config = yaml.safe_load(self.call("GET", "/api/v1/status/config").json()["data"]["yaml"]) or {}
        return {str(k): str(v) for k, v in ((config.get("global") or {}).get("external_labels") or {}).items()}

    def query_range(self, expr: str, start: float, end: float, step: float) -> List[dict]:
        return self.call("GET", "/api/v1/query_range", params={
            "query": expr, "start": start, "end": end, "step": step}).json()["data"]["result"]

    def series(self, match: str, start: float, end: float) -> List[dict]:
        return self.call("GET", "/api/v1/series", params={"match[]": match, "start": start, "end": end}).json()["data"]

    def firing_range(self, start: float, end: float, step: float) -> List[dict]:
        return self.query_range('ALERTS{alertstate="firing"}', start, end, step)

    def firing_now(self) -> List[dict]:
        return self.call("GET", "/api/v1/query", params={"query": 'ALERTS{alertstate="firing"}'}).json()["data"]["result"]

    def reload(self) -> None:
        self.call("POST", "/-/reload")
