"""The credential pool on its own: the pool file, choosing and rotating, the state machine,
shared accounts, several processes through the metric store, seed 003's JSON."""
import json
import logging
import threading

import pytest

from api_token_exporter.core.config import ConfigError
from api_token_exporter.proxy.pool import CredentialPool, load_pool, mask_secret, pool_from_dict
from api_token_exporter.core.metrics import Metrics
from support import sample_total

NOW = 1_800_000_000.0
SECRETS = {f"T{i}": f"ghp_{c * 4}{'x' * 28}{i}{c}" for i, c in enumerate("ABCD")}


def pool_doc(n=3, **extra):
    doc = {"upstream": "https://api.github.com", "provider": "github", "rotate_below": 100,
           "credentials": [{"id": f"gh-{i}", "secret_env": f"T{i}"} for i in range(n)]}
    doc.update(extra)
    return doc


def make_pool(n=3, metrics=True, directory="", **extra):
    m = Metrics(directory=directory) if metrics else None
    return CredentialPool(pool_from_dict(pool_doc(n, **extra), SECRETS), metrics=m, clock=lambda: NOW), m


def gh(remaining, limit=5000, reset=NOW + 3600, resource="core", **more):
    h = {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
         "x-ratelimit-reset": str(int(reset)), "x-ratelimit-resource": resource}
    h.update(more)
    return h


def use(pool, cid_expected=None, code=200, headers=None, resources=("core",), now=NOW):
    cred = pool.acquire(resources, now=now)
    if cid_expected is not None:
        assert cred is not None and cred.id == cid_expected
    if cred is not None and headers is not None:
        return cred, pool.observe(cred, code, headers, resources, "/repos/a/b", "client", now=now)
    return cred, None


# -- the pool file -------------------------------------------------------------------------
def test_secrets_come_from_environment_or_file_never_the_file_itself(tmp_path):
    secret_file = tmp_path / "gh"
    secret_file.write_text(SECRETS["T1"] + "\n")
    pool_file = tmp_path / "pool.yml"
    pool_file.write_text(json.dumps({"upstream": "https://api.github.com/", "provider": "github",
                                     "credentials": [{"id": "a", "secret_env": "T0"},
                                                     {"secret_file": str(secret_file), "account": "acct"}]}))
    cfg = load_pool(str(pool_file), SECRETS)
    a, b = cfg.credentials
    assert cfg.upstream == "https://api.github.com"
    assert a.auth() == ("Authorization", "Bearer " + SECRETS["T0"])
    assert b.auth()[1].endswith(SECRETS["T1"]) and b.account == "acct"
    assert b.id.startswith("cred-") and len(b.id) == 15 and b.id[5:] not in SECRETS["T1"]   # a hash prefix
    assert SECRETS["T0"] not in repr(a) + repr(cfg.credentials) + a.masked


@pytest.mark.parametrize("change,message", [
    ({"secret": SECRETS["T0"]}, "never written in the pool file"),
    ({"secret_env": "NOPE"}, "NOPE is not set"),
    ({"secret_file": "/nonexistent/x"}, "secret_file /nonexistent/x"),
    ({"provider": "gitlab"}, "provider must be one of"),
    ({"id": "has space"}, "id must be"),
    ({"id": SECRETS["T0"]}, "must not be (part of) the secret"),
    ({"id": "gh-1"}, "used twice"),
    ({"secret_env": "T1"}, "same secret as gh-1"),
    ({"colour": "red"}, "unknown key(s) colour"),
])
def test_pool_file_errors_name_the_entry_never_the_secret(change, message):
    doc = pool_doc(2)
    entry = {"id": "gh-0", "secret_env": "T0"}
    if "secret_file" in change or "secret" in change:
        entry.pop("secret_env")
    entry.update(change)
    doc["credentials"] = [{"id": "gh-1", "secret_env": "T1"}, entry]
    with pytest.raises(ConfigError, match="credentials\\[1\\]") as err:
        pool_from_dict(doc, SECRETS)
    assert message in str(err.value)
    assert all(s not in str(err.value) for s in SECRETS.values())


def test_pool_level_errors():
    with pytest.raises(ConfigError, match="upstream must be"):
        pool_from_dict(dict(pool_doc(), upstream="ftp://x"), SECRETS)
    with pytest.raises(ConfigError, match="at least one credential"):
        pool_from_dict(dict(pool_doc(), credentials=[]), SECRETS)
    with pytest.raises(ConfigError, match="reset_format"):
        pool_from_dict(dict(pool_doc(), rate_limit_headers={"reset_format": "weekly"}), SECRETS)
    with pytest.raises(ConfigError, match="cooldown"):
        pool_from_dict(dict(pool_doc(), cooldown="a while"), SECRETS)


def test_masks_look_like_seed_003():
    assert mask_secret("ghp_abc1" + "q" * 28 + "xyz1") == "ghp_abc1...xyz1"
    assert mask_secret("github_pat_11ABCDEFG" + "z" * 60 + "9876") == "github_pat_11AB...9876"
    assert mask_secret("sk-proj-" + "k" * 40 + "wxyz") == "sk-proj-kkkk...wxyz"
    assert mask_secret("short-secret") == "sh..."
    generic = pool_from_dict(dict(pool_doc(1), provider="generic", auth_header="X-Token", auth_scheme=""), SECRETS)
    assert generic.credentials[0].auth() == ("X-Token", SECRETS["T0"])


# -- choosing ------------------------------------------------------------------------------
def test_most_left_relative_to_its_limit_first_ties_to_the_earliest_reset():
    pool, m = make_pool(3)
    for cid, remaining, limit, reset in (("gh-0", 3000, 5000, NOW + 100), ("gh-1", 4000, 5000, NOW + 900),
                                         ("gh-2", 800, 1000, NOW + 50)):
        pool.observe(pool.by_id[cid], 200, gh(remaining, limit, reset), ("core",), now=NOW)
    assert pool.acquire(("core",), now=NOW).id == "gh-2"               # 80 % beats 60 % and 80 % later
    pool, _ = make_pool(2)
    pool.observe(pool.by_id["gh-0"], 200, gh(4000, reset=NOW + 900), ("core",), now=NOW)
    pool.observe(pool.by_id["gh-1"], 200, gh(4000, reset=NOW + 100), ("core",), now=NOW)
    assert pool.acquire(("core",), now=NOW).id == "gh-1"                # a tie: the earlier reset


def test_sticks_to_the_current_one_and_rotates_under_the_threshold(caplog):
    caplog.set_level(logging.INFO)
    pool, m = make_pool(2)
    pool.observe(pool.by_id["gh-1"], 200, gh(4900), ("core",), now=NOW)
    use(pool, "gh-0", headers=gh(150))                 # unknown counts as full: the file's order
    use(pool, "gh-0", headers=gh(101))                 # still at or above 100: stays, though gh-1 has more
    use(pool, "gh-0", headers=gh(99))                  # under 100 now
    use(pool, "gh-1", headers=gh(4899))
    text = m.store.render().decode()
    assert sample_total(text, "apitoken_upstream_rotations_total", credential="gh-0", reason="threshold") == 1
    assert sample_total(text, "apitoken_upstream_selections_total", credential="gh-0") == 3
    assert "rotating from gh-0 to gh-1 (threshold)" in caplog.text
    # every credential under the threshold: the current one serves until it is out, then the next
    pool.observe(pool.by_id["gh-1"], 200, gh(50), ("core",), now=NOW)
    assert pool.acquire(("core",), now=NOW).id == "gh-1"
    pool.observe(pool.by_id["gh-1"], 200, gh(0), ("core",), now=NOW)
    assert pool.acquire(("core",), now=NOW).id == "gh-0"
    assert sample_total(m.store.render().decode(), "apitoken_upstream_rotations_total", reason="threshold") == 1


def test_rate_limited_until_retry_after_then_back():
    pool, m = make_pool(2)
    cred, verdict = use(pool, "gh-0", code=429, headers=gh(4000, **{"retry-after": "30"}))   # secondary limit
    assert verdict == "rate_limited" and pool.status("gh-0", NOW) == "rate_limited"
    use(pool, "gh-1", headers=gh(4000))
    assert pool.status("gh-0", NOW + 31) == "active"
    text = m.store.render().decode()
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="rate_limited") == 1
    assert sample_total(text, "apitoken_upstream_rotations_total", credential="gh-0", reason="rate_limited") == 1
    pool.tick(NOW + 31)                                  # the upkeep thread's second
    text = m.store.render().decode()
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="active") == 1


def test_remaining_zero_is_rate_limited_until_the_reset_and_403_with_headers_too():
    pool, _ = make_pool(2)
    _, verdict = use(pool, "gh-0", code=200, headers=gh(0, reset=NOW + 60))
    assert verdict == "ok" and pool.status("gh-0", NOW) == "rate_limited"
    _, verdict = use(pool, "gh-1", code=403, headers=gh(0, reset=NOW + 120))   # GitHub's primary limit
    assert verdict == "rate_limited"
    assert pool.acquire(("core",), now=NOW) is None
    assert pool.retry_at(("core",), now=NOW) == NOW + 60
    assert pool.acquire(("core",), now=NOW + 61).id == "gh-0"


def test_spent_without_a_reset_is_tried_again_after_default_retry_after():
    pool, _ = make_pool(1, provider="generic", default_retry_after="45s")
    cred = pool.credentials[0]
    pool.observe(cred, 200, {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "0"}, ("default",), now=NOW)
    assert pool.acquire(("default",), now=NOW + 44) is None
    assert pool.acquire(("default",), now=NOW + 45).id == "gh-0"


def test_invalid_on_401_and_403_without_headers_but_not_on_a_403_for_permissions():
    pool, m = make_pool(3)
    _, verdict = use(pool, "gh-0", code=401, headers={"x-ratelimit-limit": "60", "x-ratelimit-remaining": "59"})
    assert verdict == "invalid" and pool.status("gh-0", NOW) == "invalid"
    # GitHub's 401 carries the caller address's limits, never taken for the credential's
    assert pool.token_details()["tokens"][0]["rate_limit"]["limit"] is None
    _, verdict = use(pool, "gh-1", code=403, headers={"content-type": "application/json"})
    assert verdict == "invalid"
    _, verdict = use(pool, "gh-2", code=403, headers=gh(4000))       # "resource not accessible"
    assert verdict == "ok" and pool.status("gh-2", NOW) == "active"
    assert pool.acquire(("core",), exclude=["gh-2"], now=NOW + 86400) is None    # invalid stays out
    assert pool.retry_at(("core",), now=NOW) is None or pool.retry_at(("core",), now=NOW)
    text = m.store.render().decode()
    assert sample_total(text, "apitoken_upstream_credential_status", credential="gh-0", status="invalid") == 1
    assert sample_total(text, "apitoken_upstream_rotations_total", credential="gh-0", reason="invalid") == 1


def test_cooling_down_after_failures_in_a_row():
    pool, _ = make_pool(2, cooldown_after=3, cooldown="20s")
    cred = pool.by_id["gh-0"]
    pool.observe(cred, 502, gh(4000), ("core",), now=NOW)
    pool.observe(cred, 200, gh(3999), ("core",), now=NOW)            # a success resets the count
    pool.observe(cred, 500, gh(3998), ("core",), now=NOW)
    pool.failure(cred, now=NOW)
    assert pool.status("gh-0", NOW) == "active"
    pool.observe(cred, 503, {}, ("core",), now=NOW)
    assert pool.status("gh-0", NOW) == "cooling_down"
    assert pool.acquire(("core",), now=NOW + 5).id == "gh-1"
    assert pool.status("gh-0", NOW + 21) == "active"


def test_all_out_the_earliest_comes_back_first_and_exhaustion_is_counted():
    pool, m = make_pool(3)
    for cid, reset in (("gh-0", NOW + 300), ("gh-1", NOW + 30), ("gh-2", NOW + 3000)):
        pool.observe(pool.by_id[cid], 200, gh(0, reset=reset), ("core",), now=NOW)
    assert pool.acquire(("core",), now=NOW) is None
    assert pool.retry_at(("core",), now=NOW) == NOW + 30
    assert sample_total(m.store.render().decode(), "apitoken_upstream_exhausted_total") == 1
    assert pool.acquire(("core",), now=NOW + 31).id == "gh-1"          # after its reset: full again


def test_tokens_of_one_account_share_its_quota():
    doc = pool_doc(3)
    doc["credentials"][0]["account"] = doc["credentials"][1]["account"] = "alice"
    pool = CredentialPool(pool_from_dict(doc, SECRETS), metrics=Metrics(directory=""), clock=lambda: NOW)
    pool.observe(pool.by_id["gh-0"], 200, gh(0, reset=NOW + 60), ("core",), now=NOW)
    assert pool.status("gh-1", NOW) == "rate_limited"                  # same account, same quota
    assert pool.acquire(("core",), now=NOW).id == "gh-2"
    pool.observe(pool.by_id["gh-2"], 200, gh(4000), ("core",), now=NOW)
    pool.observe(pool.by_id["gh-1"], 200, gh(5000, reset=NOW + 3600), ("core",), now=NOW + 61)
    stats = pool.stats(now=NOW + 61)
    assert stats["tokens"]["effective_limit"] == 10000 and stats["tokens"]["accounts"] == 2
    text = pool.metrics.store.render().decode()
    assert sample_total(text, "apitoken_upstream_rate_limit_remaining", credential="gh-0") == 5000
    assert sample_total(text, "apitoken_upstream_credential_info", credential="gh-0", account="alice") == 1


def test_a_spent_search_limit_leaves_core_requests_alone():
    pool, _ = make_pool(1)
    cred = pool.by_id["gh-0"]
    pool.observe(cred, 403, gh(0, limit=30, reset=NOW + 60, resource="search"), ("search",), now=NOW)
    assert pool.acquire(("search",), now=NOW) is None
    assert pool.acquire(("core",), now=NOW).id == "gh-0"
    assert pool.status("gh-0", NOW) == "active"                        # its core quota is what counts


def test_openai_429_marks_only_the_spent_resource():
    doc = dict(pool_doc(1), provider="openai")
    pool = CredentialPool(pool_from_dict(doc, {"T0": "sk-proj-" + "k" * 40}), clock=lambda: NOW)
    cred = pool.credentials[0]
    verdict = pool.observe(cred, 429, {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
                                       "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
                                       "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7.5s",
                                       "retry-after": "8"}, ("requests", "tokens"), now=NOW)
    assert verdict == "rate_limited" and pool.status(cred.id, NOW) == "rate_limited"
    assert pool.retry_at(("requests", "tokens"), now=NOW) == NOW + 8
    details = pool.token_details(now=NOW)["tokens"][0]
    assert details["rate_limits"]["requests"]["remaining"] == 499 and details["rate_limits"]["tokens"]["remaining"] == 0


def test_thread_safety_every_request_counted_once():
    pool, m = make_pool(3)

    def worker():
        for i in range(300):
            cred = pool.acquire(("core",))
            pool.observe(cred, 200, gh(4000 - i), ("core",), "/x")
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = m.store.render().decode()
    assert sample_total(text, "apitoken_upstream_requests_total") == 1200
    assert sample_total(text, "apitoken_upstream_selections_total") == 1200
    assert pool.stats()["total_requests"] == 1200


# -- upkeep --------------------------------------------------------------------------------
def test_other_processes_findings_are_adopted_through_the_store(tmp_path):
    first, _ = make_pool(2, directory=str(tmp_path))
    second, _ = make_pool(2, directory=str(tmp_path))           # another worker on the same state_dir
    first.observe(first.by_id["gh-0"], 401, {}, ("core",), now=NOW + 1)
    first.observe(first.by_id["gh-1"], 200, gh(0, reset=NOW + 600), ("core",), now=NOW + 1)
    assert second.status("gh-0", NOW + 2) == "active"
    second.sync(NOW + 2)
    assert second.status("gh-0", NOW + 2) == "invalid"
    assert second.status("gh-1", NOW + 2) == "rate_limited"
    assert second.acquire(("core",), now=NOW + 2) is None
    assert second.retry_at(("core",), now=NOW + 2) == NOW + 600
    third, _ = make_pool(2, directory=str(tmp_path))            # a worker started later adopts at once
    assert third.status("gh-0", NOW + 3) == "invalid"
    details = third.token_details(now=NOW + 3)["tokens"]
    assert [t["status"] for t in details] == ["invalid", "rate_limited"]
    assert sum(t["usage_count"] for t in details) == 2


def test_idle_github_credentials_are_refreshed_for_free_and_invalid_ones_come_back():
    pool, _ = make_pool(2, refresh_interval="60s")
    pool.observe(pool.by_id["gh-1"], 401, {}, ("core",), now=NOW)
    body = json.dumps({"resources": {"core": {"limit": 5000, "remaining": 4321, "used": 679, "reset": NOW + 999},
                                     "search": {"limit": 30, "remaining": 30, "used": 0, "reset": NOW + 60}}})
    asked = []

    def fetch(cred):
        asked.append(cred.id)
        return 200, {}, body.encode()
    assert pool.refresh(fetch, now=NOW + 30) == ["gh-0"]       # never used; gh-1 was, 30 s ago
    assert pool.refresh(fetch, now=NOW + 61) == ["gh-1"]       # idle for a minute now, and invalid
    assert pool.status("gh-1", NOW + 61) == "active"
    details = {t["id"]: t for t in pool.token_details(now=NOW + 61)["tokens"]}
    assert details["gh-0"]["rate_limit"]["remaining"] == 4321
    assert details["gh-0"]["rate_limits"]["search"]["limit"] == 30
    assert pool.refresh(fetch, now=NOW + 62) == [] and asked == ["gh-0", "gh-1"]


def test_a_changed_secret_file_is_used_without_a_restart(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRETS["T0"])
    doc = dict(pool_doc(1))
    doc["credentials"] = [{"id": "gh-0", "secret_file": str(path)}]
    pool = CredentialPool(pool_from_dict(doc, {}), clock=lambda: NOW)
    cred = pool.credentials[0]
    pool.observe(cred, 401, {}, ("core",), now=NOW)
    import os
    path.write_text(SECRETS["T1"])
    os.utime(path, ns=(1, 1))
    assert pool.reload_secrets(NOW) == ["gh-0"]
    assert cred.auth()[1] == "Bearer " + SECRETS["T1"] and pool.status("gh-0", NOW) == "active"


# -- seed 003's JSON -----------------------------------------------------------------------
def test_token_details_and_stats_have_seed_003_shapes():
    pool, _ = make_pool(4)
    for i, (cid, remaining) in enumerate((("gh-0", 4850), ("gh-1", 0), ("gh-2", 4999), ("gh-3", 4000))):
        cred = pool.by_id[cid]
        for path, code in (("repos/Akhinoor14/Portfolio", 200), ("users/Akhinoor14", 200), ("repos/invalid", 404)):
            pool.observe(cred, code, gh(remaining, reset=NOW + 1800), ("core",), path, "client", now=NOW - 10 + i)
    pool.observe(pool.by_id["gh-3"], 401, {}, ("core",), "users/x", "client", now=NOW)
    details = pool.token_details(now=NOW)
    assert set(details) == {"tokens", "total_tokens", "timestamp"} and details["total_tokens"] == 4
    t = details["tokens"][0]
    assert {"token_id", "usage_count", "success_count", "error_count", "status", "rate_limit", "last_used",
            "endpoints_used", "top_endpoints"} <= set(t)
    assert t["token_id"] == mask_secret(SECRETS["T0"]) and t["token_id"].startswith("ghp_AAAA...")
    assert (t["usage_count"], t["success_count"], t["error_count"]) == (3, 2, 1)
    assert t["rate_limit"]["remaining"] == 4850 and t["rate_limit"]["limit"] == 5000
    assert t["rate_limit"]["reset"] == "2027-01-15 08:30:00"
    assert t["top_endpoints"][0] == ["repos/Akhinoor14/Portfolio", 1] and len(t["endpoints_used"]) == 3
    assert [x["status"] for x in details["tokens"]] == ["active", "rate_limited", "active", "invalid"]
    stats = pool.stats(now=NOW)
    assert stats["tokens"] == {"count": 4, "effective_limit": 15000, "per_token_limit": 5000, "active": 2,
                               "rate_limited": 1, "invalid": 1, "cooling_down": 0, "accounts": 4}
    assert stats["current_rate_limit"] is not None and isinstance(stats["current_rate_limit"]["reset"], int)
    assert stats["total_requests"] == 13 and stats["success_count"] == 8 and stats["error_count"] == 5
    assert stats["recent_requests"][0]["token"] == mask_secret(SECRETS["T3"])
    assert stats["recent_requests"][0]["status"] == 401 and stats["recent_requests"][0]["client"] == "client"
    everything = json.dumps(details) + json.dumps(stats)
    assert all(s not in everything and s[4:20] not in everything for s in SECRETS.values())
