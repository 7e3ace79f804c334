import pytest
from flask import Flask, jsonify, request

from api_token_exporter import TokenAnalytics, UsageError, current_token, record_llm_usage
from support import BufferedClient, sample_total


@pytest.fixture
def llm_client(keys):
    app = Flask("llm")
    app.test_client_class = BufferedClient

    @app.post("/chat")
    def chat():
        body = request.get_json()
        try:
            record_llm_usage(body["service"], body["model"], body["input"], body["output"])
        except UsageError as exc:
            return jsonify(detail=str(exc)), 400
        return jsonify(token=current_token())

    TokenAnalytics(app, keys_file=keys[0], metrics_public=True)
    return app.test_client()


def chat(client, raw, **body):
    return client.post("/chat", json=body, headers={"X-API-Key": raw})


def test_handlers_record_usage_for_the_requests_token(llm_client, keys):
    r = chat(llm_client, keys[1]["alpha"], service="Anthropic", model="claude-3-opus", input=120, output=30)
    assert r.get_json() == {"token": "alpha"}
    chat(llm_client, keys[1]["alpha"], service="anthropic", model="claude-3-opus", input=1, output=2)
    text = llm_client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", service="anthropic",
                        model="claude-3-opus", type="input") == 121
    assert sample_total(text, "apitoken_llm_tokens_total", type="output") == 32
    assert sample_total(text, "apitoken_llm_requests_total", token="alpha") == 2


@pytest.mark.parametrize("inp,out,reason", [
    (-1, 5, "input_tokens must not be negative"),
    (5, "12", "output_tokens must be a number"),
    (10**12, 1, "at most 10,000,000"),
    (1.5, 1, "must be a whole number"),
    (True, 1, "must be a number"),
])
def test_bad_values_are_refused_and_do_not_corrupt_totals(llm_client, keys, inp, out, reason):
    chat(llm_client, keys[1]["alpha"], service="openai", model="gpt-4", input=10, output=10)
    r = chat(llm_client, keys[1]["alpha"], service="openai", model="gpt-4", input=inp, output=out)
    assert r.status_code == 400 and reason in r.get_json()["detail"]
    text = llm_client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_llm_tokens_total", type="input") == 10
    assert sample_total(text, "apitoken_llm_tokens_total", type="output") == 10


def test_bad_model_name_is_refused(llm_client, keys):
    r = chat(llm_client, keys[1]["alpha"], service="openai", model="", input=1, output=1)
    assert r.status_code == 400 and "model must be" in r.get_json()["detail"]


def test_outside_a_request_is_a_clear_error():
    with pytest.raises(RuntimeError, match="outside a request"):
        record_llm_usage("openai", "gpt-4", 1, 1)


def test_record_llm_usage_inside_a_streamed_body(keys):
    """The generator runs after the handler returned, while the server sends the body."""
    app = Flask("stream")
    app.test_client_class = BufferedClient
    seen = []

    @app.get("/stream")
    def stream():
        def body():
            yield "data: one\n\n"
            seen.append(current_token())
            record_llm_usage("openai", "gpt-4", 7, 11)
            yield "data: done\n\n"
        return app.response_class(body(), mimetype="text/event-stream")

    analytics = TokenAnalytics(app, keys_file=keys[0], metrics_bearer_token="m")
    client = app.test_client()
    r = client.get("/stream", headers={"X-API-Key": keys[1]["alpha"]})
    assert r.status_code == 200 and r.get_data(as_text=True).endswith("done\n\n")
    assert seen == ["alpha"]
    text = analytics.view.render()[0].decode()
    assert sample_total(text, "apitoken_llm_tokens_total", token="alpha", type="output") == 11
    assert sample_total(text, "apitoken_requests_total", token="alpha", code="200") == 1


def test_a_sized_body_is_counted_before_its_last_chunk_is_sent(keys):
    """A client that has the whole response and scrapes at once must find it counted."""
    app = Flask("sized")
    analytics = TokenAnalytics(app, keys_file=keys[0])

    @app.get("/two")
    def two():
        return app.response_class(iter([b"ab", b"cd"]), headers={"Content-Length": "4"})

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/two", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "HTTP_X_API_KEY": keys[1]["alpha"], "wsgi.input": None}
    body = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    counted = []
    for chunk in body:
        counted.append(sample_total(analytics.view.render()[0].decode(), "apitoken_requests_total",
                                    token="alpha"))
    body.close()
    assert counted == [0, 1]                 # counted as the last chunk goes out, not after close()


# -- the capture's pre-check: a body without a usage key is not parsed, and nothing is lost by it
def _usage_documents():
    from hypothesis import strategies as st
    numbers = st.integers(min_value=0, max_value=10**6)
    usage = st.fixed_dictionaries({}, optional={
        "prompt_tokens": numbers, "completion_tokens": numbers, "input_tokens": numbers,
        "output_tokens": numbers, "cache_read_input_tokens": numbers,
        "billed_units": st.fixed_dictionaries({"input_tokens": numbers, "output_tokens": numbers})})
    return st.fixed_dictionaries({}, optional={
        "usage": usage, "model": st.sampled_from(["gpt-4o", "claude-3-5-sonnet", "command-r"]),
        "meta": st.fixed_dictionaries({}, optional={"billed_units": st.fixed_dictionaries(
            {"input_tokens": numbers, "output_tokens": numbers})}),
        "object": st.sampled_from(["response", "chat.completion"]),
        "id": st.text(max_size=8), "choices": st.lists(st.text(max_size=8), max_size=2)})


def test_the_usage_pre_check_never_changes_what_a_body_reports():
    """extract_usage skips the parse of a body with no usage key in it: for any document, with
    keys written plainly or as \\u escapes, it finds what the full parse finds (a key no reader
    looks at, naming usage, forces the parse)."""
    import json
    import re
    from hypothesis import given, settings, strategies as st
    from api_token_exporter.core.llmcapture import extract_usage

    def escaped(text: str) -> str:          # every key's letters as \\u escapes
        return re.sub(r'"([a-z_]+)":', lambda m: '"' + "".join(f"\\u{ord(c):04x}" for c in m.group(1)) + '":', text)

    @settings(max_examples=300, deadline=None)
    @given(_usage_documents(), st.booleans(), st.sampled_from(["application/json", "text/event-stream"]))
    def check(doc, escape, content_type):
        text = json.dumps(doc)
        forced = json.dumps({**doc, "x_usage_marker": 0})
        if content_type == "text/event-stream":
            text, forced = f"data: {text}\n\n", f"data: {forced}\n\n"
        if escape:
            text, forced = escaped(text), escaped(forced)
        assert extract_usage(content_type, text.encode()) == extract_usage(content_type, forced.encode())

    check()
    assert extract_usage("application/json", b'{"\\u0075sage": {"prompt_tokens": 3, "completion_tokens": 4}}')
    assert extract_usage("application/json", b'{"id": 7}') is None
    assert extract_usage("text/html", b'{"usage": {"prompt_tokens": 3}}') is None
