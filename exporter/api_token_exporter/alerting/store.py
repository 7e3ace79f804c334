"""Alert history in a database (SQLAlchemy Core): SQLite under ``state_dir`` by default,
PostgreSQL by URL when several exporter replicas share it.

Sources, most exact first: ``webhook`` (a notification), ``alertmanager`` (an alert Alertmanager
holds, silenced or inhibited ones too) and ``prometheus`` (an episode found in ``ALERTS``, to
the step of the query). One row per episode of an alert: (fingerprint, start) is unique, so the same notification
delivered twice, or by two replicas, is stored once. Each episode keeps its labels and
annotations, when it ended, whether it reached the webhook or was found later in Prometheus's
``ALERTS`` series, its acknowledgement and its feedback; ``alert_events`` keeps what happened to
it, in order (fired, acknowledged, unacknowledged, resolved, feedback).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from ..core.config import optional_import

sa = optional_import("sqlalchemy", "alerts", "The alert history")

metadata = sa.MetaData()
episodes = sa.Table(
    "alert_episodes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("starts_at", sa.Float, nullable=False),
    sa.Column("ends_at", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),          # firing | resolved
    sa.Column("alertname", sa.String(200), nullable=False),
    sa.Column("severity", sa.String(32), nullable=False, default=""),
    sa.Column("token", sa.String(200), nullable=False, default=""),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("annotations", sa.Text, nullable=False, default="{}"),
    sa.Column("source", sa.String(16), nullable=False),          # webhook | alertmanager | prometheus
    sa.Column("end_source", sa.String(16)),                       # who said it ended (prometheus: estimated)
    sa.Column("notified", sa.Boolean, nullable=False, default=False),
    sa.Column("ack_by", sa.String(200)),
    sa.Column("ack_comment", sa.Text),
    sa.Column("ack_at", sa.Float),
    sa.Column("ack_until", sa.Float),
    sa.Column("silence_id", sa.String(64)),
    sa.Column("verdict", sa.String(16)),                          # true_positive | false_positive
    sa.Column("verdict_note", sa.Text),
    sa.Column("verdict_by", sa.String(200)),
    sa.Column("verdict_at", sa.Float),
    sa.UniqueConstraint("fingerprint", "starts_at", name="alert_episode_identity"),
    sa.Index("alert_episodes_by_start", "starts_at"),
    sa.Index("alert_episodes_by_fingerprint", "fingerprint", "status"),
)
events = sa.Table(
    "alert_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("episode_id", sa.Integer, sa.ForeignKey("alert_episodes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False, default=""),
    sa.Column("detail", sa.Text, nullable=False, default=""),
    sa.Index("alert_events_by_episode", "episode_id", "at"),
)
settings_table = sa.Table(
    "alert_settings", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
)

_RANK = {"prometheus": 0, "alertmanager": 1, "webhook": 2}
NOT_IN_HISTORY = {"Watchdog"}      # always firing by design: the pipeline's heartbeat
VERDICTS = ("true_positive", "false_positive")


@dataclass
class Episode:
    id: int
    fingerprint: str
    starts_at: float
    ends_at: Optional[float]
    status: str
    labels: Dict[str, str]
    annotations: Dict[str, str]
    source: str
    notified: bool
    ack: Optional[dict]
    feedback: Optional[dict]
    silence_id: Optional[str]

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


def _episode(row) -> Episode:
    m = row._mapping
    ack = None
    if m["ack_at"] is not None:
        ack = {"by": m["ack_by"], "comment": m["ack_comment"], "at": m["ack_at"], "until": m["ack_until"]}
    feedback = None
    if m["verdict"] is not None:
        feedback = {"verdict": m["verdict"], "note": m["verdict_note"], "by": m["verdict_by"],
                    "at": m["verdict_at"]}
    return Episode(m["id"], m["fingerprint"], m["starts_at"], m["ends_at"], m["status"], json.loads(m["labels"]),
                   json.loads(m["annotations"]), m["source"], bool(m["notified"]), ack, feedback, m["silence_id"])


def default_url(state_dir: Optional[str]) -> Optional[str]:
    return f"sqlite:///{os.path.join(os.path.abspath(state_dir), 'alerts.db')}" if state_dir else None


def _create_tables(engine) -> None:
    """Create what is missing. Workers starting together race between checking and creating a
    table; the loser's error means that table now exists, so each retry gets further, and the
    number of tables and indexes bounds the retries."""
    attempts = sum(1 + len(t.indexes) for t in metadata.tables.values()) + 1
    for attempt in range(attempts):
        try:
            metadata.create_all(engine)
            return
        except sa.exc.DBAPIError:
            if attempt == attempts - 1:
                raise


class AlertHistory:
    """The history store. Every method is one transaction; safe from several threads, processes
    (SQLite serialises writers; a busy writer is waited for) and, on PostgreSQL, replicas."""

    def __init__(self, url: str):
        if url.startswith("sqlite"):
            self.engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):
                cursor = conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")      # readers never wait for the writer
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
        else:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._insert = self._dialect_insert()
        _create_tables(self.engine)

    def _dialect_insert(self):
        name = self.engine.dialect.name
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            raise ValueError(f"alert history: SQLite or PostgreSQL, not {name}")
        return insert

    def close(self) -> None:
        self.engine.dispose()

    # -- episodes --------------------------------------------------------------------------
    def _find(self, conn, fingerprint: str, start: float, end: Optional[float], tolerance: float):
        """The episode of ``fingerprint`` that is this one: the same start, or (within
        ``tolerance``) one that overlaps [start, end]."""
        e = episodes.c
        row = conn.execute(sa.select(episodes).where(e.fingerprint == fingerprint, e.starts_at == start)).first()
        if row is not None or tolerance <= 0:
            return row
        upper = (end if end is not None else time.time() + 86400 * 365) + tolerance
        return conn.execute(sa.select(episodes).where(
            e.fingerprint == fingerprint, e.starts_at <= upper,
            sa.or_(e.ends_at.is_(None), e.ends_at >= start - tolerance)).order_by(e.starts_at.desc())).first()

    def _event(self, conn, episode_id: int, at: float, kind: str, actor: str = "", detail: str = "") -> None:
        conn.execute(events.insert().values(episode_id=episode_id, at=at, kind=kind, actor=actor,
                                            detail=detail))

    def record(self, fingerprint: str, labels: Dict[str, str], annotations: Dict[str, str], start: float,
               end: Optional[float], source: str, tolerance: float = 0.0) -> Optional[int]:
        """Store one firing or resolved alert (``end`` None: still firing). Returns the episode id,
        or None for alerts kept out of history. ``webhook`` and ``alertmanager`` are exact: they
        replace what was only found in ``ALERTS``; ``prometheus`` (with a ``tolerance`` of its
        query's step) only fills what they never gave."""
        if labels.get("alertname") in NOT_IN_HISTORY:
            return None
        e = episodes.c
        exact = source != "prometheus"
        with self.engine.begin() as conn:
            row = self._find(conn, fingerprint, start, end, 0.0 if exact else tolerance)
            if row is None and exact:
                # an episode first found in ALERTS (approximate start) is the same episode
                row = conn.execute(sa.select(episodes).where(
                    e.fingerprint == fingerprint, e.source == "prometheus", e.starts_at <= start + 120,
                    sa.or_(e.ends_at.is_(None), e.ends_at >= start - 120))).first()
                if row is not None:
                    conn.execute(episodes.update().where(e.id == row.id).values(
                        starts_at=start, annotations=json.dumps(annotations, sort_keys=True)))
                    conn.execute(events.update().where(events.c.episode_id == row.id, events.c.kind == "fired")
                                 .values(at=start))
            if row is None:
                values = dict(fingerprint=fingerprint, starts_at=start, ends_at=end,
                              status="resolved" if end is not None else "firing",
                              end_source=source if end is not None else None,
                              alertname=labels.get("alertname", "")[:200], severity=labels.get("severity", "")[:32],
                              token=labels.get("token", "")[:200], labels=json.dumps(labels, sort_keys=True),
                              annotations=json.dumps(annotations, sort_keys=True), source=source,
                              notified=source == "webhook")
                inserted = conn.execute(self._insert(episodes).values(**values).on_conflict_do_nothing(
                    index_elements=["fingerprint", "starts_at"]).returning(e.id)).first()
                if inserted is not None:
                    episode_id = inserted[0]
                    self._event(conn, episode_id, start, "fired", detail=source)
                    if end is not None:
                        self._event(conn, episode_id, end, "resolved", detail=source)
                    return episode_id
                # another worker or replica stored it a moment ago
                row = conn.execute(sa.select(episodes).where(e.fingerprint == fingerprint,
                                                             e.starts_at == start)).first()
            episode_id = row.id
            changes = {}
            if exact and _RANK[source] > _RANK[row.source]:
                changes["source"] = source               # the most exact source that saw it
            if source == "webhook" and not row.notified:
                changes["notified"] = True
            if row.annotations == "{}" and annotations:
                changes["annotations"] = json.dumps(annotations, sort_keys=True)
            if changes:
                conn.execute(episodes.update().where(e.id == episode_id).values(**changes))
            if end is None:
                if exact and row.status == "resolved" and row.end_source == "prometheus":
                    # ended by a sync that raced this alert's arrival: it is firing after all
                    if conn.execute(episodes.update().where(e.id == episode_id, e.end_source == "prometheus")
                                    .values(status="firing", ends_at=None, end_source=None)).rowcount:
                        conn.execute(events.delete().where(events.c.episode_id == episode_id,
                                                           events.c.kind == "resolved"))
                return episode_id
            if row.status != "resolved" or exact and row.ends_at != end and row.end_source != "webhook":
                changed = conn.execute(episodes.update().where(e.id == episode_id, sa.or_(
                    e.status != "resolved", e.ends_at != end)).values(
                    status="resolved", ends_at=end, end_source=source)).rowcount
                if changed and row.status != "resolved":
                    self._event(conn, episode_id, end, "resolved", detail=source)
                elif changed:                            # an exact end replaces an estimated one
                    conn.execute(events.update().where(events.c.episode_id == episode_id,
                                                       events.c.kind == "resolved").values(at=end, detail=source))
            return episode_id

    def max_episode_id(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(episodes.c.id))).scalar() or 0

    def resolve_missing(self, still_firing: Iterable[str], at: float,
                        ended: Optional[Dict[str, float]] = None, up_to_id: Optional[int] = None) -> List[Episode]:
        """Episodes stored as firing whose fingerprint is not among ``still_firing`` are over
        (their resolution never reached the webhook: silenced, or the exporter was away): ended
        at ``ended[fingerprint]`` where ALERTS tells, else at ``at``. Only episodes stored by
        ``up_to_id``: one stored after ``still_firing`` was read is not judged by it."""
        firing, ended = set(still_firing), ended or {}
        out = []
        e = episodes.c
        where = [e.status == "firing"] + ([e.id <= up_to_id] if up_to_id is not None else [])
        with self.engine.begin() as conn:
            for row in conn.execute(sa.select(episodes).where(*where)).all():
                if row.fingerprint in firing:
                    continue
                end = max(ended.get(row.fingerprint, at), row.starts_at)
                if conn.execute(episodes.update().where(e.id == row.id, e.status == "firing")
                                .values(status="resolved", ends_at=end, end_source="prometheus")).rowcount:
                    self._event(conn, row.id, end, "resolved", detail="prometheus")
                    out.append(_episode(row))
        return out

    # -- leases: one worker or replica at a time does a job ----------------------------------
    def try_lease(self, name: str, holder: str, seconds: float, now: Optional[float] = None) -> bool:
        """Hold ``name`` for ``seconds`` unless someone else holds it; True when held."""
        now = time.time() if now is None else now
        t = settings_table.c
        with self.engine.begin() as conn:
            conn.execute(self._insert(settings_table).values(name=f"lease:{name}", doc="{}", updated_at=0.0,
                                                            updated_by="").on_conflict_do_nothing(
                index_elements=["name"]))
            return conn.execute(settings_table.update().where(
                t.name == f"lease:{name}", sa.or_(t.updated_at < now, t.updated_by == holder)).values(
                updated_at=now + seconds, updated_by=holder)).rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        t = settings_table.c
        with self.engine.begin() as conn:
            conn.execute(settings_table.update().where(t.name == f"lease:{name}", t.updated_by == holder)
                         .values(updated_at=0.0))

    def latest(self, fingerprint: str) -> Optional[Episode]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(episodes).where(episodes.c.fingerprint == fingerprint)
                               .order_by(episodes.c.starts_at.desc()).limit(1)).first()
        return _episode(row) if row is not None else None

    # -- acknowledgements and feedback ------------------------------------------------------
    def acknowledge(self, episode_id: int, by: str, comment: str, until: float, silence_id: str,
                    replaces: Optional[str] = None, now: Optional[float] = None) -> bool:
        """Record ``silence_id`` as the acknowledgement, if the episode still has ``replaces``
        (None: no acknowledgement); False when someone acknowledged it meanwhile."""
        now = time.time() if now is None else now
        e = episodes.c
        with self.engine.begin() as conn:
            if conn.execute(episodes.update().where(
                    e.id == episode_id, e.silence_id.is_(None) if replaces is None else e.silence_id == replaces)
                    .values(ack_by=by, ack_comment=comment, ack_at=now, ack_until=until,
                            silence_id=silence_id)).rowcount != 1:
                return False
            self._event(conn, episode_id, now, "acknowledged", by, comment)
            return True

    def unacknowledge(self, episode_id: int, by: str, reason: str = "", now: Optional[float] = None) -> None:
        """The silence is gone; who acknowledged, when and why stays on the episode."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            changed = conn.execute(episodes.update().where(episodes.c.id == episode_id,
                                                           episodes.c.silence_id.is_not(None))
                                   .values(silence_id=None)).rowcount
            if changed:
                self._event(conn, episode_id, now, "unacknowledged", by, reason)

    def acknowledged_silences(self) -> List[Tuple[Episode, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(episodes).where(episodes.c.silence_id.is_not(None))).all()
        return [(_episode(r), r.silence_id) for r in rows]

    def feedback(self, episode_id: int, verdict: str, note: str, by: str, now: Optional[float] = None) -> bool:
        """Store a verdict; True when it is the episode's first (a changed verdict replaces the
        old one but is not a new one)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            first = conn.execute(sa.select(episodes.c.verdict).where(episodes.c.id == episode_id)).scalar() is None
            conn.execute(episodes.update().where(episodes.c.id == episode_id).values(
                verdict=verdict, verdict_note=note, verdict_by=by, verdict_at=now))
            self._event(conn, episode_id, now, "feedback", by, f"{verdict}: {note}" if note else verdict)
        return first

    # -- reading ----------------------------------------------------------------------------
    def history(self, start: float, end: float, token: Optional[str] = None, alertname: Optional[str] = None,
                severity: Optional[str] = None, limit: int = 100, offset: int = 0
                ) -> Tuple[List[Tuple[Episode, List[dict]]], int]:
        """Episodes active at any time in [start, end], newest first, with their events; and
        how many there are in all (for paging)."""
        e = episodes.c
        where = [e.starts_at <= end, sa.or_(e.ends_at.is_(None), e.ends_at >= start)]
        if token:
            where.append(e.token == token)
        if alertname:
            where.append(e.alertname == alertname)
        if severity:
            where.append(e.severity == severity)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(episodes).where(*where)).scalar_one()
            rows = conn.execute(sa.select(episodes).where(*where).order_by(e.starts_at.desc(), e.id.desc())
                                .limit(limit).offset(offset)).all()
            by_episode: Dict[int, List[dict]] = {r.id: [] for r in rows}
            if rows:
                for ev in conn.execute(sa.select(events).where(events.c.episode_id.in_(list(by_episode)))
                                       .order_by(events.c.at, events.c.id)):
                    by_episode[ev.episode_id].append({"at": ev.at, "kind": ev.kind, "by": ev.actor or None,
                                                      "detail": ev.detail or None})
        return [(_episode(r), by_episode[r.id]) for r in rows], total

    # -- settings ---------------------------------------------------------------------------
    def get_settings(self, name: str = "alerts") -> Optional[Tuple[dict, float, str]]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(settings_table).where(settings_table.c.name == name)).first()
        return (json.loads(row.doc), row.updated_at, row.updated_by) if row else None

    def put_settings(self, doc: dict, by: str, now: Optional[float] = None, name: str = "alerts") -> None:
        now = time.time() if now is None else now
        values = dict(doc=json.dumps(doc, sort_keys=True), updated_at=now, updated_by=by)
        with self.engine.begin() as conn:
            conn.execute(self._insert(settings_table).values(name=name, **values).on_conflict_do_update(
                index_elements=["name"], set_=values))

    def synced_until(self) -> Optional[float]:
        """Until when ALERTS was last read (by any replica)."""
        found = self.get_settings("sync")
        return found[0]["until"] if found else None

    def mark_synced(self, until: float) -> None:
        self.put_settings({"until": until}, "sync", now=until, name="sync")
