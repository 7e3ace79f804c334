"""The alert history store: the same tests on SQLite and on a real PostgreSQL server."""
import threading

import pytest

from api_token_exporter.alerting.store import AlertHistory
from api_token_exporter.alerting.client import fingerprint, parse_time

LABELS = {"alertname": "ApiTokenHighErrorRate", "severity": "critical", "token": "shop", "monitor": "x"}
FP = fingerprint(LABELS)
T0 = 1_790_000_000.0


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_postgres)]


@pytest.fixture(params=BACKENDS)
def empty_database(request, tmp_path):
    """The URL of a database with no tables: a file, or a database of its own on the server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'alerts.db'}"
    return request.getfixturevalue("new_database")


@pytest.fixture
def history(empty_database):
    store = AlertHistory(empty_database)
    yield store
    store.close()


def _open_history(url, go, results):
    go.wait(30)
    try:
        AlertHistory(url).close()
        results.put(None)
    except Exception as exc:                 # reported to the test, which names it
        results.put(repr(exc))


def test_workers_starting_together_on_an_empty_database_all_start(empty_database):
    """gunicorn starts its workers at once, each creating the tables it misses: a worker that
    loses the race must not fail to boot (which stops the whole server)."""
    import multiprocessing
    import sqlalchemy as sa
    from api_token_exporter.alerting.store import metadata
    ctx = multiprocessing.get_context("fork")    # as gunicorn starts its workers
    go, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_open_history, args=(empty_database, go, results)) for _ in range(6)]
    for w in workers:
        w.start()
    go.set()
    errors = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert errors == [None] * len(workers), errors
    store = AlertHistory(empty_database)
    assert set(sa.inspect(store.engine).get_table_names()) >= set(metadata.tables)
    store.close()


def test_the_same_notification_twice_is_stored_once(history):
    annotations = {"summary": "errors"}
    first = history.record(FP, LABELS, annotations, T0, None, "webhook")
    again = history.record(FP, LABELS, annotations, T0, None, "webhook")
    assert first == again
    history.record(FP, LABELS, annotations, T0, T0 + 600, "webhook")
    history.record(FP, LABELS, annotations, T0, T0 + 600, "webhook")      # resolved, delivered twice
    rows, total = history.history(T0 - 10, T0 + 1000)
    assert total == 1
    episode, events = rows[0]
    assert (episode.status, episode.starts_at, episode.ends_at, episode.notified) == ("resolved", T0, T0 + 600, True)
    assert [e["kind"] for e in events] == ["fired", "resolved"]


def test_concurrent_writers_store_one_episode(history, tmp_path):
    """Replicas receiving the same notification at once: (fingerprint, start) is unique."""
    url = str(history.engine.url.render_as_string(hide_password=False))
    others = [AlertHistory(url) for _ in range(4)]
    barrier = threading.Barrier(8)

    def deliver(store):
        barrier.wait()
        for _ in range(10):
            store.record(FP, LABELS, {}, T0, None, "webhook")
    threads = [threading.Thread(target=deliver, args=(s,)) for s in others * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows, total = history.history(T0 - 10, T0 + 10)
    assert total == 1 and [e["kind"] for e in rows[0][1]] == ["fired"]
    for store in others:
        store.close()


def test_alerts_found_in_prometheus_fill_gaps_and_yield_to_the_notification(history):
    # an episode the webhook never got, found in ALERTS to the query's step (30 s)
    found = history.record(FP, LABELS, {}, T0 + 30, T0 + 300, "prometheus", tolerance=60)
    # the same episode found again by another sync, with a start one step apart: no duplicate
    assert history.record(FP, LABELS, {}, T0 + 60, T0 + 300, "prometheus", tolerance=60) == found
    # the notification arrives late: its exact start replaces the approximate one
    assert history.record(FP, LABELS, {"summary": "exact"}, T0 + 12.5, T0 + 290, "webhook") == found
    rows, total = history.history(T0, T0 + 1000)
    assert total == 1
    episode = rows[0][0]
    assert (episode.starts_at, episode.ends_at, episode.source, episode.annotations) == (
        T0 + 12.5, T0 + 290, "webhook", {"summary": "exact"})
    # a later episode of the same alert is a new row
    history.record(FP, LABELS, {}, T0 + 3600, None, "prometheus", tolerance=60)
    assert history.history(T0, T0 + 7200)[1] == 2


def test_firing_episodes_missing_from_prometheus_are_resolved(history):
    other = dict(LABELS, token="blog")
    history.record(FP, LABELS, {}, T0, None, "alertmanager")
    history.record(fingerprint(other), other, {}, T0, None, "webhook")
    resolved = history.resolve_missing({FP}, T0 + 500, {fingerprint(other): T0 + 420})
    assert [e.labels["token"] for e in resolved] == ["blog"]
    rows, _ = history.history(T0, T0 + 1000, token="blog")
    assert (rows[0][0].status, rows[0][0].ends_at) == ("resolved", T0 + 420)
    assert history.latest(FP).status == "firing"


def test_acknowledgement_and_feedback_are_kept_with_the_episode(history):
    episode_id = history.record(FP, LABELS, {}, T0, None, "webhook")
    history.acknowledge(episode_id, "admin (ana)", "looking into it", T0 + 3600, "sil-1", now=T0 + 60)
    assert [(e.fingerprint, s) for e, s in history.acknowledged_silences()] == [(FP, "sil-1")]
    history.record(FP, LABELS, {}, T0, T0 + 900, "webhook")
    history.unacknowledge(episode_id, "api-token-exporter", "the alert resolved", now=T0 + 910)
    history.unacknowledge(episode_id, "api-token-exporter", "again", now=T0 + 920)     # once only
    assert history.feedback(episode_id, "true_positive", "", "admin", now=T0 + 990) is True     # the first
    assert history.feedback(episode_id, "false_positive", "deploy", "admin", now=T0 + 1000) is False
    with pytest.raises(ValueError):
        history.feedback(episode_id, "maybe", "", "admin")
    episode, events = history.history(T0, T0 + 2000)[0][0]
    assert episode.ack == {"by": "admin (ana)", "comment": "looking into it", "at": T0 + 60, "until": T0 + 3600}
    assert episode.silence_id is None and history.acknowledged_silences() == []
    assert episode.feedback["verdict"] == "false_positive"
    assert [e["kind"] for e in events] == ["fired", "acknowledged", "resolved", "unacknowledged", "feedback",
                                           "feedback"]


def test_history_filters_and_pages(history):
    for i in range(25):
        labels = dict(LABELS, token=f"t{i % 5}", severity="warning" if i % 2 else "critical")
        history.record(fingerprint(labels) + "", labels, {}, T0 + i * 100, T0 + i * 100 + 50, "webhook")
    everything = []
    offset = 0
    while True:
        rows, total = history.history(T0, T0 + 10_000, limit=10, offset=offset)
        everything += [r[0].starts_at for r in rows]
        offset += 10
        if offset >= total:
            break
    assert total == 25 and everything == sorted(everything, reverse=True) and len(set(everything)) == 25
    assert history.history(T0, T0 + 10_000, token="t1")[1] == 5
    assert history.history(T0, T0 + 10_000, severity="warning")[1] == 12
    assert history.history(T0, T0 + 10_000, alertname="Other")[1] == 0
    # the window: episodes active at any time inside it
    assert history.history(T0 + 120, T0 + 160)[1] == 1
    assert history.history(T0 + 60, T0 + 90)[1] == 0


def test_the_watchdog_is_not_history(history):
    assert history.record("f" * 16, {"alertname": "Watchdog"}, {}, T0, None, "webhook") is None
    assert history.history(T0 - 1, T0 + 1)[1] == 0


def test_settings_and_sync_marks_persist(history):
    assert history.get_settings() is None and history.synced_until() is None
    history.put_settings({"overrides": {"latency": {"warning": 0.5}}}, "admin", now=T0)
    history.put_settings({"overrides": {"latency": {"warning": 0.7}}}, "admin (b)", now=T0 + 1)
    history.mark_synced(T0 + 5)
    assert history.get_settings() == ({"overrides": {"latency": {"warning": 0.7}}}, T0 + 1, "admin (b)")
    assert history.synced_until() == T0 + 5


def test_fingerprint_and_times_follow_alertmanager():
    # the value Alertmanager gives {alertname="Watchdog"} (checked against a real one in
    # test_alert_api_e2e); here the parts that need no server
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("2026-12-01T10:00:00.123456789Z") == pytest.approx(1796119200.123457)
    assert parse_time("2026-12-01T11:00:00+01:00") == 1796119200.0
    assert fingerprint({"a": "1", "b": "2"}) == fingerprint({"b": "2", "a": "1"})
    assert fingerprint({"a": "12"}) != fingerprint({"a1": "2"})
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_an_acknowledgement_made_meanwhile_is_not_overwritten(history):
    episode_id = history.record(FP, LABELS, {}, T0, None, "webhook")
    assert history.acknowledge(episode_id, "admin (a)", "", T0 + 60, "sil-a") is True
    assert history.acknowledge(episode_id, "admin (b)", "", T0 + 60, "sil-b") is False        # saw none
    assert history.acknowledge(episode_id, "admin (b)", "", T0 + 60, "sil-b", replaces="sil-a") is True
    assert [s for _e, s in history.acknowledged_silences()] == ["sil-b"]


def test_an_episode_ended_by_a_racing_sync_is_reopened_by_a_notification(history):
    episode_id = history.record(FP, LABELS, {}, T0, None, "webhook")
    up_to = history.max_episode_id()
    other = dict(LABELS, token="late")
    late = history.record(fingerprint(other), other, {}, T0 + 5, None, "webhook")   # after the snapshot
    history.resolve_missing(set(), T0 + 30, up_to_id=up_to)
    assert history.latest(fingerprint(other)).status == "firing"                     # not judged
    assert history.latest(FP).status == "resolved"
    history.record(FP, LABELS, {}, T0, None, "alertmanager")                        # still firing after all
    episode = history.latest(FP)
    assert (episode.id, episode.status, episode.ends_at) == (episode_id, "firing", None)
    assert [e["kind"] for e in history.history(T0, T0 + 100, token="shop")[0][0][1]] == ["fired"]
    # an exact end is final: a later estimate does not move it, an alert list does not reopen it
    history.record(FP, LABELS, {}, T0, T0 + 40, "webhook")
    history.record(FP, LABELS, {}, T0, None, "alertmanager")
    history.record(FP, LABELS, {}, T0 + 5, T0 + 50, "prometheus", tolerance=10)
    assert (history.latest(FP).status, history.latest(FP).ends_at) == ("resolved", T0 + 40)
    assert late


def test_a_lease_is_held_by_one_until_released_or_expired(history):
    assert history.try_lease("sync", "a", 60, now=T0) is True
    assert history.try_lease("sync", "b", 60, now=T0 + 1) is False
    assert history.try_lease("sync", "a", 60, now=T0 + 2) is True            # the holder renews
    history.release_lease("sync", "a")
    assert history.try_lease("sync", "b", 60, now=T0 + 3) is True
    assert history.try_lease("sync", "a", 60, now=T0 + 62) is False
    assert history.try_lease("sync", "a", 60, now=T0 + 64) is True           # b's expired
