"""Several workers (gunicorn, 4 sync workers, prometheus_client multiprocess mode) and a real
redis-server: totals on /metrics equal what was sent, and limits hold across workers."""
import collections
import concurrent.futures

import pytest
import requests

from support import samples, sample_total

pytestmark = pytest.mark.integration
DEMO = "devstack.demo:app_from_env()"


def send(url, key, path="/api/v1/items", method="GET", **kw):
    headers = {"X-API-Key": key} if key else {}
    return requests.request(method, url + path, headers=headers, timeout=10, **kw)


def test_exact_totals_under_gunicorn_with_4_workers(gunicorn_app, keys):
    # memory:// limits are per worker, so alpha's 200 requests may meet a 429 in a busy worker:
    # counted like any other answer; the LLM call goes through a key that is never limited
    from api_token_exporter.core.keystore import add_key
    chatter = add_key(keys[0], "chatter", rate_limits={"minute": 10**6, "hour": 10**6, "day": 10**6})
    url = gunicorn_app(DEMO, workers=4, keys_file=keys[0])
    plan = [("alpha", "/api/v1/items")] * 150 + [("alpha", "/api/v1/items/7")] * 50 + \
           [("gamma", "/api/v1/items")] * 4 + [("beta", "/api/v1/items")] * 3 + \
           [(None, "/api/v1/items")] * 20 + [("bogus", "/api/v1/items")] * 20
    raw = dict(keys[1], bogus="atk_definitely_not_a_key")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: send(url, raw.get(p[0]) if p[0] else None, p[1]), plan))
    sent = collections.Counter()
    for (token, _), r in zip(plan, responses):
        label = token if token in ("alpha", "gamma", "beta") else "__unauthenticated__"
        sent[(label, str(r.status_code))] += 1
    chat = send(url, chatter, "/api/v1/chat", "POST", json={"model": "gpt-4o"})
    assert chat.status_code == 200
    sent[("chatter", "200")] += 1
    usage = chat.json()["usage"]

    text = requests.get(url + "/metrics", timeout=10).text
    for (label, code), n in sent.items():
        assert sample_total(text, "apitoken_requests_total", token=label, code=code) == n, (label, code)
    assert sample_total(text, "apitoken_requests_total", token="alpha") == 200
    assert sample_total(text, "apitoken_requests_total") == len(plan) + 1
    assert sample_total(text, "apitoken_request_duration_seconds_count") == len(plan) + 1
    assert sample_total(text, "apitoken_auth_failures_total", reason="missing") == 20
    assert sample_total(text, "apitoken_auth_failures_total", reason="invalid") == 20
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter", type="input") == \
        usage["prompt_tokens"] - cached
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter", type="cached_input") == cached > 0
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter") == usage["total_tokens"]
    assert sample_total(text, "apitoken_llm_tokens_total", token="chatter", type="output") == usage["completion_tokens"]
    # gauges are not summed across workers: one token info line, one status per token
    assert sample_total(text, "apitoken_token_info", token="alpha") == 1
    status = [v for l, v in samples(text, "apitoken_token_status").items() if dict(l)["token"] == "alpha"]
    assert len(status) == 1 and status[0] in (0, 1)        # active, or rate_limited by a worker's window
    # alpha has no limit of its own: the default applies, and its remaining is below it
    assert sample_total(text, "apitoken_rate_limit_limit", token="alpha") == 0
    assert sample_total(text, "apitoken_rate_limit_default_limit", window="minute") == 100
    assert 0 <= sample_total(text, "apitoken_rate_limit_remaining", token="alpha", window="minute") < 100


def test_redis_limits_hold_across_4_workers_and_two_instances(gunicorn_app, keys, redis_uri):
    one = gunicorn_app(DEMO, workers=4, keys_file=keys[0], storage_uri=redis_uri)
    two = gunicorn_app(DEMO, workers=2, keys_file=keys[0], storage_uri=redis_uri)
    beta = keys[1]["beta"]                # 3 per minute
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: send(one if i % 2 else two, beta).status_code, range(12)))
    assert codes.count(200) == 3 and codes.count(429) == 9
    gamma = keys[1]["gamma"]              # 4 per hour
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: send(one if i % 3 else two, gamma).status_code, range(10)))
    assert codes.count(200) == 4 and codes.count(429) == 6
    refused = send(one, gamma)
    assert refused.json()["detail"].startswith("Rate limit exceeded for hour")
    total_429 = sum(sample_total(requests.get(u + "/metrics", timeout=10).text,
                                 "apitoken_rate_limited_total", token="beta") for u in (one, two))
    assert total_429 == 9
