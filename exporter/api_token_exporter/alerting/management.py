"""Alert management behind the alert API: the active alerts (Alertmanager's view, with
Prometheus's values and the key file's names), their history (alert_store), acknowledgements as
Alertmanager silences, feedback, and a sync that fills what the webhook never got.

Alertmanager keeps no history, and silenced or inhibited alerts never reach a webhook, so the
sync (every ``alert_sync_interval``, and before each answer that reads history) does three
things: stores every alert Alertmanager holds, whatever its state; reads Prometheus's
``ALERTS`` series since the last sync to fill episodes that began and ended while the exporter
was away; and ends acknowledgements whose alert resolved (expiring the silence) or whose
silence ended.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from typing import Dict, List, Optional

from .store import NOT_IN_HISTORY, AlertHistory, Episode
from ..core.timestamps import format_timestamp
from .client import Alertmanager, Prometheus, UpstreamError, fingerprint, parse_time

log = logging.getLogger("api_token_exporter.alerts")

STATES = ("firing", "acknowledged", "silenced", "inhibited")
SYNC_LEASE = 120.0                 # seconds a sync may take before another worker may start one
SYNC_LOOKBACK = 7 * 86400          # the longest gap the first sync fills from ALERTS
MAX_POINTS = 10_000                # per ALERTS range query (Prometheus refuses more than 11,000)


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """Someone else changed it at the same moment."""


def _iso(epoch: Optional[float]) -> Optional[str]:
    return format_timestamp(epoch) if epoch is not None else None


class AlertManagement:
    def __init__(self, history: AlertHistory, alertmanager: Alertmanager, prometheus: Optional[Prometheus],
                 keystore, metrics=None, sync_interval: float = 30.0):
        self.history, self.am, self.prometheus = history, alertmanager, prometheus
        self.keystore, self.metrics = keystore, metrics
        self.sync_interval = sync_interval
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._external: Optional[Dict[str, str]] = None
        self.on_sync: List = []            # more to do on each background sync (settings converge)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"   # who holds a lease

    # -- the background sync ----------------------------------------------------------------
    def start(self) -> "AlertManagement":
        if self.sync_interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ate-alert-sync", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        wait = 1.0                          # the first sync soon after start, then every interval
        while not self._stop.wait(wait):
            wait = self.sync_interval
            for task in [self.sync, *self.on_sync]:
                try:
                    task()
                except UpstreamError as exc:
                    log.warning("alert sync: %s", exc)
                except Exception:               # never let the thread die: the next run retries
                    log.exception("alert sync failed")

    def sync_on_demand(self) -> None:
        """With ``alert_sync_interval`` 0 there is no background sync: a reader syncs first."""
        if self.sync_interval == 0:
            self.sync()

    def sync(self, force: bool = False) -> Optional[dict]:
        """Store what Alertmanager holds, fill from ALERTS, resolve what ended and release
        acknowledgements. One worker or replica at a time (a lease in the database): None when
        another is syncing, or synced less than half an interval ago."""
        with self._sync_lock:
            now = time.time()
            since = self.history.synced_until()
            if not force and since is not None and 0 <= now - since < self.sync_interval / 2:
                return None
            if not self.history.try_lease("sync", self.holder, SYNC_LEASE):
                return None
            try:
                up_to = self.history.max_episode_id()      # episodes stored later are not judged here
                held = self.am.alerts()
                for alert in held:
                    self._store(alert, "alertmanager")
                still_firing = {a["fingerprint"] for a in held if parse_time(a.get("endsAt")) is None
                                or parse_time(a.get("endsAt")) > now}
                filled, ended = 0, {}
                if self.prometheus is not None:
                    filled, ended, firing_now = self._fill_from_alerts(now, since)
                    still_firing |= firing_now
                resolved = self.history.resolve_missing(still_firing, now, ended, up_to)
                released = self._release_acknowledgements()
                self.history.mark_synced(now)
            finally:
                self.history.release_lease("sync", self.holder)
        return {"stored": len(held), "filled": filled, "resolved": len(resolved), "released": released}

    def _external_labels(self) -> Dict[str, str]:
        if self._external is None:
            self._external = self.prometheus.external_labels()
        return self._external

    def _fill_from_alerts(self, now: float, since: Optional[float]):
        """Episodes in ``ALERTS`` since the last sync (the first sync: the hour before, at most
        SYNC_LOOKBACK after a long gap); returns (episodes found, {fingerprint: end} of those
        that ended, fingerprints firing at ``now``)."""
        begin = max(now - SYNC_LOOKBACK, (since or now - 3600) - 300)
        step = float(max(5, math.ceil((now - begin) / MAX_POINTS)))
        # on a grid of whole steps: two syncs that see the same episode give it the same start
        start = math.floor(begin / step) * step
        external = self._external_labels()

        def identity(metric):
            labels = {k: v for k, v in metric.items() if k not in ("__name__", "alertstate")}
            labels.update({k: v for k, v in external.items() if k not in labels})
            return labels
        firing_now = {fingerprint(identity(s["metric"])) for s in self.prometheus.firing_now()}
        filled, ended = 0, {}
        for series in self.prometheus.firing_range(start, now, step):
            labels = identity(series["metric"])
            if labels.get("alertname") in NOT_IN_HISTORY:
                continue
            fp = fingerprint(labels)
            times = [float(t) for t, _ in series["values"]]
            runs, run_start, previous = [], times[0], times[0]
            for t in times[1:]:
                if t - previous > 1.5 * step:
                    runs.append((run_start, min(previous + step, t)))
                    run_start = t
                previous = t
            # it ended after its last firing point and before the next one (or now)
            end = min(previous + step, now)
            runs.append((run_start, None if fp in firing_now else end))
            for run_start, run_end in runs:
                if self.history.record(fp, labels, {}, run_start, run_end, "prometheus", tolerance=2 * step):
                    filled += 1
            if fp not in firing_now:
                ended[fp] = end
        return filled, ended, firing_now

    def _release_acknowledgements(self) -> int:
        """An acknowledged alert that resolved: its silence expired. A silence that ended (its
        duration, or expired in Alertmanager): no longer acknowledged."""
        released = 0
        for episode, silence_id in self.history.acknowledged_silences():
            if episode.status == "resolved":
                self.am.expire_silence(silence_id)
                self.history.unacknowledge(episode.id, "api-token-exporter", "the alert resolved; silence expired")
                released += 1
                continue
            silence = self.am.silence(silence_id)
            if silence is None or silence.get("status", {}).get("state") == "expired":
                self.history.unacknowledge(episode.id, "api-token-exporter", "the silence ended")
                released += 1
        return released

    # -- notifications ----------------------------------------------------------------------
    def _store(self, alert: dict, source: str) -> Optional[int]:
        labels = {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}
        if not labels.get("alertname"):
            raise ValueError("an alert needs labels with an alertname")
        start = parse_time(alert.get("startsAt"))
        if start is None:
            raise ValueError("an alert needs startsAt")
        ends = parse_time(alert.get("endsAt"))
        if source == "webhook":
            end = ends if alert.get("status") == "resolved" else None
        else:                                   # Alertmanager's own view: past its end, resolved
            end = ends if ends is not None and ends <= time.time() else None
        fp = alert.get("fingerprint") or fingerprint(labels)
        return self.history.record(fp, labels, {str(k): str(v) for k, v in (alert.get("annotations") or {}).items()},
                                   start, end, source)

    def receive(self, payload) -> dict:
        """An Alertmanager webhook notification: every alert in it stored (firing or resolved)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise ValueError('a webhook notification is {"alerts": [...], ...}')
        stored, errors = 0, []
        for index, alert in enumerate(payload["alerts"]):
            try:
                if not isinstance(alert, dict):
                    raise ValueError("an alert is an object")
                if self._store(alert, "webhook") is not None:
                    stored += 1
            except ValueError as exc:
                errors.append({"index": index, "error": str(exc)})
        return {"stored": stored, "errors": errors}

    # -- reading ----------------------------------------------------------------------------
    def _token(self, token_id: Optional[str]) -> Optional[dict]:
        if not token_id:
            return None
        key = self.keystore.get(token_id)
        return {"id": token_id, "name": key.name if key else None, "tenant": key.tenant if key else None}

    def _values(self) -> Dict[str, float]:
        if self.prometheus is None:
            return {}
        try:
            external, alerts = self._external_labels(), self.prometheus.alerts()
        except UpstreamError as exc:                 # the list does not need Prometheus, only values
            log.warning("alert values: %s", exc)
            return {}
        values = {}
        for alert in alerts:
            if alert.get("state") != "firing":
                continue
            labels = {**{k: v for k, v in external.items() if k not in alert["labels"]}, **alert["labels"]}
            try:
                values[fingerprint(labels)] = float(alert["value"])
            except (KeyError, TypeError, ValueError):
                pass
        return values

    def active(self, type_: Optional[str] = None, severity: Optional[str] = None, token: Optional[str] = None,
               state: Optional[str] = None) -> List[dict]:
        held = [a for a in self.am.alerts() if a["labels"].get("alertname") not in NOT_IN_HISTORY]
        values = self._values()
        acked = {episode.fingerprint: (episode, sid) for episode, sid in self.history.acknowledged_silences()}
        out = []
        for alert in held:
            labels, annotations, status = alert["labels"], alert.get("annotations") or {}, alert.get("status") or {}
            fp = alert["fingerprint"]
            silenced_by, inhibited_by = status.get("silencedBy") or [], status.get("inhibitedBy") or []
            ack = acked.get(fp)
            if ack is not None and ack[1] in silenced_by:
                alert_state = "acknowledged"
            elif silenced_by:
                alert_state = "silenced"
            elif inhibited_by:
                alert_state = "inhibited"
            else:
                alert_state = "firing"
            item = {
                "id": fp, "type": labels.get("alertname"), "severity": labels.get("severity"),
                "state": alert_state, "token": self._token(labels.get("token")),
                "value": values.get(fp), "measured": annotations.get("value"),
                "threshold": annotations.get("threshold"), "summary": annotations.get("summary"),
                "description": annotations.get("description"), "runbook": annotations.get("runbook_url"),
                "dashboard": annotations.get("dashboard"), "since": alert.get("startsAt"),
                "labels": labels, "silenced_by": silenced_by, "inhibited_by": inhibited_by,
                "acknowledgement": _ack(ack[0]) if ack is not None and alert_state == "acknowledged" else None,
            }
            if ((type_ and item["type"] != type_) or (severity and item["severity"] != severity)
                    or (token and labels.get("token") != token) or (state and alert_state != state)):
                continue
            out.append(item)
        out.sort(key=lambda a: ({"critical": 0, "warning": 1}.get(a["severity"], 2), a["since"] or "", a["id"]))
        return out

    def history_page(self, start: float, end: float, token=None, type_=None, severity=None, limit=100,
                     offset=0) -> dict:
        rows, total = self.history.history(start, end, token, type_, severity, limit, offset)
        return {"from": _iso(start), "to": _iso(end), "total": total, "limit": limit, "offset": offset,
                "alerts": [self.describe(episode, events, end) for episode, events in rows]}

    def describe(self, episode: Episode, events: List[dict], now: float) -> dict:
        labels, annotations = episode.labels, episode.annotations
        until = episode.ends_at if episode.ends_at is not None else min(now, time.time())
        return {"id": episode.fingerprint, "type": episode.alertname, "severity": labels.get("severity"),
                "status": episode.status, "token": self._token(labels.get("token")),
                "starts_at": _iso(episode.starts_at), "ends_at": _iso(episode.ends_at),
                "duration_seconds": round(until - episode.starts_at, 3),
                "summary": annotations.get("summary"), "description": annotations.get("description"),
                "runbook": annotations.get("runbook_url"), "labels": labels,
                "notified": episode.notified, "found_in": episode.source,
                "acknowledgement": _ack(episode), "feedback": _feedback(episode),
                "events": [{**e, "at": _iso(e["at"])} for e in events]}

    # -- acting -----------------------------------------------------------------------------
    def _held(self, alert_id: str) -> dict:
        for alert in self.am.alerts():
            if alert["fingerprint"] == alert_id:
                return alert
        raise NotFound(f"No active alert with id {alert_id}")

    def acknowledge(self, alert_id: str, by: str, comment: str, duration: float) -> dict:
        alert = self._held(alert_id)
        episode_id = self._store(alert, "alertmanager")
        episode = self.history.latest(alert_id)
        if episode is None or episode_id is None:
            raise NotFound(f"Alert {alert_id} is kept out of history and cannot be acknowledged")
        now = time.time()
        silence_id = self.am.create_silence(alert["labels"], now, now + duration, by, comment)
        if not self.history.acknowledge(episode.id, by, comment, now + duration, silence_id,
                                        replaces=episode.silence_id, now=now):
            self.am.expire_silence(silence_id)             # someone acknowledged it meanwhile
            raise Conflict(f"Alert {alert_id} was acknowledged by someone else at the same moment; "
                           "read it again")
        if episode.silence_id:
            self.am.expire_silence(episode.silence_id)     # a new acknowledgement replaces the old
        return {"id": alert_id, "state": "acknowledged", "silence_id": silence_id, "acknowledged_by": by,
                "comment": comment, "until": _iso(now + duration)}

    def unacknowledge(self, alert_id: str, by: str) -> dict:
        episode = self.history.latest(alert_id)
        if episode is None or not episode.silence_id:
            raise NotFound(f"Alert {alert_id} is not acknowledged")
        self.am.expire_silence(episode.silence_id)
        self.history.unacknowledge(episode.id, by, "acknowledgement withdrawn")
        return {"id": alert_id, "state": "firing" if episode.status == "firing" else "resolved",
                "silence_id": episode.silence_id, "expired": True}

    def feedback(self, alert_id: str, verdict: str, note: str, by: str) -> dict:
        episode = self.history.latest(alert_id)
        if episode is None:
            raise NotFound(f"No alert with id {alert_id} in the history")
        if self.history.feedback(episode.id, verdict, note, by) and self.metrics is not None:
            self.metrics.count_alert_feedback(episode.alertname, verdict)   # an episode's first verdict
        return {"id": alert_id, "type": episode.alertname, "starts_at": _iso(episode.starts_at),
                "verdict": verdict, "note": note, "by": by}


def _ack(episode: Optional[Episode]) -> Optional[dict]:
    if episode is None or episode.ack is None:
        return None
    a = episode.ack
    return {"by": a["by"], "comment": a["comment"], "at": _iso(a["at"]), "until": _iso(a["until"]),
            "active": episode.silence_id is not None}


def _feedback(episode: Episode) -> Optional[dict]:
    if episode.feedback is None:
        return None
    f = episode.feedback
    return {"verdict": f["verdict"], "note": f["note"], "by": f["by"], "at": _iso(f["at"])}
