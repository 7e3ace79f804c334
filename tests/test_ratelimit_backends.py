"""The fast rate-limit paths against the `limits` library they replace, one Redis round trip per
request (counted at the server and at the client), and Sentinel by URI with real binaries."""
import random
import subprocess
import time

import pytest
import redis
from limits import RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from api_token_exporter.core.ratelimit import RateLimiter
from support import free_port, require_binary, stop_process, wait_for_port

LIMITS = {"minute": 5, "hour": 8, "day": 20}
ITEMS = {"minute": RateLimitItemPerMinute, "hour": RateLimitItemPerHour, "day": RateLimitItemPerDay}


def limits_reference(limiter: FixedWindowRateLimiter, token: str, limits: dict):
    """What the middleware did with `limits`: hit in order until refused, then read all windows."""
    allowed, refused, out = True, False, []
    for window in ("minute", "hour", "day"):
        item = ITEMS[window](limits[window])
        if not refused:
            ok = limiter.hit(item, token)
            if not ok:
                refused, allowed = True, False
        reset_at, remaining = limiter.get_window_stats(item, token)
        out.append((window, remaining, reset_at))
    return allowed, out


def test_memory_backend_gives_the_same_answers_as_limits():
    reference = FixedWindowRateLimiter(MemoryStorage())
    ours = RateLimiter("memory://")
    rnd = random.Random(3)
    tokens = [f"t{i}" for i in range(4)]
    for _ in range(120):
        token = rnd.choice(tokens)
        now = time.time()
        want_allowed, want = limits_reference(reference, token, LIMITS)
        got = ours.hit(token, LIMITS, now=now)
        assert got.allowed == want_allowed
        for state, (window, remaining, reset_at) in zip(got.windows, want):
            assert (state.window, state.remaining) == (window, remaining)
            if remaining < LIMITS[window]:        # a window with counts: same reset time
                assert abs(state.reset_at - reset_at) < 1.0


def test_redis_backend_gives_the_same_answers_as_memory(redis_uri):
    memory, shared = RateLimiter("memory://"), RateLimiter(redis_uri)
    rnd = random.Random(5)
    for _ in range(80):
        token = rnd.choice(["a", "b", "c"])
        m, r = memory.hit(token, LIMITS), shared.hit(token, LIMITS)
        assert m.allowed == r.allowed
        assert [(s.window, s.remaining) for s in m.windows] == [(s.window, s.remaining) for s in r.windows]
        for a, b in zip(m.windows, r.windows):
            assert abs(a.reset_at - b.reset_at) < 1.5


def test_redis_costs_one_round_trip_per_request(redis_uri):
    client = redis.Redis.from_url(redis_uri)
    limiter = RateLimiter(redis_uri)
    limiter.hit("warm", LIMITS)                      # loads the script once
    calls = {"n": 0}
    backend_client = limiter.backend.client
    original = backend_client.execute_command

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    backend_client.execute_command = counting
    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    for i in range(25):
        limiter.hit(f"token-{i % 3}", LIMITS)
    after = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls["n"] == 25
    assert after - before == 25


def test_keys_of_a_token_share_a_cluster_slot(redis_uri):
    RateLimiter(redis_uri).hit("slotty", LIMITS)
    keys = sorted(k.decode() for k in redis.Redis.from_url(redis_uri).keys("ate:rl:*slotty*"))
    assert keys == ["ate:rl:{slotty}:day", "ate:rl:{slotty}:hour", "ate:rl:{slotty}:minute"]


@pytest.fixture
def sentinel(redis_server, tmp_path):
    binary = require_binary("redis-server")
    master_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
                    f"dir {tmp_path}\n")
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield f"redis+sentinel://127.0.0.1:{port}/mymaster", redis_server
    finally:
        stop_process(proc)


def test_sentinel_uri_reaches_the_master_and_shares_counts(sentinel):
    sentinel_uri, direct_uri = sentinel
    redis.Redis.from_url(direct_uri).flushdb()
    via_sentinel, direct = RateLimiter(sentinel_uri), RateLimiter(direct_uri)
    limits = {"minute": 3}
    codes = [via_sentinel.hit("s", limits).allowed, direct.hit("s", limits).allowed,
             via_sentinel.hit("s", limits).allowed, direct.hit("s", limits).allowed]
    assert codes == [True, True, True, False]


def test_sentinel_uri_needs_a_service_name():
    with pytest.raises(ValueError, match="needs the service name"):
        RateLimiter("redis+sentinel://127.0.0.1:26379")


class FakeClock:
    def __init__(self, start: float):
        self.now = start

    def time(self) -> float:
        return self.now


def test_memory_backend_agrees_with_limits_across_window_boundaries(monkeypatch):
    """A controlled clock drives both through many minute, hour and day boundaries."""
    import limits.storage.memory
    clock = FakeClock(1_800_000_000.0)
    monkeypatch.setattr(limits.storage.memory, "time", clock)
    reference = FixedWindowRateLimiter(MemoryStorage())
    ours = RateLimiter("memory://")
    rnd = random.Random(11)
    crossed = {"minute": 0, "hour": 0, "day": 0}
    for i in range(3000):
        step = rnd.choice([0, 0, 1, 5, 13, 30, 59.5, 60, 61, 600, 3599, 3600, 86399, 86400.5])
        clock.now += step
        crossed["minute"] += step >= 60
        crossed["hour"] += step >= 3600
        crossed["day"] += step >= 86400
        token = rnd.choice(["a", "b"])
        want_allowed, want = limits_reference(reference, token, LIMITS)
        got = ours.hit(token, LIMITS, now=clock.now)
        assert got.allowed == want_allowed, i
        for state, (window, remaining, reset_at) in zip(got.windows, want):
            assert (state.window, state.remaining) == (window, remaining), i
            if remaining < LIMITS[window]:
                assert state.reset_at == pytest.approx(reset_at), (i, window)
    assert min(crossed.values()) >= 100


def test_a_limit_change_keeps_the_count_in_both_backends(redis_uri):
    memory, shared = RateLimiter("memory://"), RateLimiter(redis_uri)
    for limiter in (memory, shared):
        for _ in range(3):
            assert limiter.hit("k", {"minute": 3}).allowed
        assert not limiter.hit("k", {"minute": 3}).allowed          # 4th of 3: refused
    raised = [limiter.hit("k", {"minute": 5}) for limiter in (memory, shared)]
    assert [d.windows[0].remaining for d in raised] == [0, 0]        # 5 hits counted of 5
    assert [d.allowed for d in raised] == [True, True]
    lowered = [limiter.hit("k", {"minute": 2}) for limiter in (memory, shared)]
    assert [d.allowed for d in lowered] == [False, False]            # lowering forgives nothing
