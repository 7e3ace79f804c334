"""Requests by the client's country (country_lookup): resolved from the address behind trusted
proxies, or taken from ingest events; a bounded number of countries per token, exact counts."""
import json

from flask import Flask

from api_token_exporter import TokenAnalytics
from api_token_exporter.core.metrics import Metrics
from support import sample_total, samples

JP, AR = "1.0.16.1", "24.232.0.1"          # in blocks delegated to JP and AR (tests/test_geo.py)


def app_with(keys, **settings):
    app = Flask("countries")
    app.get("/items")(lambda: "ok")
    TokenAnalytics(app, keys_file=keys[0], metrics_public=True, ingest_token="ingest-secret", **settings)
    return app.test_client()


def test_requests_are_counted_by_the_clients_country(keys):
    client = app_with(keys, country_lookup=True, trusted_proxies=["10.0.0.0/8"])
    alpha = {"X-API-Key": keys[1]["alpha"]}
    for _ in range(3):
        client.get("/items", headers=alpha, environ_base={"REMOTE_ADDR": JP})
    client.get("/items", headers=dict(alpha, **{"X-Forwarded-For": AR}), environ_base={"REMOTE_ADDR": "10.0.0.2"})
    client.get("/items", headers=alpha, environ_base={"REMOTE_ADDR": "192.168.1.9"})    # private: ZZ
    client.get("/items", environ_base={"REMOTE_ADDR": JP})                              # no key: no country
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="JP") == 3
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="AR") == 1
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="ZZ") == 1
    assert sample_total(text, "apitoken_requests_by_country_total") == 5


def test_off_by_default(keys):
    client = app_with(keys)
    client.get("/items", headers={"X-API-Key": keys[1]["alpha"]}, environ_base={"REMOTE_ADDR": JP})
    assert "apitoken_requests_by_country_total{" not in client.get("/metrics").get_data(as_text=True)


def test_ingest_events_carry_a_country_or_a_client_address(keys):
    client = app_with(keys, country_lookup=True)
    events = [{"token": "alpha", "route": "/x", "status": 200, "duration_ms": 1, "country": "de"},
              {"token": "alpha", "route": "/x", "status": 200, "duration_ms": 1, "client_ip": AR},
              {"token": "alpha", "route": "/x", "status": 200, "duration_ms": 1, "country": "Germany"}]
    r = client.post("/v1/events", data=json.dumps({"events": events}), content_type="application/json",
                    headers={"Authorization": "Bearer ingest-secret"})
    assert r.get_json()["accepted"] == 2
    assert r.get_json()["errors"] == [{"index": 2, "errors": ["country must be an ISO 3166-1 alpha-2 code such as DE"]}]
    text = client.get("/metrics").get_data(as_text=True)
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="DE") == 1
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="AR") == 1


def test_countries_per_token_are_capped_for_good(tmp_path):
    first = Metrics(directory=str(tmp_path), max_countries_per_token=2)
    for country in ("DE", "FR", "BR", "BR", "DE"):
        first.observe_country("alpha", country)
    first.observe_country("beta", "BR")                  # the cap is per token
    text = first.store.render().decode()
    assert {dict(l)["country"] for l in samples(text, "apitoken_requests_by_country_total") if dict(l)["token"] == "alpha"} \
        == {"DE", "FR", "__overflow__"}
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="__overflow__") == 2
    assert sample_total(text, "apitoken_requests_by_country_total", token="beta", country="BR") == 1
    first.store.close()
    again = Metrics(directory=str(tmp_path), max_countries_per_token=2)     # a restart opens no new room
    again.observe_country("alpha", "US")
    again.observe_country("alpha", "FR")
    text = again.store.render().decode()
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="__overflow__") == 3
    assert sample_total(text, "apitoken_requests_by_country_total", token="alpha", country="FR") == 2
