"""Each provider's rate-limit headers, from the samples in their documentation, in one shape."""
import datetime as dt

import pytest

from api_token_exporter.proxy import upstream_limits as ul

NOW = 1_725_464_800.0        # 2024-09-04T15:46:40Z


def ts(text):
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_github_primary_limit_headers():
    # docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api
    obs = ul.parse("github", {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "4999",
                              "x-ratelimit-used": "1", "x-ratelimit-reset": "1691591363",
                              "x-ratelimit-resource": "core", "Content-Type": "application/json"}, NOW)
    assert obs.resource == "core" and obs.retry_after is None
    assert obs.limits == {"core": ul.Limit(5000, 4999, 1691591363, 1)}


def test_github_names_the_resource_and_header_case_does_not_matter():
    obs = ul.parse("github", [("X-RateLimit-Limit", "30"), ("X-RateLimit-Remaining", "0"),
                              ("X-RateLimit-Reset", "1725464860"), ("X-RateLimit-Resource", "search"),
                              ("Retry-After", "60")], NOW)
    assert obs.limits["search"].remaining == 0 and obs.limits["search"].exhausted(NOW)
    assert not obs.limits["search"].exhausted(1725464861)          # the reset passed
    assert obs.retry_after == NOW + 60


def test_github_rate_limit_body():
    doc = {"resources": {"core": {"limit": 5000, "used": 1, "remaining": 4999, "reset": 1691591363},
                         "search": {"limit": 30, "used": 12, "remaining": 18, "reset": 1691591091},
                         "graphql": {"limit": 5000, "used": 7, "remaining": 4993, "reset": 1691593228},
                         "integration_manifest": {"limit": 5000, "used": 1, "remaining": 4999, "reset": 1691594631},
                         "code_scanning_upload": {"limit": 500, "used": 1, "remaining": 499, "reset": 1691594631}},
           "rate": {"limit": 5000, "used": 1, "remaining": 4999, "reset": 1372700873}}
    obs = ul.github_rate_limit_body(doc, NOW)
    assert obs.limits["search"] == ul.Limit(30, 18, 1691591091, 12)
    assert set(obs.limits) == {"core", "search", "graphql", "integration_manifest", "code_scanning_upload"}
    assert ul.github_rate_limit_body({"message": "Bad credentials"}, NOW).limits == {}


def test_openai_headers_with_go_durations():
    # platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers
    obs = ul.parse("openai", {"x-ratelimit-limit-requests": "60", "x-ratelimit-limit-tokens": "150000",
                              "x-ratelimit-remaining-requests": "59", "x-ratelimit-remaining-tokens": "149984",
                              "x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, NOW)
    assert obs.limits["requests"] == ul.Limit(60, 59, NOW + 1)
    assert obs.limits["tokens"] == ul.Limit(150000, 149984, NOW + 360)


@pytest.mark.parametrize("text,seconds", [
    ("1s", 1), ("6m0s", 360), ("12ms", 0.012), ("1m12.336s", 72.336), ("8.64s", 8.64), ("1h2m3s", 3723),
    ("0s", 0), ("250us", 0.00025), ("17", 17.0), ("", None), ("soon", None), ("5x", None), ("1s2", None)])
def test_go_durations(text, seconds):
    got = ul.parse_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_openai_429_with_retry_after_ms():
    obs = ul.parse("openai", {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-tokens": "30000",
                              "x-ratelimit-reset-tokens": "20ms", "retry-after-ms": "1500", "retry-after": "2"}, NOW)
    assert obs.retry_after == pytest.approx(NOW + 1.5)            # the precise one wins
    assert obs.limits["tokens"].exhausted(NOW) and obs.limits["tokens"].reset_at == pytest.approx(NOW + 0.02)
    assert "requests" not in obs.limits


def test_anthropic_headers_with_rfc3339_resets():
    # docs.anthropic.com/en/api/rate-limits#response-headers
    headers = {
        "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2024-09-04T15:47:13Z",
        "anthropic-ratelimit-tokens-limit": "50000", "anthropic-ratelimit-tokens-remaining": "49000",
        "anthropic-ratelimit-tokens-reset": "2024-09-04T15:47:13.123456789Z",
        "anthropic-ratelimit-input-tokens-limit": "40000", "anthropic-ratelimit-input-tokens-remaining": "39500",
        "anthropic-ratelimit-input-tokens-reset": "2024-09-04T15:47:13+00:00",
        "anthropic-ratelimit-output-tokens-limit": "8000", "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": "2024-09-04T17:47:13+02:00",
        "retry-after": "33", "request-id": "req_018EeWyXxfu5pfWkrYcMdjWG"}
    obs = ul.parse("anthropic", headers, NOW)
    reset = ts("2024-09-04T15:47:13Z")
    assert obs.limits["requests"] == ul.Limit(50, 49, reset)
    assert obs.limits["tokens"].reset_at == pytest.approx(reset + 0.123456)
    assert obs.limits["input_tokens"] == ul.Limit(40000, 39500, reset)
    assert obs.limits["output_tokens"].exhausted(NOW) and obs.limits["output_tokens"].reset_at == reset
    assert obs.retry_after == NOW + 33


@pytest.mark.parametrize("value,expected", [
    ("120", NOW + 120), ("0", NOW), ("Wed, 04 Sep 2024 15:48:00 GMT", ts("2024-09-04T15:48:00Z")),
    ("Wednesday, 04-Sep-24 15:48:00 GMT", ts("2024-09-04T15:48:00Z")), ("later", None), ("-5", None), (None, None)])
def test_retry_after_seconds_or_http_date(value, expected):
    assert ul.parse_retry_after(value, NOW) == expected


def test_generic_headers_and_reset_formats():
    names = ul.GenericHeaders(limit="X-Quota-Limit", remaining="X-Quota-Left", reset="X-Quota-Reset")
    obs = ul.generic({"x-quota-limit": "100", "x-quota-left": "7", "x-quota-reset": "30"}, NOW, names)
    assert obs.limits["default"] == ul.Limit(100, 7, NOW + 30)     # auto: seconds from now
    obs = ul.generic({"x-quota-limit": "100", "x-quota-left": "7", "x-quota-reset": "1725470000"}, NOW, names)
    assert obs.limits["default"].reset_at == 1725470000           # auto: Unix time
    assert ul.parse_reset("2024-09-04T15:47:13Z", "rfc3339", NOW) == ts("2024-09-04T15:47:13Z")
    assert ul.parse_reset("1m", "duration", NOW) == NOW + 60
    assert ul.parse_reset("100", "epoch", NOW) == 100
    default = ul.generic({"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "3"}, NOW)
    assert default.limits["default"] == ul.Limit(10, 3, None)


def test_nonsense_is_ignored_never_guessed():
    obs = ul.parse("github", {"x-ratelimit-limit": "lots", "x-ratelimit-remaining": "NaN",
                              "x-ratelimit-resource": "Core Search!"}, NOW)
    assert obs.limits == {} and not obs.has_rate_limit_headers
    obs = ul.parse("openai", {"x-ratelimit-remaining-requests": "-1", "x-ratelimit-limit-requests": "inf"}, NOW)
    assert obs.limits == {}
    assert ul.parse("anthropic", {"anthropic-ratelimit-requests-remaining": "3",
                                  "anthropic-ratelimit-requests-reset": "tomorrow"}, NOW).limits == {
        "requests": ul.Limit(None, 3, None)}


def test_a_limit_is_full_again_after_its_reset():
    lim = ul.Limit(5000, 0, NOW + 10)
    assert lim.exhausted(NOW) and lim.ratio() == 0
    assert lim.current(NOW + 10) == ul.Limit(5000, 5000, None, 0) and not lim.current(NOW + 10).exhausted(NOW + 10)


def test_resources_a_request_uses():
    assert ul.resources_for("github", "GET", "/repos/a/b") == ("core",)
    assert ul.resources_for("github", "GET", "/search/issues") == ("search",)
    assert ul.resources_for("github", "GET", "/search/code") == ("code_search",)
    assert ul.resources_for("github", "POST", "/graphql") == ("graphql",)
    assert ul.resources_for("openai", "POST", "/v1/chat/completions") == ("requests", "tokens")
    assert ul.resources_for("generic", "GET", "/x", ul.GenericHeaders(resource="calls")) == ("calls",)


def test_rate_limit_headers_are_recognised_for_dropping():
    for name in ("X-RateLimit-Remaining", "x-ratelimit-reset-tokens", "anthropic-ratelimit-requests-limit",
                 "RateLimit-Policy", "retry-after-ms"):
        assert ul.is_rate_limit_header(name)
    for name in ("Retry-After", "Content-Type", "X-Request-Id"):
        assert not ul.is_rate_limit_header(name)
