import json

import pytest

from api_token_exporter.web.server import create_app
from support import sample_total, samples

INGEST = {"Authorization": "Bearer ingest-secret"}


@pytest.fixture
def exporter(keys):
    app = create_app(keys_file=keys[0], ingest_token="ingest-secret", admin_token="admin-secret")
    from werkzeug.test import Client
    return Client(app)


def post(exporter, body, headers=INGEST, raw=None):
    data = raw if raw is not None else json.dumps(body)
    return exporter.post("/v1/events", data=data, headers={**headers, "Content-Type": "application/json"})


def metrics(exporter):
    return exporter.get("/metrics").get_data(as_text=True)


def test_mixed_batch_keeps_the_good_events_and_explains_the_bad(exporter, keys):
    events = [
        {"token": "alpha", "route": "/orders/{id}", "method": "GET", "status": 200, "duration_seconds": 0.25},
        {"token": "alpha", "route": "/orders", "method": "post", "status": 201, "duration_ms": 40,
         "llm": {"service": "OpenAI", "model": "gpt-4", "input_tokens": 100, "output_tokens": 50}},
        {"api_key": keys[1]["beta"], "route": "/orders", "status": 503, "duration_seconds": 1.5},
        {"token": "alpha", "route": "/orders", "status": 999, "duration_seconds": 0.1},
        {"token": "nobody", "route": "/orders", "status": 200, "duration_seconds": 0.1},
        {"token": "alpha", "route": "orders", "status": 200, "duration_seconds": -1},
        {"token": "alpha", "route": "/x", "status": 200, "duration_seconds": 0.1,
         "llm": {"service": "openai", "model": "gpt-4", "input_tokens": -5, "output_tokens": "many"}},
        {"api_key": "atk_leaked_secret_value", "route": "/x", "status": 200, "duration_seconds": 0.1},
        "not an object",
    ]
    r = post(exporter, {"events": events})
    assert r.status_code == 200
    body = r.get_json()
    assert body["accepted"] == 3 and body["rejected"] == 6
    errors = {e["index"]: e["errors"] for e in body["errors"]}
    assert errors[3] == ["status must be an HTTP status code from 100 to 599"]
    assert errors[4] == ["token is not a key id in the key store"]      # never echoed
    assert any("route must be a path template" in e for e in errors[5])
    assert any("duration_seconds" in e for e in errors[5])
    assert errors[6] == ["llm: input_tokens must not be negative"]
    assert errors[7] == ["api_key is not a known key"]
    assert errors[8] == ["event must be a JSON object"]
    assert "atk_leaked_secret_value" not in r.get_data(as_text=True)

    text = metrics(exporter)
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/orders/{id}", code="200") == 1
    assert sample_total(text, "apitoken_requests_total", token="alpha", route="/orders", method="POST") == 1
    assert sample_total(text, "apitoken_requests_total", token="beta", code="503") == 1
    assert sample_total(text, "apitoken_requests_total") == 3
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service="openai",
                        model="gpt-4", type="input") == 100
    assert sample_total(text, "apitoken_llm_tokens_total", type="output") == 50
    assert sample_total(text, "apitoken_request_duration_seconds_sum", token="beta") == 1.5
    assert sample_total(text, "apitoken_ingest_events_total", result="accepted") == 3
    assert sample_total(text, "apitoken_ingest_events_total", result="rejected") == 6


def test_a_batch_of_only_bad_events_is_a_400(exporter):
    r = post(exporter, [{"token": "alpha"}])
    assert r.status_code == 400
    assert r.get_json()["accepted"] == 0


def test_bad_json_says_so(exporter):
    r = post(exporter, None, raw="{not json")
    assert r.status_code == 400
    assert r.get_json()["detail"].startswith("Body is not valid JSON")
    r = post(exporter, {"events": "nope"})
    assert r.status_code == 400 and "events" in r.get_json()["detail"]


def test_ingest_needs_the_secret(exporter):
    assert post(exporter, {"events": []}, headers={}).status_code == 401
    assert post(exporter, {"events": []}, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_batch_and_body_limits(keys):
    from werkzeug.test import Client
    client = Client(create_app(keys_file=keys[0], ingest_token="ingest-secret",
                               ingest_max_events=2, ingest_max_bytes=2000))
    event = {"token": "alpha", "route": "/a", "status": 200, "duration_seconds": 0.1}
    r = post(client, {"events": [event] * 3})
    assert r.status_code == 413 and "At most 2 events" in r.get_json()["detail"]
    r = post(client, None, raw=json.dumps({"events": [event], "pad": "x" * 5000}))
    assert r.status_code == 413


def test_unknown_tokens_only_when_allowed_and_then_capped(keys):
    from werkzeug.test import Client
    client = Client(create_app(keys_file=keys[0], ingest_token="ingest-secret",
                               ingest_allow_unknown_tokens=True, max_tokens=9))   # 6 keys + 3
    events = [{"token": f"svc-{i}", "route": "/a", "status": 200, "duration_seconds": 0.01}
              for i in range(10)]
    assert post(client, {"events": events}).get_json()["accepted"] == 10
    text = metrics(client)
    tokens = {dict(l)["token"] for l in
              samples(text, "apitoken_requests_total")}
    assert tokens == {"svc-0", "svc-1", "svc-2", "__overflow__"}
    assert sample_total(text, "apitoken_requests_total", token="__overflow__") == 7
    assert sample_total(text, "apitoken_label_overflow_total", label="token") == 7


def test_runbooks_page_has_every_alert_link_anchor(exporter):
    import re
    import yaml
    from devstack.stack import ROOT
    r = exporter.get("/runbooks")
    assert r.status_code == 200 and r.content_type.startswith("text/html")
    page = r.get_data(as_text=True)
    rules = yaml.safe_load(open(f"{ROOT}/prometheus/rules/apitoken-alerts.yml"))
    links = [rule["annotations"]["runbook_url"] for g in rules["groups"] for rule in g["rules"]]
    assert len(links) > 15
    for link in links:
        assert link.startswith("http://localhost:9464/runbooks#"), link
        assert f'<a id="{link.split("#")[1]}">' in page, link
    assert "<script" not in page and re.search(r"&lt;|&gt;|&amp;", page)   # the text is escaped


def test_healthz(exporter):
    r = exporter.get("/healthz")
    assert r.status_code == 200 and r.get_json()["status"] == "ok" and r.get_json()["keys"] == 6
    assert exporter.get("/anything-else").status_code == 404


def test_llm_details_are_parts_of_the_totals_and_null_means_none(exporter):
    events = [
        {"token": "alpha", "route": "/chat", "status": 200, "duration_ms": 5,
         "llm": {"service": "openai", "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300,
                 "cached_input_tokens": 1024, "reasoning_tokens": None, "cache_write_tokens": None}},
        {"token": "alpha", "route": "/chat", "status": 200, "duration_ms": 5,
         "llm": {"service": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 10, "output_tokens": 5,
                 "cached_input_tokens": 8, "cache_write_tokens": 8}},
        {"token": "alpha", "route": "/chat", "status": 200, "duration_ms": 5,
         "llm": {"service": "openai", "model": "o3", "input_tokens": 10, "output_tokens": 5,
                 "reasoning_tokens": ""}},
    ]
    body = post(exporter, {"events": events}).get_json()
    assert body["accepted"] == 1 and body["rejected"] == 2
    errors = {e["index"]: e["errors"] for e in body["errors"]}
    assert "is more than input_tokens (10)" in errors[1][0]
    assert errors[2] == ["llm: reasoning_tokens must be a number"]
    text = metrics(exporter)
    assert sample_total(text, "apitoken_llm_tokens_total", type="cached_input") == 1024
    assert sample_total(text, "apitoken_llm_tokens_total", type="input") == 176
    assert sample_total(text, "apitoken_llm_tokens_total") == 1500
