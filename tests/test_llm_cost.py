import pytest
from flask import Flask, Response, jsonify

from api_token_exporter import TokenAnalytics, record_llm_usage
from api_token_exporter.keystore import add_key
from api_token_exporter.pricing import Pricing, PricingError
from conftest import BufferedClient, sample_total


def test_shipped_prices_are_seed_004s():
    p = Pricing.load()
    per_million = {("anthropic", "claude-3-5-sonnet"): 3.0, ("anthropic", "claude-3-opus"): 15.0,
                   ("openai", "gpt-4"): 30.0, ("openai", "gpt-4-turbo"): 10.0,
                   ("openai", "gpt-3.5-turbo"): 0.5}
    for (service, model), usd in per_million.items():
        assert p.price(service, model).input == usd and p.price(service, model).output == usd
    assert p.price("cohere", "command-r") is not None
    assert p.default is None


def test_dated_model_names_take_the_longest_listed_prefix():
    p = Pricing.load()
    assert p.price("openai", "gpt-4-turbo-2024-04-09").input == 10.0
    assert p.price("openai", "gpt-4-0613").input == 30.0
    assert p.price("anthropic", "claude-3-5-sonnet-20240620").input == 3.0
    assert p.price("openai", "gpt-4o") is None          # not a "-" boundary: not gpt-4
    assert p.price("openai", "mystery") is None


def test_a_bad_pricing_file_says_where(tmp_path):
    f = tmp_path / "p.yml"
    f.write_text("services:\n  openai:\n    gpt-4: {input: -1, output: 2}\n")
    with pytest.raises(PricingError, match=r"services.openai.gpt-4.input"):
        Pricing.load(str(f))


@pytest.fixture
def llm_app(keys):
    def build(**settings):
        app = Flask("llm-cost")
        app.test_client_class = BufferedClient

        @app.post("/record/<service>/<model>/<int:inp>/<int:out>")
        def record(service, model, inp, out):
            record_llm_usage(service, model, inp, out)
            return jsonify(ok=True)

        @app.get("/openai")
        def openai():
            return jsonify(model="gpt-4", usage={"prompt_tokens": 1000, "completion_tokens": 500,
                                                 "total_tokens": 1500})

        @app.get("/anthropic")
        def anthropic():
            return jsonify(type="message", model="claude-3-opus-20240229",
                           usage={"input_tokens": 200, "output_tokens": 100})

        @app.get("/cohere-v1")
        def cohere_v1():
            return jsonify(text="hi", meta={"billed_units": {"input_tokens": 40, "output_tokens": 60}}), \
                200, {"X-LLM-Model": "command-r"}

        @app.get("/cohere-v2")
        def cohere_v2():
            return jsonify(message={}, usage={"billed_units": {"input_tokens": 4, "output_tokens": 6},
                                              "tokens": {"input_tokens": 9, "output_tokens": 6}})

        @app.get("/openai-stream")
        def openai_stream():
            def events():
                yield 'data: {"model": "gpt-3.5-turbo", "choices": [{"delta": {"content": "Hel"}}]}\n\n'
                yield 'data: {"model": "gpt-3.5-turbo", "choices": [{"delta": {"content": "lo"}}]}\n\n'
                yield ('data: {"model": "gpt-3.5-turbo", "choices": [], '
                       '"usage": {"prompt_tokens": 11, "completion_tokens": 22}}\n\n')
                yield "data: [DONE]\n\n"
            return Response(events(), content_type="text/event-stream")

        @app.get("/anthropic-stream")
        def anthropic_stream():
            def events():
                yield ('event: message_start\ndata: {"type": "message_start", "message": {"model": '
                       '"claude-3-5-sonnet-20240620", "usage": {"input_tokens": 25, "output_tokens": 1}}}\n\n')
                yield 'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
                yield 'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 15}}\n\n'
            return Response(events(), content_type="text/event-stream")

        @app.get("/both")
        def both():          # reported by the handler and in the body: counted once
            record_llm_usage("openai", "gpt-4", 7, 3)
            return jsonify(model="gpt-4", usage={"prompt_tokens": 7, "completion_tokens": 3})

        @app.get("/bogus")
        def bogus():
            return jsonify(model="gpt-4", usage={"prompt_tokens": -5, "completion_tokens": 3})

        TokenAnalytics(app, keys_file=keys[0], metrics_public=True, **settings)
        return app.test_client()
    return build


def metrics(client):
    return client.get("/metrics").get_data(as_text=True)


def test_cost_from_the_public_call(llm_app, keys):
    client = llm_app()
    h = {"X-API-Key": keys[1]["alpha"]}
    client.post("/record/openai/gpt-4/1000/500", headers=h)
    client.post("/record/anthropic/claude-3-5-sonnet/2000000/1000000", headers=h)
    text = metrics(client)
    assert sample_total(text, "apitoken_llm_cost_usd_total", token="alpha", model="gpt-4") == pytest.approx(0.045)
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="claude-3-5-sonnet") == pytest.approx(9.0)


def test_unpriced_model_is_counted_never_priced_at_zero(llm_app, keys):
    client = llm_app()
    h = {"X-API-Key": keys[1]["alpha"]}
    client.post("/record/openai/gpt-9-preview/100/100", headers=h)
    client.post("/record/openai/gpt-9-preview/100/100", headers=h)
    text = metrics(client)
    assert sample_total(text, "apitoken_llm_unpriced_requests_total", service="openai", model="gpt-9-preview") == 2
    assert sample_total(text, "apitoken_llm_tokens_total", model="gpt-9-preview") == 400
    assert 'apitoken_llm_cost_usd_total{model="gpt-9-preview"' not in text


def test_custom_pricing_file_with_a_default(llm_app, keys, tmp_path):
    f = tmp_path / "prices.yml"
    f.write_text("default: {input: 3, output: 3}\nservices:\n  openai:\n    gpt-4: {input: 1, output: 2}\n")
    client = llm_app(pricing_file=str(f))
    h = {"X-API-Key": keys[1]["alpha"]}
    client.post("/record/openai/gpt-4/1000000/1000000", headers=h)
    client.post("/record/openai/other/1000000/0", headers=h)
    text = metrics(client)
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="gpt-4") == 3.0
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="other") == 3.0


def test_capture_from_every_response_shape(llm_app, keys):
    client = llm_app(capture_llm_usage=True)
    h = {"X-API-Key": keys[1]["alpha"]}
    for path in ("/openai", "/anthropic", "/cohere-v1", "/cohere-v2", "/openai-stream",
                 "/anthropic-stream", "/both"):
        assert client.get(path, headers=h).status_code == 200
    text = metrics(client)

    def tokens(service, model, kind):
        return sample_total(text, "apitoken_llm_tokens_total", service=service, model=model, type=kind)

    assert (tokens("openai", "gpt-4", "input"), tokens("openai", "gpt-4", "output")) == (1007, 503)
    assert (tokens("anthropic", "claude-3-opus-20240229", "input"),
            tokens("anthropic", "claude-3-opus-20240229", "output")) == (200, 100)
    assert (tokens("cohere", "command-r", "input"), tokens("cohere", "command-r", "output")) == (40, 60)
    assert (tokens("cohere", "unknown", "input"), tokens("cohere", "unknown", "output")) == (4, 6)
    assert (tokens("openai", "gpt-3.5-turbo", "input"), tokens("openai", "gpt-3.5-turbo", "output")) == (11, 22)
    assert (tokens("anthropic", "claude-3-5-sonnet-20240620", "input"),
            tokens("anthropic", "claude-3-5-sonnet-20240620", "output")) == (25, 15)
    assert sample_total(text, "apitoken_llm_requests_total", model="gpt-4") == 2      # /openai and /both
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="claude-3-opus-20240229") == \
        pytest.approx(300 * 15 / 1e6)
    assert sample_total(text, "apitoken_llm_unpriced_requests_total", service="cohere", model="unknown") == 1


def test_bad_values_in_a_response_are_refused_and_logged(llm_app, keys, caplog):
    client = llm_app(capture_llm_usage=True)
    client.get("/openai", headers={"X-API-Key": keys[1]["alpha"]})
    client.get("/bogus", headers={"X-API-Key": keys[1]["alpha"]})
    text = metrics(client)
    assert sample_total(text, "apitoken_llm_tokens_total", type="input") == 1000
    assert sample_total(text, "apitoken_llm_requests_total") == 1
    assert "input_tokens must not be negative" in caplog.text


def test_capture_is_off_by_default(llm_app, keys):
    client = llm_app()
    client.get("/openai", headers={"X-API-Key": keys[1]["alpha"]})
    assert sample_total(metrics(client), "apitoken_llm_tokens_total") == 0


def test_budgets_are_exported_from_the_key_file(tmp_path):
    keys_file = str(tmp_path / "k.yml")
    add_key(keys_file, "spender", budget_usd={"daily": 5, "monthly": 100.5})
    add_key(keys_file, "free")
    app = Flask("b")
    TokenAnalytics(app, keys_file=keys_file, metrics_public=True)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_budget_usd", token="spender", period="daily") == 5
    assert sample_total(text, "apitoken_budget_usd", token="spender", period="monthly") == 100.5
    assert sample_total(text, "apitoken_budget_usd", token="free") == 0
