import re

import pytest

from api_token_exporter.core.keystore import mask_key

ADMIN = {"Authorization": "Bearer admin-secret"}
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


@pytest.fixture
def admin_client(make_app):
    return make_app(admin_token="admin-secret", recent_requests=5).test_client()


def test_admin_needs_the_admin_token(admin_client):
    assert admin_client.get("/admin/stats").status_code == 401
    assert admin_client.get("/admin/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert admin_client.get("/admin/stats", headers={"X-Admin-Token": "admin-secret"}).status_code == 200


def test_admin_is_off_without_a_token(client):
    # then /admin/* is just a path of the app, behind API-key auth
    assert client.get("/admin/stats", headers=ADMIN).status_code == 401


def test_token_details_has_the_seed_003_shape(admin_client, keys):
    alpha = {"X-API-Key": keys[1]["alpha"]}
    for path in ("/items", "/items", "/items/1", "/items/100"):
        admin_client.get(path, headers=alpha)
    for _ in range(4):
        admin_client.get("/items", headers={"X-API-Key": keys[1]["beta"]})
    doc = admin_client.get("/admin/token-details", headers=ADMIN).get_json()
    assert set(doc) == {"tokens", "total_tokens", "timestamp"}
    assert doc["total_tokens"] == 6 and TIME.match(doc["timestamp"])
    by_id = {t["id"]: t for t in doc["tokens"]}
    alpha_doc = by_id["alpha"]
    assert alpha_doc["token_id"] == mask_key(keys[1]["alpha"])
    assert alpha_doc["usage_count"] == 4
    assert alpha_doc["success_count"] == 3 and alpha_doc["error_count"] == 1
    assert alpha_doc["status"] == "active"
    assert alpha_doc["rate_limit"]["limit"] == 1000 and alpha_doc["rate_limit"]["remaining"] == 996
    assert TIME.match(alpha_doc["rate_limit"]["reset"]) and TIME.match(alpha_doc["last_used"])
    assert alpha_doc["endpoints_used"] == {"/items": 2, "/items/<int:item_id>": 2}
    assert alpha_doc["top_endpoints"] == [["/items", 2], ["/items/<int:item_id>", 2]]
    assert by_id["beta"]["status"] == "rate_limited"
    assert by_id["revoked"]["status"] == "inactive"
    assert by_id["old"]["status"] == "expired"


def test_stats_has_the_seed_003_shape_and_a_ring_buffer(admin_client, keys):
    for _ in range(4):
        admin_client.get("/items", headers={"X-API-Key": keys[1]["beta"]})
    for i in range(3):
        admin_client.get(f"/items/{i}", headers={"X-API-Key": keys[1]["alpha"]})
    admin_client.get("/items")
    doc = admin_client.get("/admin/stats", headers=ADMIN).get_json()
    assert doc["tokens"]["count"] == 6
    assert doc["tokens"]["active"] == 3 and doc["tokens"]["rate_limited"] == 1
    assert doc["tokens"]["invalid"] == 2
    assert doc["tokens"]["per_token_limit"] == 1000
    assert doc["tokens"]["effective_limit"] == 1000 + 1000 + 4 + 1000
    assert doc["total_requests"] == 8
    assert doc["success_count"] == 6 and doc["error_count"] == 2
    assert doc["current_rate_limit"]["limit"] == 1000
    assert doc["current_rate_limit"]["remaining"] == 997
    assert TIME.match(doc["reset_time"])
    recent = doc["recent_requests"]
    assert len(recent) == 5                        # ring buffer size from settings
    assert recent[0]["status"] == 401 and recent[0]["token"] == "(none)"
    assert recent[1]["endpoint"] == "/items/<int:item_id>"
    assert set(recent[1]) == {"timestamp", "endpoint", "method", "token", "status", "time_str"}
    assert recent[1]["token"] == mask_key(keys[1]["alpha"])
