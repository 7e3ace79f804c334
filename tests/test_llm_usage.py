import pytest
from flask import Flask, jsonify, request

from api_token_exporter import TokenAnalytics, UsageError, current_token, record_llm_usage
from conftest import BufferedClient, sample_total


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

    TokenAnalytics(app, keys_file=keys[0])
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
    (10**12, 1, "larger than 10,000,000"),
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
