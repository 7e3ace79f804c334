"""AlertService, the in-process check of one call (seed 002): thresholds at their boundaries,
windows and volume guards, dedupe, log levels, threads, and the error ratio against brute force.
Every check passes ``now=``: nothing here reads the clock."""
import asyncio
import logging
import pathlib
import threading

import pytest
from hypothesis import given, settings, strategies as st

from api_token_exporter.alerting.checks import DEFAULT_THRESHOLDS, AlertService

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOGGER = "api_token_exporter.alerts"
SEED_THRESHOLDS = {"response_time": {"warning": 1.0, "critical": 2.0},
                   "error_rate": {"warning": 0.05, "critical": 0.10},
                   "usage_spike": {"warning": 2.0, "critical": 3.0}}


def call(svc, now, rt=0.1, status=200, key=123, endpoint="/api/v1/test"):
    return svc.check_all_alerts(key, rt, endpoint, status=status, now=now)


def graded(breaches, kind):
    return next((b.severity for b in breaches if b.type == kind), None)


def records(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_defaults_are_the_values_of_thresholds_yml():
    from_file = AlertService.from_thresholds(str(ROOT / "prometheus" / "thresholds.yml"))
    assert from_file.thresholds == DEFAULT_THRESHOLDS == AlertService().thresholds
    assert AlertService(SEED_THRESHOLDS).thresholds == DEFAULT_THRESHOLDS


def test_a_partial_alert_thresholds_overrides_only_its_fields():
    t = AlertService({"response_time": {"warning": 0.5}}).thresholds
    assert t["response_time"] == {"warning": 0.5, "critical": 2.0}
    assert t["error_rate"] == DEFAULT_THRESHOLDS["error_rate"]


@pytest.mark.parametrize("given_, message", [
    ({"error_rate": {"warning": 1.5}}, "alert_thresholds.error_rate.warning must be a number from 0 to 1"),
    ({"error_rate": {"critical": -0.1}}, "alert_thresholds.error_rate.critical must be a number from 0 to 1"),
    ({"response_time": {"warning": "1"}}, "alert_thresholds.response_time.warning must be a number above 0"),
    ({"usage_spike": {"critical": True}}, "alert_thresholds.usage_spike.critical must be a number above 0"),
    ({"error_rate": {"min_requests": 0}},
     "alert_thresholds.error_rate.min_requests must be a number of at least 1"),
    ({"response_time": {"warning": 3.0}},
     "alert_thresholds.response_time.warning must not exceed alert_thresholds.response_time.critical"),
    ({"error_rate": 0.05}, "alert_thresholds.error_rate must be a mapping"),
    ({"latency": {"warning": 1}}, "alert_thresholds.latency: unknown"),
    ({"usage_spike": {"warnng": 2}}, "alert_thresholds.usage_spike.warnng: unknown"),
])
def test_bad_thresholds_are_named(given_, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        AlertService(given_)


@pytest.mark.parametrize("rt, severity", [(0.5, None), (1.0, None), (1.01, "warning"),
                                          (2.0, "warning"), (2.01, "critical")])
def test_response_time_boundaries(rt, severity):
    assert graded(call(AlertService(), 0, rt=rt), "response_time") == severity


@pytest.mark.parametrize("errors, severity", [(0, None), (1, None), (2, "warning"), (3, "critical")])
def test_error_rate_boundaries_over_twenty_calls(errors, severity):
    svc = AlertService()          # 1/20 is exactly 5 %, 2/20 exactly 10 %: neither is above
    results = [call(svc, t, status=500 if t < errors else 200) for t in range(20)]
    assert graded(results[-1], "error_rate") == severity
    assert all(graded(r, "error_rate") is None for r in results[:-1])


def test_error_rate_needs_min_requests_and_only_5xx_count():
    svc = AlertService()
    assert all(graded(call(svc, 0, status=503), "error_rate") is None for _ in range(19))
    last = call(svc, 1, status=500)
    assert graded(last, "error_rate") == "critical" and last[-1].value == 1.0
    other = AlertService()
    for _ in range(30):
        assert graded(call(other, 0, status=404), "error_rate") is None


def test_error_rate_window_is_five_minutes_of_ten_second_buckets():
    svc = AlertService()
    for t in range(20):
        call(svc, t * 0.1, status=500)
    assert svc.snapshot(123, now=299.9) == {"calls": 20, "errors": 20}   # bucket 0 is the 30th back
    assert svc.snapshot(123, now=300) == {"calls": 0, "errors": 0}
    assert graded(call(svc, 300, status=500), "error_rate") is None
    assert svc.snapshot("never seen", now=0) == {"calls": 0, "errors": 0}


def spike(svc, spike_calls, first=0):
    """10 calls a minute from ``first`` to 3600 s, then ``spike_calls`` in the minute after."""
    for t in range(first, 3600, 6):
        call(svc, t)
    return [call(svc, 3600 + 59 * i / spike_calls) for i in range(spike_calls)][-1]


@pytest.mark.parametrize("calls, severity", [(20, None), (25, "warning"), (30, "warning"), (35, "critical")])
def test_usage_spike_against_the_hour_before(calls, severity):
    last = spike(AlertService(), calls)
    assert graded(last, "usage_spike") == severity
    if severity:
        assert next(b for b in last if b.type == "usage_spike").value == calls / 10


def test_no_usage_spike_before_an_hour_of_history():
    svc = AlertService()
    for i in range(300):                                     # half an hour at 10 a minute
        call(svc, 6 * i)
    assert all(graded(call(svc, 1800 + i / 2), "usage_spike") is None for i in range(100))
    # the hour before the last minute must lie entirely in the key's history: one bucket short
    assert graded(spike(AlertService(), 35, first=10), "usage_spike") is None
    assert graded(spike(AlertService(), 35, first=0), "usage_spike") == "critical"


def test_usage_spike_needs_volume_in_the_last_minute():
    svc = AlertService()
    for i in range(120):                                     # 2 a minute for an hour
        call(svc, 30 * i)
    results = [call(svc, 3600 + 59 * i / 12) for i in range(13)]   # 6x normal; 12 a minute is the guard
    assert [graded(r, "usage_spike") for r in results][-2:] == [None, "critical"]


def test_unauthorized_fires_on_the_sixth_attempt_in_an_hour():
    svc = AlertService()
    assert [svc.check_unauthorized("203.0.113.7", now=t) for t in range(5)] == [[]] * 5
    assert svc.check_unauthorized("198.51.100.1", now=5) == []             # clients apart
    sixth = svc.check_unauthorized("203.0.113.7", now=5)
    assert [(b.type, b.severity, b.value, b.threshold) for b in sixth] == [("unauthorized", "critical", 6, 5)]


def test_unauthorized_forgets_attempts_older_than_an_hour():
    svc = AlertService()
    for t in range(5):
        svc.check_unauthorized("203.0.113.7", now=t)
    assert svc.check_unauthorized("203.0.113.7", now=3600) == []           # the one at 0 is an hour old
    assert len(svc.check_unauthorized("203.0.113.7", now=3600)) == 1       # 1, 2, 3, 4 and two now


def test_levels_and_dedupe_until_cleared(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = AlertService()
    for rt in (1.5, 1.5, 1.8):                 # one warning, not three
        call(svc, 0, rt=rt)
    call(svc, 1, rt=2.5)                       # worse: logged
    call(svc, 2, rt=1.5)                       # still breaching, less: not logged
    call(svc, 3, rt=0.5)                       # cleared
    assert graded(call(svc, 4, rt=1.5), "response_time") == "warning"
    assert [level for level, _ in records(caplog)] == ["WARNING", "CRITICAL", "WARNING"]
    assert "response_time warning: token 123 on /api/v1/test: 1.5s > 1s" == records(caplog)[0][1]


def test_a_lasting_breach_is_logged_again_after_repeat_interval(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = AlertService(repeat_interval=300)
    for t in (0, 100, 299, 300, 301, 600):
        assert graded(call(svc, t, rt=1.5), "response_time") == "warning"   # returned every time
    assert len(records(caplog)) == 3                                        # logged at 0, 300, 600
    for t in range(6):
        svc.check_unauthorized("203.0.113.7", now=1000 + t)
    svc.check_unauthorized("203.0.113.7", now=1010)
    assert [level for level, _ in records(caplog)][3:] == ["CRITICAL"]


def test_log_lines_never_carry_long_or_control_text(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = AlertService()
    svc.check_all_alerts("k" * 200 + "\nFAKE LOG LINE", 3.0, "/" + "e" * 300, now=0)
    (level, message), = records(caplog)
    assert level == "CRITICAL" and "\n" not in message
    assert "k" * 64 not in message and "e" * 64 not in message and "k" * 63 + "…" in message


def test_least_recently_used_keys_are_evicted():
    svc = AlertService(max_tokens=2)
    for key in ("a", "b", "a", "c"):
        call(svc, 0, key=key)
    assert [svc.snapshot(k, now=0)["calls"] for k in ("a", "b", "c")] == [2, 0, 1]


def test_async_check_as_in_seed_002():
    svc = AlertService()
    breaches = asyncio.run(svc.acheck_all_alerts(api_key_id=123, response_time=1.5,
                                                 endpoint="/api/v1/test", now=0))
    assert [(b.type, b.severity, b.token, b.endpoint, b.value, b.threshold) for b in breaches] == [
        ("response_time", "warning", 123, "/api/v1/test", 1.5, 1.0)]


def test_threads_lose_no_count(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    svc = AlertService()
    start = threading.Barrier(8)

    def work():
        start.wait()
        for i in range(5000):        # the 10th of every 10 fails: no prefix is above 10 %
            svc.check_all_alerts("shared", 0.1, "/x", status=500 if i % 10 == 9 else 200, now=1000.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert svc.snapshot("shared", now=1000.0) == {"calls": 40_000, "errors": 4_000}
    assert [level for level, m in records(caplog)] == ["WARNING"]          # deduped across threads


# bursts of calls with one status at one time, so windows often hold the 20 calls the ratio needs
gaps = st.one_of(st.just(0.0), st.floats(0, 15), st.floats(15, 400), st.floats(3000, 4000))
bursts = st.lists(st.tuples(gaps, st.sampled_from([200, 201, 404, 429, 500, 503]), st.integers(1, 12)),
                  min_size=1, max_size=40)


@settings(deadline=None)
@given(bursts, st.floats(0, 400))
def test_error_ratio_matches_brute_force(steps, later):
    """After every call (and once more later), calls, errors and the error-rate breach agree with
    a count over all events so far in the 30 ten-second buckets ending with now's."""
    svc, seen, now = AlertService(), [], 0.0

    def brute(at):
        window = [s for t, s in seen if at // 10 - 30 < t // 10 <= at // 10]
        return len(window), sum(500 <= s < 600 for s in window)

    for gap, status, repeat in steps:
        now += gap
        for _ in range(repeat):
            seen.append((now, status))
            breaches = call(svc, now, status=status)
            calls, errors = brute(now)
            assert svc.snapshot(123, now=now) == {"calls": calls, "errors": errors}
            rate = [b.value for b in breaches if b.type == "error_rate"]
            expected = errors / calls if calls >= 20 and errors / calls > 0.05 else None
            assert rate == ([expected] if expected is not None else [])
    calls, errors = brute(now + later)
    assert svc.snapshot(123, now=now + later) == {"calls": calls, "errors": errors}
