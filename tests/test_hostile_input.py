"""Hostile and broken input: whatever is posted, /metrics keeps rendering text every parser and
promtool accept, valid events in the same batch are counted exactly, and no reply echoes what
may be a secret."""
import math
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

from api_token_exporter.core import validation
from api_token_exporter.core.pricing import Pricing, PricingError
from api_token_exporter.web.server import create_app
from support import needs, require_binary, sample_total, samples

INGEST = {"Authorization": "Bearer ingest-secret"}
ADMIN = {"Authorization": "Bearer admin-secret"}


def exporter_client(keys_file, **settings):
    settings.setdefault("ingest_allow_unknown_tokens", True)
    return Client(create_app(keys_file=keys_file, ingest_token="ingest-secret", admin_token="admin-secret",
                             **settings))


def scrape_is_sound(client, promtool=None) -> str:
    text = client.get("/metrics").text
    list(text_string_to_metric_families(text))
    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text
    list(parse_openmetrics(om))
    if promtool:
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
    for path in ("/admin/stats", "/admin/token-details"):
        assert client.get(path, headers=ADMIN).status_code == 200
    return text


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
hostile_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40) | \
    st.sampled_from(["/\ud800", "/a\x00b", "/a\rb", "/a\tb", "/" + "x" * 500, "GET\n", "\u2028"])


@st.composite
def hostile_event(draw):
    event = {}
    for field in ("token", "route", "method"):
        if draw(st.booleans()):
            event[field] = draw(hostile_text | anything)
    for field in ("status", "duration_seconds", "duration_ms"):
        if draw(st.booleans()):
            event[field] = draw(anything)
    if draw(st.booleans()):
        event["llm"] = draw(st.fixed_dictionaries({}, optional={
            "service": hostile_text | anything, "model": hostile_text | anything,
            "input_tokens": anything, "output_tokens": anything}))
    return event


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    from api_token_exporter.core.keystore import add_key
    keys_file = str(tmp_path_factory.mktemp("fuzz") / "keys.yml")
    add_key(keys_file, "alpha")
    return exporter_client(keys_file, admin_rate_limit=1_000_000), require_binary("promtool")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(hostile_event(), max_size=4), st.integers(0, 3))
def test_any_batch_leaves_metrics_sound_and_counts_the_valid_events(fuzz_target, bad_events, valid):
    client, promtool = fuzz_target
    before = sample_total(client.get("/metrics").text, "apitoken_requests_total", token="alpha",
                          route="/fuzz/ok")
    good = [{"token": "alpha", "route": "/fuzz/ok", "status": 200, "duration_ms": 3}] * valid
    r = client.post("/v1/events", json={"events": bad_events + good}, headers=INGEST)
    assert r.status_code in (200, 400) and r.json["accepted"] >= valid
    text = scrape_is_sound(client, promtool)
    after = sample_total(text, "apitoken_requests_total", token="alpha", route="/fuzz/ok")
    assert after - before == valid


@given(hostile_text | anything)
def test_validation_accepts_only_what_every_parser_can_carry(value):
    try:
        accepted = validation.label_value("field", value)
    except validation.ValidationError as exc:
        assert "field" in str(exc) and (not isinstance(value, str) or not value or value not in str(exc))
        return
    accepted.encode("utf-8")                           # no lone surrogates
    assert 0 < len(accepted) <= validation.MAX_LABEL_LENGTH
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in accepted)


@given(anything)
def test_numbers_are_finite_and_in_range(value):
    try:
        number = validation.number("n", value, 0, 100)
    except validation.ValidationError:
        return
    assert math.isfinite(number) and 0 <= number <= 100


# -- the cases that were reproduced, one test each -------------------------------------------
def test_a_lone_surrogate_route_is_refused_and_scraping_survives(keys):
    client = exporter_client(keys[0])
    body = '{"events": [{"token": "alpha", "route": "/\\ud800", "status": 200, "duration_ms": 1}]}'
    r = client.post("/v1/events", data=body, headers={**INGEST, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json["errors"][0]["errors"] == [
        "route must be valid UTF-8 text without control, invisible or direction characters"]
    scrape_is_sound(client)


@pytest.mark.parametrize("route", ["/a\x00b", "/a\rb", "/a\tb", "/a\nb",
                                   "/admin\u202e/nimda", "/a\u200bb", "\ufeff/a", "/a\u2066b\u2069"])
def test_control_invisible_and_direction_characters_in_routes_are_refused(keys, route):
    """Right-to-left overrides, zero-width spaces and byte-order marks would let a shown route
    pass for another: each event is refused with its reason, the others of the batch kept."""
    client = exporter_client(keys[0])
    r = client.post("/v1/events", headers=INGEST, json=[
        {"token": "alpha", "route": route, "status": 200, "duration_ms": 1},
        {"token": "alpha", "route": "/fine", "status": 200, "duration_ms": 1}])
    assert r.status_code == 200 and r.json["accepted"] == 1
    assert r.json["errors"] == [{"index": 0, "errors": [
        "route must be valid UTF-8 text without control, invisible or direction characters"]}]
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/fine"' in text and route not in text


def test_an_api_key_is_never_a_label_whichever_field_it_is_sent_in(keys):
    client = exporter_client(keys[0])
    raw = keys[1]["alpha"]
    events = [{"token": "alpha", "route": "/x", "status": 200, "duration_ms": 1, "llm": llm}
              for llm in ({"service": raw, "model": "gpt-4o"}, {"service": "openai", "model": raw})]
    events += [{"token": "alpha", "route": route, "status": 200, "duration_ms": 1}
               for route in (f"/users/{raw}", "/" + raw)]
    r = client.post("/v1/events", json=events, headers=INGEST)
    assert r.status_code == 400 and r.json["accepted"] == 0
    assert [e["errors"] for e in r.json["errors"]] == [["llm: service must not be an API key"],
                                                        ["llm: model must not be an API key"],
                                                        ["route must not hold an API key"]] * 1 + [
                                                           ["route must not hold an API key"]]
    text = client.get("/metrics").get_data(as_text=True)
    assert raw not in text and raw[4:] not in text and raw not in r.get_data(as_text=True)


@pytest.mark.parametrize("price", [".nan", ".inf", "-.inf", "-1"])
def test_prices_that_are_not_finite_and_positive_are_refused(tmp_path, price):
    path = tmp_path / "pricing.yml"
    path.write_text(f"services:\n  openai:\n    gpt-4: {{input: {price}, output: 1}}\n")
    with pytest.raises(PricingError, match="services.openai.gpt-4.input"):
        Pricing.load(str(path))


def test_deeply_nested_json_is_a_400_with_a_json_reason(keys):
    client = exporter_client(keys[0])
    body = "[" * 1000 + "]" * 1000
    r = client.post("/v1/events", data=body, headers={**INGEST, "Content-Type": "application/json"})
    assert r.status_code == 400 and "nests deeper than" in r.json["detail"]
    nested = {"events": [{"token": "alpha", "route": "/a", "status": 200, "duration_ms": 1,
                          "x": [[[[[[[[1]]]]]]]]}]}
    r = client.post("/v1/events", json=nested, headers=INGEST)
    assert r.status_code == 400 and "nests deeper than" in r.json["detail"]


def test_no_submitted_identifier_is_echoed(keys):
    client = exporter_client(keys[0], ingest_allow_unknown_tokens=False)
    canary = "CANARYx9N2A8"
    r = client.post("/v1/events", json=[{"token": canary, "route": f"/{canary}\x00", "method": canary * 10,
                                         "status": 200, "duration_ms": 1,
                                         "llm": {"service": canary + " ", "model": canary + "\x00"}}],
                    headers=INGEST)
    assert r.status_code == 400 and canary not in r.text
    assert canary not in r.text.lower()


def test_methods_outside_the_standard_set_share_one_label(keys):
    client = exporter_client(keys[0])
    events = [{"token": "alpha", "route": "/a", "method": m, "status": 200, "duration_ms": 1}
              for m in ["get", "PROPFIND", "MKCOL", "BREW", "X" * 20, "PATCH"]]
    assert client.post("/v1/events", json=events, headers=INGEST).json["accepted"] == 6
    text = client.get("/metrics").text
    methods = {dict(labels)["method"] for labels in
               samples(text, "apitoken_requests_total")}
    assert methods == {"GET", "PATCH", "_OTHER"}
    assert sample_total(text, "apitoken_requests_total", method="_OTHER") == 4


def test_a_token_overflow_is_counted_once_per_event(keys):
    client = exporter_client(keys[0], max_tokens=6)          # the six keys fill it
    llm = {"service": "openai", "model": "gpt-4", "input_tokens": 1, "output_tokens": 1}
    events = [{"token": f"svc-{i}", "route": "/a", "status": 200, "duration_ms": 1, "llm": llm} for i in range(5)]
    assert client.post("/v1/events", json=events, headers=INGEST).json["accepted"] == 5
    text = client.get("/metrics").text
    assert sample_total(text, "apitoken_label_overflow_total", label="token") == 5
    assert sample_total(text, "apitoken_llm_tokens_total", token="__overflow__", type="input") == 5


def test_keys_from_the_key_file_keep_their_label_when_junk_fills_the_cap(keys):
    client = exporter_client(keys[0], max_tokens=8)           # six keys, two places left
    junk = [{"token": f"junk-{i}", "route": "/a", "status": 200, "duration_ms": 1} for i in range(50)]
    client.post("/v1/events", json=junk, headers=INGEST)
    client.post("/v1/events", json=[{"token": "gamma", "route": "/a", "status": 200, "duration_ms": 1}],
                headers=INGEST)
    text = client.get("/metrics").text
    assert sample_total(text, "apitoken_requests_total", token="gamma") == 1
    assert sample_total(text, "apitoken_requests_total", token="__overflow__") == 48
    details = {t["id"]: t for t in client.get("/admin/token-details", headers=ADMIN).json["tokens"]}
    assert details["gamma"]["usage_count"] == 1


def test_analytics_auth_errors_say_which_credentials_are_accepted(keys):
    client = exporter_client(keys[0], prometheus_url="http://127.0.0.1:9")
    r = client.get("/analytics/tokens", headers={"Authorization": "Bearer not-the-admin-token"})
    assert r.status_code == 401
    assert "admin token" in r.json["detail"] and "X-API-Key" in r.json["detail"]
    assert "not-the-admin-token" not in r.text


@pytest.mark.integration
@needs("server")
def test_a_10_mb_chunked_body_is_refused_before_it_is_read_whole(tmp_path, keys):
    """The server must answer 413 once it has read the limit, while the client is still
    sending: it never waits for (or buffers) the whole body."""
    import signal
    import socket
    from support import start_serve
    proc, port = start_serve(tmp_path, "--keys-file", keys[0], env={"ATE_INGEST_TOKEN": "ingest-secret"})
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ingest-secret\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"[" + b" " * 65534 + b"\r\n"
        sent = 0
        while sent < 1_200_000:                       # past the 1 MiB limit, far short of 10 MB
            sock.sendall(b"%x\r\n" % (len(chunk) - 2) + chunk)
            sent += len(chunk) - 2
        sock.settimeout(15)
        reply = sock.recv(65536).decode("latin-1")   # no more is sent until the server answers
        while "larger than" not in reply and len(reply) < 4096:
            more = sock.recv(65536).decode("latin-1")
            if not more:
                break
            reply += more
        assert reply.startswith("HTTP/1.1 413"), reply[:200]
        assert "larger than 1048576 bytes" in reply
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


class HungPrometheus:
    """Accepts connections and never answers."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("path", ["/analytics/tokens?days=30", "/api/analytics/usage"])
def test_a_prometheus_that_never_answers_gives_a_503_within_the_deadline(keys, path):
    import threading
    hung = HungPrometheus()
    try:
        client = exporter_client(keys[0], prometheus_url=hung.url, prometheus_timeout=1)
        answers = []
        # the hung Prometheus never answers: an answer at all is the deadline at work (the
        # thread's join only keeps a broken deadline from hanging the run)
        asking = threading.Thread(target=lambda: answers.append(client.get(path, headers=ADMIN)), daemon=True)
        asking.start()
        asking.join(60)
        assert answers, "no answer: the analytics deadline did not end the wait"
        r = answers[0]
        assert r.status_code == 503 and r.json["detail"].startswith("Analytics unavailable")
    finally:
        hung.close()


def test_analytics_ranges_are_capped_and_each_credential_is_rate_limited(keys):
    hung = HungPrometheus()                                     # never reached below
    try:
        client = exporter_client(keys[0], prometheus_url=hung.url, admin_rate_limit=3)
        r = client.get("/analytics/tokens?days=3650", headers=ADMIN)
        assert r.status_code == 400 and r.json["detail"] == "days must be from 1 to 92, got 3650"
        codes = [client.get("/analytics/tokens?days=0", headers=ADMIN).status_code for _ in range(3)]
        assert codes == [400, 400, 429]                         # the 4th request of this minute
        assert client.get("/admin/stats", headers=ADMIN).status_code == 429
        tenant = client.get("/analytics/tokens?days=0", headers={"X-API-Key": keys[1]["alpha"]})
        assert tenant.status_code == 400                        # another credential, its own budget
    finally:
        hung.close()


def test_a_key_pasted_into_token_never_becomes_a_label(keys):
    client = exporter_client(keys[0])                          # unknown token ids allowed
    leaked = keys[1]["alpha"]
    r = client.post("/v1/events", json=[{"token": leaked, "route": "/a", "status": 200, "duration_ms": 1},
                                        {"token": "atk_" + "x" * 43, "route": "/a", "status": 200,
                                         "duration_ms": 1}], headers=INGEST)
    assert r.status_code == 400 and leaked not in r.text
    assert r.json["errors"][0]["errors"] == ["token must be a key id, not the key itself (send a key as api_key)"]
    assert leaked not in client.get("/metrics").text


def test_a_number_of_hundreds_of_digits_is_a_reason_not_a_500(keys):
    client = exporter_client(keys[0])
    r = client.post("/v1/events", data='[{"token": "alpha", "route": "/a", "status": 200, '
                                       '"duration_seconds": 1' + "0" * 400 + '}]',
                    headers={**INGEST, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json["errors"][0]["errors"] == ["duration_seconds must be a finite number"]
