import datetime as dt
import json

import pytest
from flask import Flask, Response, jsonify

from api_token_exporter import TokenAnalytics, record_llm_usage
from api_token_exporter.core import price_snapshot
from api_token_exporter.core.keystore import add_key
from api_token_exporter.core.pricing import Pricing, PricingError
from api_token_exporter.core.usage import UsageError, validate_usage
from support import BufferedClient, sample_total

with open(price_snapshot.DEFAULT_SNAPSHOT_FILE, encoding="utf-8") as _fh:
    SNAPSHOT = json.load(_fh)          # the shipped table, read as data: the oracle for costs


def snapshot_cost(service, model, **tokens):
    """USD for disjoint token counts (input, cached_input, cache_write, output, reasoning) at the
    snapshot's prices, a missing cache or reasoning price being the input or output one."""
    price = SNAPSHOT["services"][service][model]
    fallback = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}
    return sum(n * price.get(kind, price.get(fallback.get(kind, kind))) for kind, n in tokens.items()) / 1e6


def test_the_shipped_prices_are_litellms_snapshot():
    p = Pricing.load()
    assert p.version.startswith("litellm ") and len(SNAPSHOT["source_sha256"]) == 64
    assert sum(len(models) for models in SNAPSHOT["services"].values()) > 3000
    assert {"openai", "anthropic", "cohere", "gemini", "mistral", "bedrock", "azure"} <= set(SNAPSHOT["services"])
    gpt4o, sonnet = p.price("openai", "gpt-4o"), p.price("anthropic", "claude-sonnet-4-5")
    assert (gpt4o.input, gpt4o.output, gpt4o.cached_input) == (2.5, 10.0, 1.25)
    assert (sonnet.input, sonnet.output, sonnet.cached_input, sonnet.cache_write) == (3.0, 15.0, 0.3, 3.75)
    assert p.default is None and p.source("openai", "gpt-4o") == "snapshot"
    assert p.tables[0] == {}                            # the packaged pricing file lists none


def test_the_shipped_snapshot_is_as_prices_update_writes_it(tmp_path):
    price_snapshot.write(SNAPSHOT, str(tmp_path / "again.json"))
    with open(price_snapshot.DEFAULT_SNAPSHOT_FILE, encoding="utf-8") as fh:
        assert (tmp_path / "again.json").read_text() == fh.read()
    for service, models in SNAPSHOT["services"].items():
        assert service == price_snapshot.service_name(service), service
        for model, price in models.items():
            assert {"input", "output"} <= set(price) <= set(price_snapshot.FIELDS), (service, model)


def test_the_users_file_wins_and_the_snapshot_matches_releases_only(tmp_path):
    p = Pricing.load()
    assert p.price("openai", "gpt-4o-2099-01-01") == p.price("openai", "gpt-4o")   # a new dated release
    assert p.price("anthropic", "claude-sonnet-4-5-20991231") == p.price("anthropic", "claude-sonnet-4-5")
    assert p.price("openai", "gpt-4o-mini") != p.price("openai", "gpt-4o")
    for other in ("gpt-4-my-finetune", "gpt-5-ultra", "gpt-4o-realtime-preview-2099", "mystery"):
        assert p.price("openai", other) is None and p.source("openai", other) == "none", other
    f = tmp_path / "p.yml"
    f.write_text("services:\n  openai:\n    gpt-4o: {input: 1, output: 2}\n"
                 "  anthropic:\n    claude-sonnet-4-5: {input: 1, output: 1}\n")
    mine = Pricing.load(str(f))
    assert (mine.price("openai", "gpt-4o").input, mine.source("openai", "gpt-4o")) == (1, "pricing file")
    # the dated names the APIs answer with are listed in the snapshot, yet the user's entry wins
    assert mine.price("openai", "gpt-4o-2024-08-06").input == 1 and p.source("openai", "gpt-4o-2024-08-06") == "snapshot"
    assert mine.source("anthropic", "claude-sonnet-4-5-20250929") == "pricing file"
    assert mine.price("openai", "gpt-4o-mini").input == 1                  # the user's rule: any "-" suffix
    assert mine.checksum != p.checksum and mine.version == p.version


def test_a_bad_pricing_file_says_where(tmp_path):
    f = tmp_path / "p.yml"
    f.write_text("services:\n  openai:\n    gpt-4: {input: -1, output: 2}\n")
    with pytest.raises(PricingError, match=r"services.openai.gpt-4.input"):
        Pricing.load(str(f))
    f.write_text("services:\n  openai:\n    gpt-4: {input: 1, output: 2, cache: 3}\n")
    with pytest.raises(PricingError, match=r"services.openai.gpt-4: expected .*cached_input, cache_write"):
        Pricing.load(str(f))


def test_cache_and_reasoning_tokens_are_parts_of_the_totals():
    usage = validate_usage("openai", "o3", 1000, 500, cached_input_tokens=600, reasoning_tokens=200)
    assert usage.parts() == {"input": 400, "cached_input": 600, "cache_write": 0, "output": 300, "reasoning": 200}
    with pytest.raises(UsageError, match=r"cached_input_tokens \+ cache_write_tokens \(1100\) is more than "
                                         r"input_tokens \(1000\)"):
        validate_usage("anthropic", "claude-sonnet-4-5", 1000, 5, cached_input_tokens=900, cache_write_tokens=200)
    with pytest.raises(UsageError, match=r"reasoning_tokens \(6\) is more than output_tokens \(5\)"):
        validate_usage("openai", "o3", 10, 5, reasoning_tokens=6)


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
            return jsonify(type="message", model="claude-opus-4-5-20251101",
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

        @app.get("/openai-cached")
        def openai_cached():
            return jsonify(model="o3", usage={"prompt_tokens": 1000, "completion_tokens": 500,
                                              "prompt_tokens_details": {"cached_tokens": 600},
                                              "completion_tokens_details": {"reasoning_tokens": 200}})

        @app.get("/openai-responses")
        def openai_responses():
            return jsonify(object="response", model="gpt-4o", usage={
                "input_tokens": 300, "output_tokens": 40, "input_tokens_details": {"cached_tokens": 100},
                "output_tokens_details": {"reasoning_tokens": 0}})

        @app.get("/openai-responses-stream")
        def openai_responses_stream():
            def events():
                yield 'event: response.created\ndata: {"type": "response.created", "response": {"model": "gpt-4o-mini"}}\n\n'
                yield ('event: response.completed\ndata: {"type": "response.completed", "response": {"model": '
                       '"gpt-4o-mini", "usage": {"input_tokens": 70, "output_tokens": 9, '
                       '"input_tokens_details": {"cached_tokens": 64}}}}\n\n')
            return Response(events(), content_type="text/event-stream")

        @app.get("/anthropic-cached")
        def anthropic_cached():
            return jsonify(type="message", model="claude-sonnet-4-5-20250929", usage={
                "input_tokens": 50, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
                "output_tokens": 100})

        @app.get("/anthropic-cached-stream")
        def anthropic_cached_stream():
            def events():          # message_delta's usage is cumulative; null means unchanged
                yield ('event: message_start\ndata: {"type": "message_start", "message": {"model": '
                       '"claude-haiku-4-5", "usage": {"input_tokens": 8, "cache_read_input_tokens": 3000, '
                       '"cache_creation_input_tokens": 0, "output_tokens": 1}}}\n\n')
                yield ('event: message_delta\ndata: {"type": "message_delta", "usage": {"input_tokens": null, '
                       '"cache_read_input_tokens": null, "output_tokens": 40}}\n\n')
                yield 'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 77}}\n\n'
            return Response(events(), content_type="text/event-stream")

        @app.get("/openai-responses-incomplete")
        def openai_responses_incomplete():
            def events():          # cut off by max_output_tokens: still billed
                yield ('event: response.incomplete\ndata: {"type": "response.incomplete", "response": {"model": '
                       '"o3", "usage": {"input_tokens": 20, "output_tokens": 500, '
                       '"output_tokens_details": {"reasoning_tokens": 480}}}}\n\n')
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
    client.post("/record/openai/gpt-4o/1000/500", headers=h)
    client.post("/record/anthropic/claude-sonnet-4-5/2000000/1000000", headers=h)
    text = metrics(client)
    assert sample_total(text, "apitoken_llm_cost_usd_total", token="alpha", model="gpt-4o") == \
        pytest.approx(snapshot_cost("openai", "gpt-4o", input=1000, output=500))
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="claude-sonnet-4-5") == \
        pytest.approx(snapshot_cost("anthropic", "claude-sonnet-4-5", input=2_000_000, output=1_000_000))


def test_cached_and_reasoning_tokens_are_priced_at_the_snapshots_cache_rates(llm_app, keys):
    client = llm_app(capture_llm_usage=True)
    h = {"X-API-Key": keys[1]["alpha"]}
    for path in ("/openai-cached", "/openai-responses", "/openai-responses-stream", "/anthropic-cached",
                 "/anthropic-cached-stream", "/openai-responses-incomplete"):
        assert client.get(path, headers=h).status_code == 200
    text = metrics(client)

    def tokens(model):
        return {kind: sample_total(text, "apitoken_llm_tokens_total", model=model, type=kind)
                for kind in ("input", "cached_input", "cache_write", "output", "reasoning")}

    def cost(model):
        return sample_total(text, "apitoken_llm_cost_usd_total", model=model)

    expected = {   # model: (snapshot entry, disjoint tokens)
        "o3": (("openai", "o3"), dict(input=420, cached_input=600, output=320, reasoning=680)),
        "gpt-4o": (("openai", "gpt-4o"), dict(input=200, cached_input=100, output=40)),
        "gpt-4o-mini": (("openai", "gpt-4o-mini"), dict(input=6, cached_input=64, output=9)),
        "claude-sonnet-4-5-20250929": (("anthropic", "claude-sonnet-4-5-20250929"),
                                       dict(input=50, cached_input=1000, cache_write=200, output=100)),
        "claude-haiku-4-5": (("anthropic", "claude-haiku-4-5"), dict(input=8, cached_input=3000, output=77)),
    }
    for model, (entry, parts) in expected.items():
        assert tokens(model) == {k: parts.get(k, 0) for k in tokens(model)}, model
        assert cost(model) == pytest.approx(snapshot_cost(*entry, **parts), rel=1e-6), model
        # and not as if every prompt token were a full input token
        prompt = parts["input"] + parts["cached_input"] + parts.get("cache_write", 0)
        answer = parts["output"] + parts.get("reasoning", 0)
        assert cost(model) != pytest.approx(snapshot_cost(*entry, input=prompt, output=answer), rel=1e-3), model
    assert sample_total(text, "apitoken_llm_requests_total") == 6


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
    assert (tokens("anthropic", "claude-opus-4-5-20251101", "input"),
            tokens("anthropic", "claude-opus-4-5-20251101", "output")) == (200, 100)
    assert (tokens("cohere", "command-r", "input"), tokens("cohere", "command-r", "output")) == (40, 60)
    assert (tokens("cohere", "unknown", "input"), tokens("cohere", "unknown", "output")) == (4, 6)
    assert (tokens("openai", "gpt-3.5-turbo", "input"), tokens("openai", "gpt-3.5-turbo", "output")) == (11, 22)
    assert (tokens("anthropic", "claude-3-5-sonnet-20240620", "input"),
            tokens("anthropic", "claude-3-5-sonnet-20240620", "output")) == (25, 15)
    assert sample_total(text, "apitoken_llm_requests_total", model="gpt-4") == 2      # /openai and /both
    assert sample_total(text, "apitoken_llm_cost_usd_total", model="claude-opus-4-5-20251101") == \
        pytest.approx(snapshot_cost("anthropic", "claude-opus-4-5-20251101", input=200, output=100))
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


def test_the_price_table_in_force_is_exported(llm_app, keys, tmp_path):
    shipped = metrics(llm_app())
    f = tmp_path / "p.yml"
    f.write_text("services:\n  openai:\n    gpt-4o: {input: 1, output: 2}\n")
    mine = metrics(llm_app(pricing_file=str(f)))
    info = [line for line in shipped.splitlines() if line.startswith("apitoken_pricing_info{")]
    assert info == [f'apitoken_pricing_info{{version="{SNAPSHOT["version"]}",'
                    f'checksum="{Pricing.load().checksum}"}} 1.0']
    assert f'checksum="{Pricing.load(str(f)).checksum}"' in mine and Pricing.load(str(f)).checksum not in shipped


def test_prices_update_converts_litellms_map_and_show_says_where_a_price_comes_from(tmp_path):
    import subprocess
    import sys
    source = tmp_path / "model_prices_and_context_window.json"
    source.write_text(json.dumps({
        "sample_spec": {"mode": "one of: chat, embedding, ...", "input_cost_per_token": 0.0},
        "gpt-new": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-06,
                    "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06},
        "anthropic/claude-new": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 3e-06,
                                 "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 3e-07,
                                 "cache_creation_input_token_cost": 3.75e-06},
        "claude-new": {"litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 4e-06,
                       "output_cost_per_token": 1.5e-05},
        "cohere_chat/command-new": {"litellm_provider": "cohere_chat", "mode": "chat",
                                    "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07},
        "text-embedding-new": {"litellm_provider": "openai", "mode": "embedding", "input_cost_per_token": 1e-08,
                               "output_cost_per_token": 0.0},
        "o-new": {"litellm_provider": "openai", "mode": "responses", "input_cost_per_token": 1e-06,
                  "output_cost_per_token": 4e-06, "output_cost_per_reasoning_token": 5e-06}}))
    out = tmp_path / "prices.json"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "prices", *args],
                              capture_output=True, text=True, timeout=60)
    done = cli("update", "--from", str(source), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "3 services" in done.stdout and "4 models" in done.stdout, done.stdout
    snap = json.loads(out.read_text())
    assert snap["services"] == {
        "anthropic": {"claude-new": {"input": 4.0, "output": 15.0}},      # the bare name's entry wins
        "cohere": {"command-new": {"input": 0.15, "output": 0.6}},
        "openai": {"gpt-new": {"input": 2.5, "output": 10.0, "cached_input": 1.25},
                   "o-new": {"input": 1.0, "output": 4.0, "reasoning": 5.0}}}
    import hashlib
    assert snap["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert snap["version"] == "sha256:" + snap["source_sha256"][:12]
    shown = cli("show", "openai", "gpt-new-2026-01-01", "--prices", str(out))
    assert shown.returncode == 0 and "from the snapshot" in shown.stdout
    assert "cached_input  1.25" in shown.stdout and "reasoning     10 (the output price)" in shown.stdout
    unpriced = cli("show", "openai", "gpt-4o", "--prices", str(out))
    assert unpriced.returncode == 1 and "no price" in unpriced.stdout
    again = cli("update", "--from", str(source), "--output", str(out), "--version", "test 2")
    assert "(was sha256:" in again.stdout and "0 added, 0 removed, 0 repriced" in again.stdout
    refused = cli("update", "--from", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x.json"))
    assert refused.returncode == 2 and "missing.json" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x.json").exists()
    unwritable = cli("update", "--from", str(source), "--output", str(tmp_path / "no" / "such" / "p.json"))
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr and "Traceback" not in unwritable.stderr
    bad_version = cli("update", "--from", str(source), "--output", str(out), "--version", "x\ny")
    assert bad_version.returncode == 2 and "printable" in bad_version.stderr


def test_prices_update_refuses_to_drop_most_models_and_names_every_change(tmp_path):
    """A snapshot says the day it was taken; an update that would remove more than a tenth of the
    models there is refused (nothing written) unless --force; what it adds, removes and reprices
    is named."""
    import subprocess
    import sys

    def litellm_map(models):
        return json.dumps({name: {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": price,
                                  "output_cost_per_token": 2 * price} for name, price in models.items()})

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "api_token_exporter.cli", "prices", *args],
                              capture_output=True, text=True, timeout=60)
    big, small, out = tmp_path / "big.json", tmp_path / "small.json", tmp_path / "prices.json"
    big.write_text(litellm_map({f"model-{i}": 1e-06 for i in range(40)}))
    done = cli("update", "--from", str(big), "--output", str(out))
    assert done.returncode == 0, done.stderr
    taken = json.loads(out.read_text())["date"]
    assert dt.date.fromisoformat(taken) == dt.datetime.now(dt.timezone.utc).date()
    assert f"of {taken}, 40 models" in done.stdout
    shown = cli("show", "openai", "model-1", "--prices", str(out))
    assert f"taken {taken}" in shown.stdout, shown.stdout
    written = out.read_text()

    small.write_text(litellm_map({"model-1": 3e-06, "model-2": 1e-06, "model-new": 1e-06}))
    refused = cli("update", "--from", str(small), "--output", str(out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "would remove 38 of the 40 models" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert out.read_text() == written
    forced = cli("update", "--from", str(small), "--output", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "1 added, 38 removed, 1 repriced" in forced.stdout, forced.stdout
    assert "added: openai/model-new" in forced.stdout and "repriced: openai/model-1" in forced.stdout
    assert "removed: openai/model-0, openai/model-10," in forced.stdout and "and 28 more" in forced.stdout

    assert cli("update", "--from", str(big), "--output", str(out), "--force").returncode == 0
    some = tmp_path / "some.json"     # 4 of 40 removed, within the tenth: written without --force
    some.write_text(litellm_map({**{f"model-{i}": 1e-06 for i in range(36)}, "model-1": 3e-06}))
    within = cli("update", "--from", str(some), "--output", str(out))
    assert within.returncode == 0 and "0 added, 4 removed, 1 repriced" in within.stdout, within.stdout


def test_the_shipped_snapshot_says_when_it_was_taken():
    assert price_snapshot.DATE.match(SNAPSHOT["date"]) and Pricing.load().date == SNAPSHOT["date"]


def test_odd_usage_blocks_are_refused_with_the_field_named_or_read_as_documented():
    from api_token_exporter.core.llmcapture import extract_usage

    def found(usage):
        body = json.dumps({"type": "message", "model": "claude-haiku-4-5", "usage": usage}).encode()
        return extract_usage("application/json", body)
    assert found({"input_tokens": True, "cache_read_input_tokens": 5, "output_tokens": 1}).input_tokens is True
    with pytest.raises(UsageError, match="input_tokens must be a number"):
        validate_usage(*found({"input_tokens": True, "cache_read_input_tokens": 5, "output_tokens": 1}))
    with pytest.raises(UsageError, match="cached_input_tokens must be a number"):
        validate_usage(*found({"input_tokens": 3, "cache_read_input_tokens": "5", "output_tokens": 1}))
    assert validate_usage(*found({"input_tokens": 3, "cache_read_input_tokens": None, "output_tokens": 1})) \
        .parts() == {"input": 3, "cached_input": 0, "cache_write": 0, "output": 1, "reasoning": 0}
