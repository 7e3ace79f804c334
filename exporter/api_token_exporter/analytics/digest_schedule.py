"""The digest schedule inside the exporter service (``digest_schedule: daily|weekly``).

Every worker of the service runs the same small loop, but one process at a time sends: a lease
in the alert database (``alert_db_url``: replicas share it) or else an exclusive lock on a file
under ``state_dir`` (the workers of one host). What was sent is remembered in the same place,
per period, audience and channel, so a period is never sent twice to a channel, a restart does
not send it again, and a channel that failed is tried again later (1, 2, 4, 8 minutes after,
five times at most) without repeating the channels that got it.

Which period: a daily digest at ``digest_time`` (UTC) covers the day before; a weekly one on
``digest_weekday`` at that time covers the 7 days before that day. The most recent period whose
time has come is due until the next one's time comes: a service down at 08:00 sends when it is
back, and turning the schedule on sends the latest period at once (a sign that it works).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional

from . import digest_channels as channels
from ..core.digest_settings import WEEKDAYS, configured, parse_time_of_day

log = logging.getLogger("api_token_exporter.analytics.digest")

LEASE_SECONDS = 900.0          # a run (queries and sends) must end within this, or another may start
MAX_ATTEMPTS = 5
KEEP_PERIODS = 20              # periods remembered (the rest is history nobody asks about)
STATE_NAME = "digest"


def due_period(schedule: str, time_of_day: str, weekday: str, now: float):
    """(the period due at ``now``, its send time), or None when the schedule is off."""
    from .digest import Period, day_start
    if schedule == "off":
        return None
    at = parse_time_of_day(time_of_day)
    today = day_start(now)
    if schedule == "daily":
        send = today + at if now >= today + at else today - 86400 + at
        end = day_start(send)
        return Period("day", end - 86400, end), send
    weekday_index = WEEKDAYS.index(weekday.lower())
    days_back = (int(today // 86400) + 3 - weekday_index) % 7       # 1970-01-01 was a Thursday (3)
    send_day = today - days_back * 86400
    if now < send_day + at:
        send_day -= 7 * 86400
    return Period("week", send_day - 7 * 86400, send_day), send_day + at


def next_wait(schedule: str, time_of_day: str, weekday: str, now: float, interval: float) -> float:
    """Seconds until the next check: the check interval, shorter when a send time is nearer."""
    found = due_period(schedule, time_of_day, weekday, now)
    if found is None:
        return interval
    step = 86400 if schedule == "daily" else 7 * 86400
    nxt = found[1] + step
    return max(1.0, min(interval, nxt - now + 1))


# -- where the schedule keeps its state and its lock --------------------------------------------
class MemoryState:
    """One process only, nothing kept across restarts (no state_dir, no alert database)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._doc: dict = {}

    @contextlib.contextmanager
    def held(self) -> Iterator[Optional[dict]]:
        if not self._lock.acquire(blocking=False):
            yield None
            return
        doc = json.loads(json.dumps(self._doc))
        try:
            yield doc
        finally:                                      # what was sent is kept even if a later part failed
            self._doc = doc
            self._lock.release()


class FileState:
    """``state_dir/digest-state.json``, written while holding an exclusive lock on
    ``state_dir/digest.lock`` (fcntl: released by the kernel if the process dies)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, "digest-state.json")
        self.lock_path = os.path.join(directory, "digest.lock")
        self._thread_lock = threading.Lock()        # flock is per open file: threads need their own

    @contextlib.contextmanager
    def held(self) -> Iterator[Optional[dict]]:
        if not self._thread_lock.acquire(blocking=False):
            yield None
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(self.lock_path, "a+") as lock:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:                       # another worker is sending
                    yield None
                    return
                try:
                    doc = self._read()
                    before = json.dumps(doc, sort_keys=True)
                    try:
                        yield doc
                    finally:                          # what was sent is kept even if a later part failed
                        if json.dumps(doc, sort_keys=True) != before:
                            self._write(doc)
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                doc = json.load(fh)
            return doc if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("digest state %s unreadable (%s): starting afresh", self.path, type(exc).__name__)
            return {}

    def _write(self, doc: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".digest-state.", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class DatabaseState:
    """A lease and a settings row in the alert database (alert_store), shared by replicas."""

    def __init__(self, history, holder: str):
        self.history, self.holder = history, holder

    @contextlib.contextmanager
    def held(self) -> Iterator[Optional[dict]]:
        if not self.history.try_lease(STATE_NAME, self.holder, LEASE_SECONDS):
            yield None
            return
        try:
            found = self.history.get_settings(f"{STATE_NAME}:state")
            doc = found[0] if found else {}
            before = json.dumps(doc, sort_keys=True)
            try:
                yield doc
            finally:                                  # what was sent is kept even if a later part failed
                if json.dumps(doc, sort_keys=True) != before:
                    self.history.put_settings(doc, "digest", name=f"{STATE_NAME}:state")
        finally:
            self.history.release_lease(STATE_NAME, self.holder)


def state_for(settings):
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if settings.alert_db_url:
        from ..alerting.store import AlertHistory
        return DatabaseState(AlertHistory(settings.alert_db_url), holder)
    if settings.state_dir:
        return FileState(settings.state_dir)
    log.warning("digest_schedule without state_dir or alert_db_url: what was sent is kept in memory, so "
                "several processes, or a restart, may send a period again")
    return MemoryState()


# -- the scheduler ----------------------------------------------------------------------------------
class DigestScheduler:
    def __init__(self, settings, keystore=None, state=None, client=None, alerts=None,
                 check_interval: float = 60.0, clock=time.time, deliver=None):
        from . import queries as analytics, digest
        self.settings, self.keystore = settings, keystore
        self.state = state if state is not None else state_for(settings)
        self.client = client or analytics.PrometheusClient(settings.prometheus_url,
                                                           max(settings.prometheus_timeout, 30.0))
        self.alerts = alerts if alerts is not None else digest.alerts_source(settings, self.client)
        self.check_interval, self.clock = check_interval, clock
        self.deliver = deliver or channels.deliver
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "DigestScheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ate-digest", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        wait = 5.0                                   # soon after start, then every interval
        while not self._stop.wait(wait):
            try:
                self.run_once()
            except Exception:                        # never let the thread die: the next check retries
                log.exception("digest run failed")
            s = self.settings
            wait = next_wait(s.digest_schedule, s.digest_time, s.digest_weekday, self.clock(), self.check_interval)

    def run_once(self, now: Optional[float] = None) -> Optional[Dict[str, List[str]]]:
        """Send what is due and not yet sent. Returns {audience: [channels sent]} of this run;
        None when another process holds the lock or nothing is due."""
        s = self.settings
        now = self.clock() if now is None else now
        found = due_period(s.digest_schedule, s.digest_time, s.digest_weekday, now)
        if found is None:
            return None
        period, _send_time = found
        with self.state.held() as doc:
            if doc is None:
                return None
            periods = doc.setdefault("periods", {})
            record = periods.setdefault(period.key, {})
            sent = self._run(period, record, now)
            for old in sorted(periods, key=lambda k: int(k.split(":")[1].split("-")[0]))[:-KEEP_PERIODS]:
                del periods[old]
            return sent

    def _pending(self, record: dict, audience_key: str, now: float) -> List[str]:
        out = []
        for channel in configured(self.settings):
            entry = record.get(audience_key, {}).get(channel, {})
            if entry.get("sentAt"):
                continue
            attempts = entry.get("attempts", 0)
            if attempts >= MAX_ATTEMPTS:
                continue
            if attempts and now - entry.get("lastAttempt", 0) < 60 * 2 ** (attempts - 1):
                continue
            out.append(channel)
        return out

    def _run(self, period, record: dict, now: float) -> Dict[str, List[str]]:
        from . import digest
        from .queries import AnalyticsError, PrometheusUnavailable
        s = self.settings
        try:
            who = digest.audiences(s.digest_scope, self.keystore)
        except AnalyticsError as exc:
            log.warning("digest %s not sent: %s", period.label, exc)
            return {}
        sent: Dict[str, List[str]] = {}
        for audience in who:
            pending = self._pending(record, audience.key, now)
            if not pending:
                continue
            entries = record.setdefault(audience.key, {})
            try:
                doc = digest.build_digest(self.client, period, audience, self.keystore, self.alerts,
                                          s.digest_top_n, now=now)
                results = self.deliver(doc, s, pending)
            except PrometheusUnavailable as exc:
                results = [channels.Delivery(c, False, channels.scrub(str(exc), s)) for c in pending]
            for result in results:
                entry = entries.setdefault(result.channel, {})
                if result.ok:
                    entry.update(sentAt=now)
                    entry.pop("error", None)
                    sent.setdefault(audience.key, []).append(result.channel)
                    log.info("digest %s (%s) sent to %s", period.label, audience.key, result.channel)
                else:
                    entry.update(attempts=entry.get("attempts", 0) + 1, lastAttempt=now, error=result.detail)
                    log.warning("digest %s (%s) to %s failed (attempt %d of %d): %s", period.label,
                                audience.key, result.channel, entry["attempts"], MAX_ATTEMPTS, result.detail)
        return sent


def start_scheduler(settings, keystore=None) -> Optional[DigestScheduler]:
    if settings.digest_schedule == "off":
        return None
    return DigestScheduler(settings, keystore).start()
