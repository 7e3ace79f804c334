import math
import re

import pytest
from hypothesis import given, settings, strategies as st

from api_token_exporter.core.ratelimit import WINDOW_ORDER, Decision, RateLimiter, StorageUnavailable
from api_token_exporter.web.pipeline import header_builder, rate_limit_headers
from api_token_exporter.core.metrics import TOKEN_STATUS_VALUES
from support import build_app, sample_total

WINDOWS = {"Minute": 60, "Hour": 3600, "Day": 86400}


def get(client, raw):
    return client.get("/items", headers={"X-API-Key": raw})


def test_headers_on_every_authenticated_response_count_down(client, keys):
    first, second = get(client, keys[1]["alpha"]), get(client, keys[1]["alpha"])
    for window, seconds in WINDOWS.items():
        assert first.headers[f"X-RateLimit-{window}-Limit"] == str({"Minute": 100, "Hour": 1000, "Day": 10000}[window])
        reset = int(first.headers[f"X-RateLimit-{window}-Reset"])
        assert seconds - 2 <= reset <= seconds
        assert int(second.headers[f"X-RateLimit-{window}-Remaining"]) == \
            int(first.headers[f"X-RateLimit-{window}-Remaining"]) - 1
    assert first.headers["X-RateLimit-Minute-Remaining"] == "99"
    assert first.headers["RateLimit-Policy"] == \
        '"minute";q=100;w=60, "hour";q=1000;w=3600, "day";q=10000;w=86400'
    assert re.fullmatch(r'"minute";r=98;t=\d+, "hour";r=998;t=\d+, "day";r=9998;t=\d+',
                        second.headers["RateLimit"])


def test_per_key_minute_override_refuses_with_429_and_retry_after(client, keys):
    for expected_remaining in (2, 1, 0):
        r = get(client, keys[1]["beta"])
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Minute-Limit"] == "3"
        assert r.headers["X-RateLimit-Minute-Remaining"] == str(expected_remaining)
    refused = get(client, keys[1]["beta"])
    assert refused.status_code == 429
    retry = int(refused.headers["Retry-After"])
    assert 55 <= retry <= 60
    assert refused.get_json() == {"detail": f"Rate limit exceeded for minute. Try again in {retry} seconds"}
    assert refused.headers["X-RateLimit-Minute-Remaining"] == "0"
    # the refused request did not use up the longer windows
    assert refused.headers["X-RateLimit-Hour-Remaining"] == "997"
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_rate_limited_total", token="beta", window="minute") == 1
    assert sample_total(text, "apitoken_requests_total", token="beta", code="429") == 1
    assert sample_total(text, "apitoken_rate_limit_remaining", token="beta", window="minute") == 0
    assert sample_total(text, "apitoken_token_status", token="beta") == TOKEN_STATUS_VALUES["rate_limited"]
    assert sample_total(text, "apitoken_token_status", token="alpha") == TOKEN_STATUS_VALUES["active"]


def test_hour_window_refuses(client, keys):
    for _ in range(4):
        assert get(client, keys[1]["gamma"]).status_code == 200
    refused = get(client, keys[1]["gamma"])
    assert refused.status_code == 429
    assert refused.get_json()["detail"].startswith("Rate limit exceeded for hour. Try again in ")
    assert 3590 <= int(refused.headers["Retry-After"]) <= 3600


def test_day_window_refuses(client, keys):
    for _ in range(2):
        assert get(client, keys[1]["delta"]).status_code == 200
    refused = get(client, keys[1]["delta"])
    assert refused.status_code == 429
    assert "for day" in refused.get_json()["detail"]
    assert 86390 <= int(refused.headers["Retry-After"]) <= 86400


def test_default_limits_are_configurable(make_app, keys):
    client = make_app(rate_limits={"minute": 2}).test_client()
    assert get(client, keys[1]["alpha"]).headers["X-RateLimit-Minute-Limit"] == "2"
    assert get(client, keys[1]["alpha"]).headers["X-RateLimit-Hour-Limit"] == "1000"
    assert get(client, keys[1]["alpha"]).status_code == 429


def test_limits_are_per_token(client, keys):
    for _ in range(3):
        get(client, keys[1]["beta"])
    assert get(client, keys[1]["beta"]).status_code == 429
    assert get(client, keys[1]["alpha"]).status_code == 200


def test_redis_limits_hold_across_two_app_instances(keys, redis_uri):
    one = build_app(keys[0], storage_uri=redis_uri).test_client()
    two = build_app(keys[0], storage_uri=redis_uri).test_client()
    codes = [get(c, keys[1]["beta"]).status_code for c in (one, two, one, two, one)]
    assert codes == [200, 200, 200, 429, 429]
    r = get(two, keys[1]["alpha"])
    assert r.headers["X-RateLimit-Minute-Remaining"] == "99"
    assert get(one, keys[1]["alpha"]).headers["X-RateLimit-Minute-Remaining"] == "98"


def test_redis_down_fails_open_and_is_counted(keys, caplog):
    # a port where nothing listens: the API keeps answering, the outage is visible
    from support import free_port
    client = build_app(keys[0], storage_uri=f"redis://:hunter2secret@127.0.0.1:{free_port()}/0").test_client()
    for _ in range(3):                   # the third failure in a row opens the circuit breaker
        r = get(client, keys[1]["alpha"])
        assert r.status_code == 200
        assert "X-RateLimit-Minute-Limit" not in r.headers
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_rate_limit_storage_errors_total") == 3
    assert sample_total(text, "apitoken_rate_limit_storage_breaker_state", state="open") == 1
    assert "rate-limit storage redis://127.0.0.1" in caplog.text and "circuit breaker open" in caplog.text
    assert "hunter2secret" not in caplog.text


def test_limiter_raises_storage_unavailable_without_the_password():
    from support import free_port
    limiter = RateLimiter(f"redis://:pw-secret@127.0.0.1:{free_port()}/0")
    with pytest.raises(StorageUnavailable) as info:
        limiter.hit("t", {"minute": 5})
    assert "pw-secret" not in str(info.value)


def test_bad_storage_uri_is_a_clear_error():
    with pytest.raises(ValueError, match="rate-limit storage 'nosuch://x'"):
        RateLimiter("nosuch://x")


def reference_headers(plan, values, now):
    """The rate-limit headers written out the plain way, one window at a time."""
    headers, current = [], []
    for i, (window, limit, seconds) in enumerate(plan):
        name = f"X-RateLimit-{window.capitalize()}"
        remaining = str(values[2 * i])
        reset_in = values[2 * i + 1] - now
        reset = str(math.ceil(reset_in) if reset_in > 0 else 0)
        headers += [(f"{name}-Limit", str(limit)), (f"{name}-Remaining", remaining), (f"{name}-Reset", reset)]
        current.append(f'"{window}";r={remaining};t={reset}')
    policy = ", ".join(f'"{w}";q={limit};w={seconds}' for w, limit, seconds in plan)
    return headers + [("RateLimit-Policy", policy), ("RateLimit", ", ".join(current))]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(WINDOW_ORDER), st.integers(1, 10**12), min_size=1),
       st.floats(1e9, 2e9), st.data())
def test_the_headers_made_for_a_plan_are_the_plain_ones(limits, now, data):
    plan = RateLimiter().plan(limits)
    values = []
    for _, limit, seconds in plan:
        values += [data.draw(st.integers(0, limit)), data.draw(st.floats(now - 10, now + seconds))]
    decision = Decision(plan, values)
    plain = reference_headers(plan, values, now)
    assert rate_limit_headers(decision, now) == plain
    assert rate_limit_headers(decision, now, encoded=True) == [      # as ASGI sends them
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in plain]


def test_a_plan_with_a_window_of_another_name_is_refused():
    with pytest.raises(ValueError, match="not a rate-limit window"):
        header_builder((("week'); import os; ('", 5, 604800),))
