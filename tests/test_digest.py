"""Usage digests and period comparison.

Unit tests: the comparison math, periods, the schedule's arithmetic, the Slack and Discord
payloads against JSON Schemas written from their documented limits (tests/schemas/), the email's
parts, the settings' refusals, the schedule's once-per-period memory. Integration tests (marked):
known traffic into a real Prometheus, read back by `digest` and `report` for the same period,
delivered to the project's WebhookSink and SmtpSink, and the exporter service's schedule under
gunicorn with two workers.
"""
from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import requests
from jsonschema import Draft202012Validator, FormatChecker
from werkzeug.serving import make_server
from werkzeug.wrappers import Response

from api_token_exporter.analytics import queries as analytics, digest, digest_channels, digest_schedule
from api_token_exporter.core import digest_settings
from api_token_exporter.core.config import ConfigError, load_settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
SLACK = Draft202012Validator(json.loads((SCHEMAS / "slack-webhook-message.schema.json").read_text()),
                             format_checker=FormatChecker())
DISCORD = Draft202012Validator(json.loads((SCHEMAS / "discord-webhook-message.schema.json").read_text()),
                               format_checker=FormatChecker())
DAY = 86400.0


def discord_total(payload: dict) -> int:
    return sum(len(e.get("title", "")) + len(e.get("description", "")) + len(e.get("footer", {}).get("text", ""))
               + len(e.get("author", {}).get("name", "")) + sum(len(f["name"]) + len(f["value"]) for f in e.get("fields", []))
               for e in payload.get("embeds", []))


def check_slack(payload: dict) -> None:
    errors = sorted(SLACK.iter_errors(payload), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors]


def check_discord(payload: dict) -> None:
    errors = sorted(DISCORD.iter_errors(payload), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors]
    assert discord_total(payload) <= 6000


def test_the_schemas_are_valid_json_schemas():
    for validator in (SLACK, DISCORD):
        Draft202012Validator.check_schema(validator.schema)


def test_alerts_of_the_period_from_the_alert_history(tmp_path):
    from api_token_exporter.alerting.store import AlertHistory
    from api_token_exporter.alerting.client import fingerprint
    history = AlertHistory(f"sqlite:///{tmp_path / 'alerts.db'}")
    day = ts("2026-03-03T00:00:00")

    def fire(labels, start, end):
        labels = {"severity": "warning", **labels}
        history.record(fingerprint(labels), labels, {}, start, end, "webhook")
    fire({"alertname": "ApiTokenTrafficAnomaly", "token": "acme-web", "anomaly": "traffic"}, day + 3600, day + 7200)
    fire({"alertname": "ApiTokenTrafficAnomaly", "token": "acme-web", "anomaly": "traffic"}, day + 9000, day + 9600)
    fire({"alertname": "ApiTokenHighErrorRate", "token": "globex-bot", "severity": "critical"}, day - 600, None)
    fire({"alertname": "ApiTokenUsageSpike", "token": "acme-web"}, day - 7200, day - 3600)          # the day before
    fire({"alertname": "ApiTokenExporterDown", "severity": "critical"}, day + 100, day + 200)         # no token
    period = digest.Period("day", day, day + DAY)
    overall = digest.alerts_section(digest.HistoryAlerts(history), digest.Audience(None, analytics.Scope()), period, 5)
    assert overall["source"] == "history" and overall["total"] == 4 and overall["anomalies"] == 2
    assert overall["bySeverity"] == {"critical": 2, "warning": 2}
    assert [(g["alertname"], g["count"], g["tokens"]) for g in overall["byName"]] == [
        ("ApiTokenExporterDown", 1, []), ("ApiTokenHighErrorRate", 1, ["globex-bot"]),
        ("ApiTokenTrafficAnomaly", 2, ["acme-web"])]
    acme = digest.alerts_section(digest.HistoryAlerts(history), digest.Audience("acme", analytics.Scope(["acme-web"])),
                                 period, 5)
    assert [g["alertname"] for g in acme["byName"]] == ["ApiTokenTrafficAnomaly"] and acme["total"] == 2

    class Broken:
        name = "history"

        def episodes(self, start, end):
            raise OSError("database is locked")
    broken = digest.alerts_section(Broken(), digest.Audience(None, analytics.Scope()), period, 5)
    assert broken["total"] == 0 and "could not be read" in broken["error"]


# -- comparison math -------------------------------------------------------------------------------
def test_change_from_nothing_has_no_percent():
    assert analytics.change(5, 0) == {"current": 5, "previous": 0, "change": 5, "changePercent": None}
    assert analytics.change(0, 0)["changePercent"] is None
    assert analytics.change(0.25, 0.0) == {"current": 0.25, "previous": 0.0, "change": 0.25, "changePercent": None}


def test_change_absolute_and_percent():
    assert analytics.change(21, 9) == {"current": 21, "previous": 9, "change": 12, "changePercent": 133.33}
    assert analytics.change(3, 4) == {"current": 3, "previous": 4, "change": -1, "changePercent": -25.0}
    assert analytics.change(0, 7)["changePercent"] == -100.0
    c = analytics.change(0.3, 0.1)
    assert c["change"] == 0.2 and c["changePercent"] == 200.0          # rounded, no 0.19999999999999998
    assert isinstance(analytics.change(2, 1)["change"], int)


def test_compare_entries_and_ranges():
    got = analytics.compare_entries({"requests": 10, "tokens": 0, "cost": 1.5}, {"requests": 5, "tokens": 0, "cost": 0.0})
    assert got["requests"]["changePercent"] == 100.0
    assert got["tokens"] == {"current": 0, "previous": 0, "change": 0, "changePercent": None}
    assert got["cost"]["changePercent"] is None
    assert analytics.previous_range(100.0, 160.0) == (40.0, 100.0)


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


def test_previous_stretch_is_the_same_part_of_the_period_before():
    now = ts("2026-03-31T10:30:00")
    assert analytics.previous_stretch("today", ts("2026-03-31T00:00:00"), now) == \
        (ts("2026-03-30T00:00:00"), ts("2026-03-30T10:30:00"))
    assert analytics.previous_stretch("thisWeek", ts("2026-03-30T00:00:00"), now) == \
        (ts("2026-03-23T00:00:00"), ts("2026-03-24T10:30:00"))
    # 30.4 days of March against February, which has 28: all of February
    assert analytics.previous_stretch("thisMonth", ts("2026-03-01T00:00:00"), now) == \
        (ts("2026-02-01T00:00:00"), ts("2026-03-01T00:00:00"))
    assert analytics.previous_stretch("thisMonth", ts("2026-03-01T00:00:00"), ts("2026-03-03T06:00:00")) == \
        (ts("2026-02-01T00:00:00"), ts("2026-02-03T06:00:00"))
    with pytest.raises(analytics.AnalyticsError):
        analytics.previous_stretch("allTime", 0.0, now)


def test_usage_report_refuses_an_unknown_compare():
    with pytest.raises(analytics.AnalyticsError, match="compare must be 'previous'"):
        analytics.usage_report(None, analytics.Scope(), time.time(), compare="last-year")


# -- periods and the schedule --------------------------------------------------------------------
def test_periods():
    now = ts("2026-03-04T10:00:00")                  # a Wednesday
    day = digest.resolve_period("day", None, None, now)
    assert (day.start, day.end, day.label) == (ts("2026-03-03T00:00:00"), ts("2026-03-04T00:00:00"), "2026-03-03")
    assert (day.previous.start, day.previous.end) == (ts("2026-03-02T00:00:00"), day.start)
    week = digest.resolve_period("week", None, None, now)
    assert (week.start, week.end) == (ts("2026-02-25T00:00:00"), ts("2026-03-04T00:00:00"))
    assert week.label == "2026-02-25 to 2026-03-03"
    assert digest.resolve_period(None, None, None, now) == day
    custom = digest.resolve_period(None, "2026-03-01T06:00:00Z", "2026-03-01T12:00:00Z", now)
    assert custom.name == "range" and custom.end - custom.start == 6 * 3600
    assert custom.previous.start == ts("2026-03-01T00:00:00")
    for args, message in (((("day", "2026-03-01", None)), "either --period or --start"),
                          ((None, None, "2026-03-01"), "--end needs --start"),
                          ((None, "2026-03-02", "2026-03-01"), "start must be before end"),
                          ((None, "2026-03-01", "2999-01-01"), "end must not be in the future"),
                          ((None, "yesterday", None), "start must be an ISO 8601")):
        with pytest.raises(analytics.AnalyticsError, match=message):
            digest.resolve_period(*args, now)


def test_due_period_daily_and_weekly():
    due = digest_schedule.due_period
    assert due("off", "08:00", "monday", ts("2026-03-04T09:00:00")) is None
    period, send = due("daily", "08:00", "monday", ts("2026-03-04T09:00:00"))
    assert (period.start, period.end, send) == (ts("2026-03-03T00:00:00"), ts("2026-03-04T00:00:00"),
                                               ts("2026-03-04T08:00:00"))
    period, send = due("daily", "08:00", "monday", ts("2026-03-04T07:59:00"))      # not yet: yesterday's
    assert (period.label, send) == ("2026-03-02", ts("2026-03-03T08:00:00"))
    period, send = due("weekly", "08:00", "monday", ts("2026-03-04T09:00:00"))     # Wednesday
    assert (period.start, period.end) == (ts("2026-02-23T00:00:00"), ts("2026-03-02T00:00:00"))
    assert send == ts("2026-03-02T08:00:00")
    period, _ = due("weekly", "08:00", "monday", ts("2026-03-02T07:00:00"))         # Monday, before the time
    assert period.end == ts("2026-02-23T00:00:00")
    period, _ = due("weekly", "06:30", "wednesday", ts("2026-03-04T06:30:00"))
    assert period.end == ts("2026-03-04T00:00:00") and period.end - period.start == 7 * DAY
    assert 0 < digest_schedule.next_wait("daily", "08:00", "monday", ts("2026-03-04T07:59:30"), 60) <= 31


# -- payloads --------------------------------------------------------------------------------------
def sample_digest(n: int = 5, long: int = 0) -> dict:
    """A digest document of build_digest's shape, with hostile and, with ``long``, very long names."""
    name = "Acme <web> & co *bold* @everyone " + "x" * long
    c = analytics.change
    token = lambda i: {"token": f"tok-{i}", "name": name, "tenant": "acme", "requests": 100 - i, "errors": i,
                       "serverErrors": 0, "llmTokens": 1000 * i, "cost": 0.01 * i, "previousRequests": 50,
                       "requestsChangePercent": 100.0}
    return {
        "kind": digest.DIGEST_KIND, "version": 1, "title": "API usage digest, all tokens: 2026-03-03" + "!" * long,
        "scope": {"tenant": None, "tokens": None},
        "period": {"name": "day", "label": "2026-03-03", "start": "2026-03-03T00:00:00.000Z",
                   "end": "2026-03-04T00:00:00.000Z"},
        "previousPeriod": {"name": "day", "label": "2026-03-02", "start": "2026-03-02T00:00:00.000Z",
                           "end": "2026-03-03T00:00:00.000Z"},
        "requests": {"total": 1234, "errors": 12, "serverErrors": 3, "errorRate": 0.0097, "tokensUsed": n},
        "llm": {"totalTokens": 5000, "promptTokens": 3000, "completionTokens": 2000, "requests": 7,
                "estimatedCost": 0.1234,
                "topModels": [{"service": "openai", "model": f"gpt-4o-{i}" + "y" * long, "totalTokens": 10,
                               "requestCount": 1, "estimatedCost": 0.01} for i in range(n)]},
        "change": {"requests": c(1234, 1000), "errors": c(12, 0), "serverErrors": c(3, 3), "tokens": c(5000, 0),
                   "cost": c(0.1234, 0.2), "llmRequests": c(7, 7)},
        "topTokens": [token(i) for i in range(n)],
        "topEndpoints": [{"route": f"/orders/<id>/{i}" + "z" * long, "requests": 10, "errors": 1, "serverErrors": 0}
                         for i in range(n)],
        "budgets": [{"token": f"tok-{i}", "name": name, "period": "daily", "budgetUsd": 1.0, "spentUsd": 0.9,
                     "usedRatio": 0.9, "level": "warning",
                     "window": {"start": "2026-03-03T00:00:00.000Z", "end": "2026-03-04T00:00:00.000Z"}}
                    for i in range(n)],
        "alerts": {"source": "history", "total": 3 * n, "anomalies": n, "bySeverity": {"critical": 1, "warning": 3 * n - 1},
                   "byName": [{"alertname": f"ApiTokenTrafficAnomaly{i}" + "a" * long, "severity": "warning",
                               "anomaly": "traffic", "count": 3, "tokens": [f"tok-{j}" for j in range(8)]}
                              for i in range(n)]},
        "generatedAt": "2026-03-04T08:00:00.000Z",
    }


@pytest.mark.parametrize("n,long", [(0, 0), (1, 0), (5, 0), (25, 0), (25, 500), (200, 3000)])
def test_slack_payload_keeps_slacks_limits(n, long):
    payload = digest_channels.slack_payload(sample_digest(n, long))
    check_slack(payload)
    text = json.dumps(payload)
    assert "<web>" not in text
    if n:
        assert "&lt;web&gt; &amp; co" in text                           # Slack's three control characters


@pytest.mark.parametrize("n,long", [(0, 0), (1, 0), (5, 0), (25, 0), (25, 500), (200, 3000)])
def test_discord_payload_keeps_discords_limits(n, long):
    payload = digest_channels.discord_payload(sample_digest(n, long))
    check_discord(payload)
    assert payload["allowed_mentions"] == {"parse": []}
    assert "@everyone" not in json.dumps(payload, ensure_ascii=False)  # inert even without allowed_mentions
    if not long:
        names = [f["name"] for f in payload["embeds"][0]["fields"]]
        assert names[:5] == ["Requests", "Errors", "LLM tokens", "LLM cost", "LLM requests"]
        assert "Top tokens" in names and "Alerts and anomalies" in names


def test_the_payloads_show_the_numbers_and_changes():
    d = sample_digest()
    slack = json.dumps(digest_channels.slack_payload(d))
    discord = json.dumps(digest_channels.discord_payload(d))
    for text in (slack, discord, digest.to_text(d)):
        assert "1,234" in text and "+234 (+23.4 %)" in text        # requests against 1,000
        assert "+12 (new)" in text                                     # errors against 0
        assert "$0.1234" in text and "-$0.0766 (-38.3 %)" in text


def test_email_has_a_text_and_an_html_part():
    msg = digest_channels.email_message(sample_digest(), "digest@example.com", ["a@example.com", "b@example.com"])
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in parsed.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    text = parsed.get_body(("plain",)).get_content()
    page = parsed.get_body(("html",)).get_content()
    assert "Requests" in text and "1,234" in text and "Top tokens" in text
    assert "Acme &lt;web&gt; &amp; co" in page and "<web>" not in page
    assert parsed["Subject"] == "API usage digest, all tokens: 2026-03-03"
    assert parsed["To"] == "a@example.com, b@example.com" and parsed["Auto-Submitted"] == "auto-generated"


# -- settings --------------------------------------------------------------------------------------
SECRET_URL = "https://hooks.slack.com/services/T000/B000/SECRETSECRETSECRET"


def test_channel_secrets_from_files(tmp_path):
    f = tmp_path / "slack"
    f.write_text(SECRET_URL + "\n")
    pw = tmp_path / "pw"
    pw.write_text("smtp-pass-word")
    s = load_settings(environ={"ATE_DIGEST_SLACK_WEBHOOK_URL_FILE": str(f), "ATE_DIGEST_SMTP_PASSWORD_FILE": str(pw),
                               "ATE_DIGEST_SMTP_USER": "me", "ATE_DIGEST_SMTP_HOST": "mail.example.com",
                               "ATE_DIGEST_SMTP_FROM": "d@example.com", "ATE_DIGEST_EMAIL_TO": "a@example.com, b@example.com"})
    assert s.digest_slack_webhook_url == SECRET_URL and s.digest_smtp_password == "smtp-pass-word"
    assert s.digest_email_to == ["a@example.com", "b@example.com"]
    assert digest_settings.configured(s) == ["slack", "email"]
    assert digest_settings.configured(s, ["email", "discord"]) == ["email"]
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"digest_discord_webhook_url_file: {f}\n")
    assert load_settings(str(cfg), environ={}).digest_discord_webhook_url == SECRET_URL


@pytest.mark.parametrize("values,message", [
    ({"digest_schedule": "hourly"}, "digest_schedule must be off, daily or weekly"),
    ({"digest_time": "25:00"}, "digest_time must be HH:MM"),
    ({"digest_weekday": "someday"}, "digest_weekday must be a day"),
    ({"digest_scope": "tenant"}, "digest_scope must be overall or per-tenant"),
    ({"digest_top_n": 0}, "digest_top_n must be from 1 to 25"),
    ({"digest_slack_webhook_url": "hooks.slack.com/services/SECRETSECRET"}, "must be an http:// or https:// URL"),
    ({"digest_email_to": ["a@example.com"]}, "digest_email_to needs digest_smtp_host"),
    ({"digest_email_to": ["a@example.com"], "digest_smtp_host": "h"}, "needs digest_smtp_from"),
    ({"digest_email_to": ["not-an-address"], "digest_smtp_host": "h", "digest_smtp_from": "d@x.org"}, "is not an address"),
    ({"digest_smtp_user": "me"}, "digest_smtp_user and digest_smtp_password go together"),
    ({"digest_smtp_user": "me", "digest_smtp_password": "SECRETSECRET", "digest_smtp_host": "mail.example.com",
      "digest_smtp_tls": "none"}, "in clear to mail.example.com"),
    ({"digest_smtp_tls": "tls"}, "digest_smtp_tls must be starttls, ssl or none"),
    ({"digest_schedule": "daily", "digest_webhook_url": "http://127.0.0.1:9/h"}, "digest_schedule needs prometheus_url"),
    ({"digest_schedule": "daily", "prometheus_url": "http://127.0.0.1:9"}, "digest_schedule needs a channel"),
    ({"digest_schedule": "daily", "prometheus_url": "http://127.0.0.1:9", "digest_webhook_url": "http://127.0.0.1:9/h",
      "digest_scope": "per-tenant"}, "per-tenant needs keys_file"),
])
def test_bad_digest_settings_are_named_without_their_secret(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(environ={}, **values)
    assert "SECRETSECRET" not in str(info.value)


def test_plain_smtp_with_a_password_is_allowed_to_loopback_only():
    s = load_settings(environ={}, digest_smtp_user="me", digest_smtp_password="pw", digest_smtp_host="127.0.0.1",
                      digest_smtp_tls="none")
    assert s.digest_smtp_tls == "none"


# -- delivery without servers -------------------------------------------------------------------
def test_a_failing_channel_does_not_stop_the_others_and_shows_no_secret(tmp_path):
    s = load_settings(environ={}, digest_slack_webhook_url=SECRET_URL, digest_webhook_url="http://127.0.0.1:9/x?k=SECRETSECRET",
                      digest_webhook_token="tok-SECRETSECRET")
    posted = []

    def post(url, payload, token=None):
        posted.append(url)
        if "slack" in url:
            return f"hooks.slack.com answered HTTP 404: no_service for {url} and {SECRET_URL}"   # a hostile echo
        return ""
    results = digest_channels.deliver(sample_digest(), s, ["slack", "webhook"], post=post)
    assert [(r.channel, r.ok) for r in results] == [("slack", False), ("webhook", True)]
    assert len(posted) == 2
    assert "SECRET" not in str(results[0]) and "404" in str(results[0])


def test_post_json_retries_a_busy_receiver_once_and_never_shows_the_url():
    hits = []

    def app(environ, start_response):
        hits.append(environ["PATH_INFO"])
        status = "503 Service Unavailable" if len(hits) == 1 else "400 Bad Request"
        return Response(f"bad request to {environ['PATH_INFO']}", status=status, headers={"Retry-After": "0"})(
            environ, start_response)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/services/T0/B0/SECRETSECRET"
        problem = digest_channels.post_json(url, {"text": "x"}, sleep=lambda s: None)
        assert len(hits) == 2 and "HTTP 400" in problem
        s = load_settings(environ={}, digest_slack_webhook_url=url)
        assert "SECRETSECRET" not in digest_channels.scrub(problem, s)
        closed = digest_channels.post_json(f"http://127.0.0.1:{server.server_port + 1 if server.server_port < 65535 else 1}"
                                           "/SECRETSECRET", {}, sleep=lambda s: None)
        assert closed.startswith("cannot reach 127.0.0.1") and "SECRET" not in closed
    finally:
        server.shutdown()


# -- the schedule's memory --------------------------------------------------------------------------
class FakeBuild:
    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(digest, "build_digest", self)

    def __call__(self, client, period, audience, keystore, alerts, top_n, now=None, deadline=None):
        self.calls.append((period.key, audience.key))
        return sample_digest()


def schedule_settings(tmp_path, **extra):
    return load_settings(environ={}, prometheus_url="http://127.0.0.1:9", digest_schedule="daily",
                         digest_webhook_url="http://127.0.0.1:9/hook", digest_slack_webhook_url=SECRET_URL,
                         state_dir=str(tmp_path / "state"), **extra)


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_a_period_goes_to_each_channel_once(tmp_path, monkeypatch, backend):
    build = FakeBuild(monkeypatch)
    s = schedule_settings(tmp_path)
    state = digest_schedule.FileState(s.state_dir) if backend == "file" else digest_schedule.MemoryState()
    outcomes = {"webhook": True, "slack": False}
    sent = []

    def deliver(doc, settings, channels):
        sent.extend(channels)
        return [digest_channels.Delivery(c, outcomes[c], "" if outcomes[c] else "HTTP 500") for c in channels]
    sched = digest_schedule.DigestScheduler(s, state=state, client=object(), alerts=None, deliver=deliver)
    now = ts("2026-03-04T08:00:05")
    assert sched.run_once(now) == {"overall": ["webhook"]}
    assert sent == ["slack", "webhook"]
    assert sched.run_once(now + 30) == {}                 # slack waits a minute before its second try
    assert sent == ["slack", "webhook"]
    outcomes["slack"] = True
    assert sched.run_once(now + 61) == {"overall": ["slack"]}
    assert sent == ["slack", "webhook", "slack"]           # the webhook did not get it twice
    assert sched.run_once(now + 3600) == {}
    assert len(build.calls) == 2
    if backend == "file":                                  # a restart remembers
        again = digest_schedule.DigestScheduler(s, state=digest_schedule.FileState(s.state_dir), client=object(),
                                                alerts=None, deliver=deliver)
        assert again.run_once(now + 7200) == {}
    # the next day is a new period
    assert sched.run_once(now + DAY) == {"overall": ["slack", "webhook"]}


def test_a_channel_that_keeps_failing_is_given_up_after_five_tries(tmp_path, monkeypatch):
    FakeBuild(monkeypatch)
    s = schedule_settings(tmp_path)
    tries = []

    def deliver(doc, settings, channels):
        tries.extend(channels)
        return [digest_channels.Delivery(c, c == "webhook", "" if c == "webhook" else "down") for c in channels]
    sched = digest_schedule.DigestScheduler(s, state=digest_schedule.MemoryState(), client=object(), alerts=None,
                                            deliver=deliver)
    now = ts("2026-03-04T09:00:00")
    for minute in range(0, 20 * 60):                  # within the day, before the next period
        sched.run_once(now + minute * 60)
    assert tries.count("slack") == digest_schedule.MAX_ATTEMPTS and tries.count("webhook") == 1


def test_two_workers_at_once_send_once(tmp_path, monkeypatch):
    FakeBuild(monkeypatch)
    s = schedule_settings(tmp_path)
    sent, gate = [], threading.Barrier(4)

    def deliver(doc, settings, channels):
        time.sleep(0.2)                                    # the others try meanwhile
        sent.extend(channels)
        return [digest_channels.Delivery(c, True) for c in channels]
    workers = [digest_schedule.DigestScheduler(s, state=digest_schedule.FileState(s.state_dir), client=object(),
                                               alerts=None, deliver=deliver) for _ in range(4)]
    now = ts("2026-03-04T08:00:05")

    def run(w):
        gate.wait()
        w.run_once(now)
    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in workers:                                      # and each again, afterwards
        w.run_once(now + 1)
    assert sorted(sent) == ["slack", "webhook"]


def test_the_database_lease_and_memory(tmp_path, monkeypatch):
    FakeBuild(monkeypatch)
    from api_token_exporter.alerting.store import AlertHistory
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    s = schedule_settings(tmp_path, alert_db_url=url)
    assert isinstance(digest_schedule.state_for(s), digest_schedule.DatabaseState)
    sent = []

    def deliver(doc, settings, channels):
        sent.extend(channels)
        return [digest_channels.Delivery(c, True) for c in channels]
    a = digest_schedule.DigestScheduler(s, state=digest_schedule.state_for(s), client=object(), alerts=None,
                                        deliver=deliver)
    b = digest_schedule.DigestScheduler(s, state=digest_schedule.state_for(s), client=object(), alerts=None,
                                        deliver=deliver)
    other = AlertHistory(url)
    assert other.try_lease("digest", "someone-else", 60)
    assert a.run_once(ts("2026-03-04T08:00:05")) is None              # held by another replica
    other.release_lease("digest", "someone-else")
    assert a.run_once(ts("2026-03-04T08:00:05")) == {"overall": ["slack", "webhook"]}
    assert b.run_once(ts("2026-03-04T08:10:00")) == {}
    assert sorted(sent) == ["slack", "webhook"]


# ================================================================================================
# Integration: known traffic in a real Prometheus, the project's sinks
# ================================================================================================
from api_token_exporter.core.keystore import add_key                                     # noqa: E402
from api_token_exporter.core.pricing import Pricing                                      # noqa: E402
from api_token_exporter.web.server import create_app                                    # noqa: E402
from devstack.sinks import SmtpSink, WebhookSink                          # noqa: E402
from devstack.stack import find_binary, free_port, prometheus_config, start_prometheus  # noqa: E402
from api_token_exporter.core.usage import LLMUsage                                       # noqa: E402
from support import needs, run_cli

KEYS = {"acme-web": ("Acme <web> & co", "acme", {}), "acme-batch": ("Batch", "acme", {"daily": 0.01}),
        "globex-bot": ("Globex bot", "globex", {"monthly": 100.0})}
RULES = """groups:
- name: digest-test
  rules:
  - alert: DigestTestServerErrors
    expr: sum by (token) (apitoken_requests_total{code=~"5..", token="globex-bot"}) > 0
    labels: {severity: critical}
  - alert: DigestTestTrafficAnomaly
    expr: sum by (token) (apitoken_requests_total{token="acme-web"}) > 0
    labels: {severity: warning, anomaly: traffic}
"""


def event(token, route, status, method="GET", llm=None):
    e = {"token": token, "route": route, "method": method, "status": status, "duration_ms": 5}
    if llm:
        service, model, inp, out = llm
        e["llm"] = {"service": service, "model": model, "input_tokens": inp, "output_tokens": out}
    return e


GPT = ("openai", "gpt-4o", 100, 50)
BATCH_A = ([event("acme-web", "/orders/{id}", 200)] * 5 + [event("acme-web", "/orders/{id}", 500)]
           + [event("globex-bot", "/search", 200)] * 3 + [event("globex-bot", "/v1/complete", 200, "POST", GPT)])
CLAUDE = ("anthropic", "claude-sonnet-4-5", 1000, 200)
GPT_B = ("openai", "gpt-4o", 300, 100)
BATCH_B = ([event("acme-web", "/orders/{id}", 200)] * 8 + [event("acme-web", "/orders/{id}", 404)] * 2
           + [event("acme-batch", "/v1/complete", 200, "POST", CLAUDE)] * 3
           + [event("globex-bot", "/search", 200)] * 6 + [event("globex-bot", "/search", 503)]
           + [event("globex-bot", "/v1/complete", 200, "POST", GPT_B)] * 2)


def llm_cost(events, tokens=None):
    pricing = Pricing.load()
    total = 0.0
    for e in events:
        if "llm" in e and (tokens is None or e["token"] in tokens):
            u = LLMUsage(e["llm"]["service"], e["llm"]["model"], e["llm"]["input_tokens"], e["llm"]["output_tokens"])
            total += pricing.price(u.service, u.model).cost(u)
    return total


def prom_value(prom_url, expr):
    result = requests.post(prom_url + "/api/v1/query", data={"query": expr}, timeout=5).json()["data"]["result"]
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in result}


@pytest.fixture(scope="module")
@needs("prometheus")
def world(tmp_path_factory):
    if not find_binary("prometheus"):
        pytest.fail("prometheus is not installed: run .ci/install")
    tmp = tmp_path_factory.mktemp("digest")
    keys_file = str(tmp / "keys.yml")
    for token, (name, tenant, budget) in KEYS.items():
        add_key(keys_file, token, name=name, tenant=tenant, budget_usd=budget)
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "digest-test.yml").write_text(RULES)
    exporter_port = free_port()
    prom = start_prometheus(str(tmp / "prom"), prometheus_config(
        {"api-token-exporter": [f"127.0.0.1:{exporter_port}"]}, None, str(rules),
        scrape_interval="1s", evaluation_interval="1s"))
    app = create_app(keys_file=keys_file, ingest_token="ingest-secret", admin_token="admin-secret",
                     prometheus_url=prom.url, analytics_cache_seconds=0)
    server = make_server("127.0.0.1", exporter_port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    exporter = f"http://127.0.0.1:{exporter_port}"
    webhook, smtp = WebhookSink().start(), SmtpSink().start()

    def ingest(events, total):
        r = requests.post(exporter + "/v1/events", json={"events": events}, timeout=10,
                          headers={"Authorization": "Bearer ingest-secret"})
        assert r.json()["accepted"] == len(events), r.text
        deadline = time.monotonic() + 30
        while sum(prom_value(prom.url, 'sum(apitoken_requests_total{token!~"__.*__"})').values()) != total:
            assert time.monotonic() < deadline, "Prometheus never saw the counts"
            time.sleep(0.3)
        time.sleep(1.2)

    try:
        t0 = float(int(time.time()))
        ingest(BATCH_A, len(BATCH_A))
        t1 = float(int(time.time()))
        ingest(BATCH_B, len(BATCH_A) + len(BATCH_B))
        deadline = time.monotonic() + 30
        while len(prom_value(prom.url, 'ALERTS{alertstate="firing", alertname=~"DigestTest.*"}')) < 2:
            assert time.monotonic() < deadline, "the test alerts never fired"
            time.sleep(0.3)
        time.sleep(1.2)
        while time.time() - t1 < (t1 - t0) + 3:          # the previous period holds all of batch A
            time.sleep(0.2)
        t2 = float(int(time.time()))
        yield {"prom": prom, "exporter": exporter, "keys_file": keys_file, "tmp": tmp, "webhook": webhook,
               "smtp": smtp, "start": analytics.iso(t1), "end": analytics.iso(t2), "t1": t1, "t2": t2}
    finally:
        webhook.stop()
        smtp.stop()
        server.shutdown()
        prom.stop()


def cli(*args, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ATE_")}
    full_env.update(env or {})
    return run_cli(*args, env=full_env, cwd=cwd, timeout=180)


def digest_json(world, *extra, env=None):
    r = cli("digest", "--start", world["start"], "--end", world["end"], "--prometheus-url", world["prom"].url,
            "--keys-file", world["keys_file"], "--dry-run", "--format", "json", *extra, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def report_json(world, *extra):
    r = cli("report", "--start", world["start"], "--end", world["end"], "--prometheus-url", world["prom"].url,
            "--keys-file", world["keys_file"], "--format", "json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.integration
def test_digest_numbers_equal_the_report_and_what_was_sent(world):
    d = digest_json(world)
    rep = report_json(world, "--compare", "previous")
    # the LLM part is the report's, number for number
    s = rep["summary"]
    assert (d["llm"]["totalTokens"], d["llm"]["promptTokens"], d["llm"]["completionTokens"]) == \
        (s["totalTokens"], s["promptTokens"], s["completionTokens"]) == (4400, 3600, 800)
    assert d["llm"]["estimatedCost"] == s["estimatedCost"]
    assert d["llm"]["estimatedCost"] == pytest.approx(llm_cost(BATCH_B), abs=1e-6)
    assert d["llm"]["requests"] == sum(m["requestCount"] for m in rep["byModel"]) == 5
    by_model = {m["model"]: m for m in rep["byModel"]}
    for m in d["llm"]["topModels"]:
        assert (m["totalTokens"], m["requestCount"]) == (by_model[m["model"]]["totalTokens"],
                                                         by_model[m["model"]]["requestCount"])
        assert m["estimatedCost"] == pytest.approx(by_model[m["model"]]["estimatedCost"], abs=1e-9)
    # the comparison is the report's --compare previous
    for name in ("requests", "tokens", "cost"):
        assert d["change"][name] == rep["comparison"][name], name
    assert rep["comparison"]["period"] == {"start": world["start"], "end": world["end"]}
    assert d["period"]["start"] == world["start"] and d["period"]["end"] == world["end"]
    assert d["previousPeriod"]["end"] == world["start"]
    # HTTP requests and errors, exactly as sent
    assert d["requests"] == {"total": 22, "errors": 3, "serverErrors": 1, "errorRate": round(3 / 22, 4), "tokensUsed": 3}
    assert d["change"]["requests"] == {"current": 22, "previous": 10, "change": 12, "changePercent": 120.0}
    assert d["change"]["errors"] == {"current": 3, "previous": 1, "change": 2, "changePercent": 200.0}
    assert d["change"]["serverErrors"] == {"current": 1, "previous": 1, "change": 0, "changePercent": 0.0}
    assert d["change"]["tokens"] == {"current": 4400, "previous": 150, "change": 4250, "changePercent": 2833.33}
    assert d["change"]["cost"]["previous"] == pytest.approx(llm_cost(BATCH_A), abs=1e-6)
    assert [(t["token"], t["requests"], t["errors"], t["previousRequests"]) for t in d["topTokens"]] == \
        [("acme-web", 10, 2, 6), ("globex-bot", 9, 1, 4), ("acme-batch", 3, 0, 0)]
    assert d["topTokens"][0]["name"] == "Acme <web> & co" and d["topTokens"][0]["tenant"] == "acme"
    assert d["topTokens"][2]["llmTokens"] == 3600 and d["topTokens"][2]["requestsChangePercent"] is None
    assert [(e["route"], e["requests"], e["errors"]) for e in d["topEndpoints"]] == \
        [("/orders/{id}", 10, 2), ("/search", 7, 1), ("/v1/complete", 5, 0)]
    budgets = {(b["token"], b["period"]): b for b in d["budgets"]}
    assert set(budgets) == {("acme-batch", "daily"), ("globex-bot", "monthly")}
    daily = budgets[("acme-batch", "daily")]
    assert daily["spentUsd"] == pytest.approx(llm_cost(BATCH_B, {"acme-batch"}), abs=1e-6)
    assert daily["level"] == "exhausted" and daily["usedRatio"] == pytest.approx(daily["spentUsd"] / 0.01, abs=1e-4)
    assert budgets[("globex-bot", "monthly")]["spentUsd"] == \
        pytest.approx(llm_cost(BATCH_A + BATCH_B, {"globex-bot"}), abs=1e-6)
    al = d["alerts"]
    assert al["source"] == "prometheus"
    assert {(g["alertname"], g["severity"]) for g in al["byName"]} == \
        {("DigestTestServerErrors", "critical"), ("DigestTestTrafficAnomaly", "warning")}
    assert al["anomalies"] == 1 and al["bySeverity"] == {"critical": 1, "warning": 1}
    # and the table and CSV forms of the comparison
    table = cli("report", "--start", world["start"], "--end", world["end"], "--prometheus-url", world["prom"].url,
                "--compare", "previous")
    assert "AGAINST THE PREVIOUS PERIOD" in table.stdout and "+12 (+120.0 %)" in table.stdout
    csv_out = cli("report", "--start", world["start"], "--end", world["end"], "--prometheus-url", world["prom"].url,
                  "--compare", "previous", "--format", "csv")
    assert csv_out.stdout.splitlines()[:2] == ["metric,current,previous,change,change_percent", "requests,22,10,12,120.00"]


@pytest.mark.integration
def test_a_tenants_digest_has_only_its_tokens(world):
    d = digest_json(world, "--tenant", "acme")
    assert d["scope"] == {"tenant": "acme", "tokens": 2}
    assert {t["token"] for t in d["topTokens"]} == {"acme-web", "acme-batch"}
    assert all(t["tenant"] == "acme" for t in d["topTokens"])
    assert d["requests"]["total"] == 13 and d["change"]["requests"]["previous"] == 6
    assert d["llm"]["totalTokens"] == 3600 and "gpt-4o" not in json.dumps(d["llm"])
    assert [b["token"] for b in d["budgets"]] == ["acme-batch"]
    assert [g["alertname"] for g in d["alerts"]["byName"]] == ["DigestTestTrafficAnomaly"]
    assert "/search" not in json.dumps(d) and "globex" not in json.dumps(d)
    rep = report_json(world, "--tenant", "acme", "--compare", "previous")
    assert rep["summary"]["totalTokens"] == d["llm"]["totalTokens"]
    for name in ("requests", "tokens", "cost"):
        assert d["change"][name] == rep["comparison"][name], name
    bad = cli("digest", "--tenant", "initech", "--keys-file", world["keys_file"], "--dry-run",
              "--prometheus-url", world["prom"].url)
    assert bad.returncode == 2 and "no key of tenant 'initech'" in bad.stderr


def channel_config(world, tmp, name, **extra):
    """A settings file whose channel secrets are in files, as in production."""
    sink = world["webhook"].url
    secrets = {"slack": f"{sink}/slack/T0DIGEST/B0DIGEST/SLACKSECRETSLACKSECRET",
               "discord": f"{sink}/discord/api/webhooks/1234567890/DISCORDSECRETDISCORDSECRET",
               "token": "WEBHOOKTOKENSECRET"}
    secrets.update(extra.pop("secrets", {}))
    files = {}
    for key, value in secrets.items():
        files[key] = tmp / f"{name}-{key}"
        files[key].write_text(value + "\n")
    doc = {"keys_file": world["keys_file"], "prometheus_url": world["prom"].url,
           "digest_slack_webhook_url_file": str(files["slack"]), "digest_discord_webhook_url_file": str(files["discord"]),
           "digest_webhook_url": f"{sink}/hook/{name}", "digest_webhook_token_file": str(files["token"]),
           "digest_email_to": ["ops@example.com", "finance@example.com"], "digest_smtp_host": "127.0.0.1",
           "digest_smtp_port": world["smtp"].port, "digest_smtp_tls": "none", "digest_smtp_from": "digest@example.com"}
    doc.update(extra)
    path = tmp / f"{name}.yml"
    path.write_text(json.dumps(doc))
    return str(path), secrets


def mails_since(world, count):
    return world["smtp"].messages[count:]


@pytest.mark.integration
def test_delivered_to_slack_discord_webhook_and_email(world, tmp_path):
    config, secrets = channel_config(world, tmp_path, "all")
    hooks_before, mails_before = len(world["webhook"].posts()), len(world["smtp"].messages)
    r = cli("digest", "--start", world["start"], "--end", world["end"], env={"ATE_CONFIG": config})
    assert r.returncode == 0, r.stderr
    for channel in ("slack", "discord", "email", "webhook"):
        assert f"{channel}: sent" in r.stderr
    posts = world["webhook"].posts()[hooks_before:]
    by_kind = {p["path"].split("/")[1]: p for p in posts}
    assert set(by_kind) == {"slack", "discord", "hook"} and len(posts) == 3
    check_slack(by_kind["slack"]["body"])
    check_discord(by_kind["discord"]["body"])
    slack_text = json.dumps(by_kind["slack"]["body"])
    assert "22" in by_kind["slack"]["body"]["text"] and "Acme &lt;web&gt; &amp; co" in slack_text
    hook = by_kind["hook"]
    assert hook["authorization"] == "Bearer WEBHOOKTOKENSECRET"
    expected = digest_json(world)
    for doc in (hook["body"], expected):
        doc.pop("generatedAt")
    assert hook["body"] == expected                     # the generic webhook gets the digest document
    mails = mails_since(world, mails_before)
    assert len(mails) == 1
    msg = mails[0]
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert str(msg["Subject"]).strip() == expected["title"]       # (a long subject is folded)
    assert str(msg["To"]) == "ops@example.com, finance@example.com"
    text = msg.get_body(("plain",)).get_content()
    page = msg.get_body(("html",)).get_content()
    assert "Requests" in text and "22" in text and "+12 (+120.0 %)" in text
    assert "Acme &lt;web&gt; &amp; co" in page and "+12 (+120.0 %)" in page
    assert world["smtp"].find(lambda m: m is msg)[0]["body"].startswith(expected["title"])
    everything = r.stdout + r.stderr + json.dumps(posts) + msg.as_string()
    for secret in ("SLACKSECRETSLACKSECRET", "DISCORDSECRETDISCORDSECRET"):
        assert secret not in everything.replace(by_kind["slack"]["path"], "").replace(by_kind["discord"]["path"], "")


@pytest.mark.integration
def test_dry_run_sends_nothing(world, tmp_path):
    config, _ = channel_config(world, tmp_path, "dry")
    hooks_before, mails_before = len(world["webhook"].posts()), len(world["smtp"].messages)
    for fmt in ("text", "slack", "discord", "email", "json"):
        r = cli("digest", "--start", world["start"], "--end", world["end"], "--dry-run", "--format", fmt,
                env={"ATE_CONFIG": config})
        assert r.returncode == 0, r.stderr
        if fmt == "slack":
            check_slack(json.loads(r.stdout))
        elif fmt == "discord":
            check_discord(json.loads(r.stdout))
        elif fmt == "email":
            assert "multipart/alternative" in r.stdout and "text/html" in r.stdout
        elif fmt == "text":
            assert r.stdout.startswith("API usage digest, all tokens") and "Top endpoints" in r.stdout
    time.sleep(0.5)
    assert len(world["webhook"].posts()) == hooks_before and len(world["smtp"].messages) == mails_before


@pytest.mark.integration
def test_per_tenant_digests_each_go_out(world, tmp_path):
    config, _ = channel_config(world, tmp_path, "tenants", digest_scope="per-tenant")
    before = len(world["webhook"].posts())
    r = cli("digest", "--start", world["start"], "--end", world["end"], "--channel", "webhook",
            env={"ATE_CONFIG": config})
    assert r.returncode == 0, r.stderr
    bodies = [p["body"] for p in world["webhook"].posts()[before:]]
    assert sorted(b["scope"]["tenant"] for b in bodies) == ["acme", "globex"]
    for b in bodies:
        own = {t for t, (_, tenant, _) in KEYS.items() if tenant == b["scope"]["tenant"]}
        assert {t["token"] for t in b["topTokens"]} <= own


def echo_server():
    """A receiver that refuses everything and echoes the path it was called on."""
    def app(environ, start_response):
        return Response(f"no such hook {environ['PATH_INFO']}", status=404)(environ, start_response)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.integration
def test_failures_are_reported_without_secrets(world, tmp_path):
    echo = echo_server()
    try:
        closed = free_port()
        config, secrets = channel_config(
            world, tmp_path, "failing",
            secrets={"slack": f"http://127.0.0.1:{closed}/services/T0/B0/SLACKSECRETSLACKSECRET",
                     "discord": f"http://127.0.0.1:{echo.server_port}/api/webhooks/99/DISCORDSECRETDISCORDSECRET"},
            digest_smtp_user="digest", digest_smtp_password="SMTPPASSWORDSECRET")
        before = len(world["webhook"].posts())
        r = cli("digest", "--start", world["start"], "--end", world["end"], env={"ATE_CONFIG": config})
        assert r.returncode == 4
        assert "slack: FAILED (cannot reach 127.0.0.1" in r.stderr
        assert "discord: FAILED (127.0.0.1 answered HTTP 404" in r.stderr
        assert "email: FAILED" in r.stderr and "webhook: sent" in r.stderr
        assert len(world["webhook"].posts()) == before + 1           # the others still went out
        for secret in ("SLACKSECRETSLACKSECRET", "DISCORDSECRETDISCORDSECRET", "SMTPPASSWORDSECRET",
                       "WEBHOOKTOKENSECRET", "/api/webhooks/99"):
            assert secret not in r.stdout + r.stderr, secret
    finally:
        echo.shutdown()


@pytest.mark.integration
def test_usage_api_compares_with_the_previous_period(world):
    admin = {"Authorization": "Bearer admin-secret"}
    plain = requests.get(world["exporter"] + "/api/analytics/usage", headers=admin, timeout=60).json()
    assert set(plain) == {"summary", "trends", "predictions", "generatedAt"}
    doc = requests.get(world["exporter"] + "/api/analytics/usage", params={"compare": "previous"}, headers=admin,
                       timeout=60).json()
    assert set(doc) == {"summary", "trends", "predictions", "generatedAt", "comparison"}
    assert set(doc["comparison"]) == {"today", "thisWeek", "thisMonth"}
    for period in ("today", "thisWeek", "thisMonth"):
        c = doc["comparison"][period]
        for name in ("requests", "tokens", "cost"):
            assert c[name]["current"] == doc["summary"][period][name]
            assert set(c[name]) == {"current", "previous", "change", "changePercent"}
    today = doc["comparison"]["today"]
    assert today["requests"] == {"current": 32, "previous": 0, "change": 32, "changePercent": None}
    assert today["tokens"]["current"] == 4550 and today["tokens"]["changePercent"] is None
    now = dt.datetime.now(dt.timezone.utc)
    assert today["previousPeriod"]["start"] == (now - dt.timedelta(days=1)).strftime("%Y-%m-%dT00:00:00.000Z")
    r = requests.get(world["exporter"] + "/api/analytics/usage", params={"compare": "lastyear"}, headers=admin, timeout=10)
    assert r.status_code == 400 and "compare must be 'previous'" in r.json()["detail"]
    tenant = requests.get(world["exporter"] + "/api/analytics/usage", params={"compare": "previous"}, timeout=60,
                          headers={"X-API-Key": "nope"})
    assert tenant.status_code == 401


@pytest.mark.integration
def test_the_schedule_sends_a_period_once(world, tmp_path):
    from api_token_exporter.core.keystore import KeyStore
    config, _ = channel_config(world, tmp_path, "scheduled", digest_schedule="daily", digest_time="00:00",
                               state_dir=str(tmp_path / "state"))
    settings = load_settings(config, environ={})
    keystore = KeyStore(world["keys_file"])
    hooks_before, mails_before = len(world["webhook"].posts()), len(world["smtp"].messages)
    first = digest_schedule.DigestScheduler(settings, keystore)
    assert first.run_once() == {"overall": ["slack", "discord", "email", "webhook"]}
    second = digest_schedule.DigestScheduler(settings, keystore)          # another worker, or after a restart
    assert second.run_once() == {}
    assert first.run_once() == {}
    posts = world["webhook"].posts()[hooks_before:]
    assert len(posts) == 3 and len(world["smtp"].messages) == mails_before + 1
    hook = next(p["body"] for p in posts if p["path"].startswith("/hook/"))
    yesterday = digest.resolve_period("day", None, None, time.time())
    assert hook["period"]["label"] == yesterday.label
    # yesterday had nothing; the digest says so rather than failing
    assert hook["requests"]["total"] == 0 and hook["topTokens"] == []
    for p in posts:
        if p["path"].startswith("/slack/"):
            check_slack(p["body"])
        if p["path"].startswith("/discord/"):
            check_discord(p["body"])
    state = json.loads((tmp_path / "state" / "digest-state.json").read_text())
    assert list(state["periods"]) == [yesterday.key]
    assert "SLACKSECRET" not in json.dumps(state)


@pytest.mark.integration
def test_the_service_schedule_sends_once_from_two_workers(world, tmp_path):
    """`serve --workers 2`: each worker runs the schedule, one sends."""
    port = free_port()
    sink_path = f"/hook/service-{port}"
    env = {"ATE_KEYS_FILE": world["keys_file"], "ATE_PROMETHEUS_URL": world["prom"].url,
           "ATE_DIGEST_SCHEDULE": "daily", "ATE_DIGEST_TIME": "00:00",
           "ATE_DIGEST_WEBHOOK_URL": world["webhook"].url + sink_path,
           "PATH": os.environ.get("PATH", "")}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "api_token_exporter.cli", "serve", "--workers", "2", "--port",
                             str(port), "--state-dir", str(tmp_path / "state")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not world["webhook"].posts(sink_path):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        state_file = tmp_path / "state" / "digest-state.json"
        deadline = time.monotonic() + 30
        while not state_file.exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(8)                 # both workers' first checks (5 s after each started) are over
        assert len(world["webhook"].posts(sink_path)) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture
def tls_smtp(tmp_path, monkeypatch):
    """An SMTP server with STARTTLS (or implicit TLS) and a login, its certificate trusted here."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult
    import ssl
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))          # ssl.create_default_context() trusts it
    received, logins, controllers = [], [], []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"right-password", handled=False)   # False: 535 on a refusal

    def start(implicit: bool):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        port = free_port()
        # implicit TLS is below aiosmtpd's SMTP, which then cannot tell that AUTH is over TLS
        options = {"ssl_context": context, "auth_require_tls": False} if implicit else \
            {"tls_context": context, "require_starttls": True}
        controller = Controller(Handler(), hostname="127.0.0.1", port=port, auth_required=True,
                                authenticator=authenticator, server_hostname="127.0.0.1",
                                auth_exclude_mechanism=["LOGIN"], **options)
        controller.start()
        controllers.append(controller)
        return port

    yield start, received, logins
    for c in controllers:
        c.stop()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_email_over_tls_with_a_login(tls_smtp, mode):
    start, received, logins = tls_smtp
    port = start(implicit=mode == "ssl")
    s = load_settings(environ={}, digest_email_to=["ops@example.com"], digest_smtp_host="127.0.0.1",
                      digest_smtp_port=port, digest_smtp_tls=mode, digest_smtp_from="digest@example.com",
                      digest_smtp_user="digest", digest_smtp_password="right-password")
    [result] = digest_channels.deliver(sample_digest(), s, ["email"])
    assert result.ok, result.detail
    assert logins == [(b"digest", b"right-password")] and len(received) == 1
    assert [p.get_content_type() for p in received[0].iter_parts()] == ["text/plain", "text/html"]
    wrong = load_settings(environ={}, digest_email_to=["ops@example.com"], digest_smtp_host="127.0.0.1",
                          digest_smtp_port=port, digest_smtp_tls=mode, digest_smtp_from="digest@example.com",
                          digest_smtp_user="digest", digest_smtp_password="wrong-password-SECRET")
    [refused] = digest_channels.deliver(sample_digest(), wrong, ["email"])
    assert not refused.ok and "535" in refused.detail and "SECRET" not in str(refused)
    assert len(received) == 1


@pytest.mark.integration
def test_the_schedule_logs_failures_without_secrets(world, tmp_path, caplog):
    import logging
    from api_token_exporter.core.keystore import KeyStore
    caplog.set_level(logging.DEBUG)
    echo = echo_server()
    try:
        config, _ = channel_config(
            world, tmp_path, "scheduled-failing", digest_schedule="daily", digest_time="00:00",
            state_dir=str(tmp_path / "state"),
            secrets={"slack": f"http://127.0.0.1:{free_port()}/services/T0/B0/SLACKSECRETSLACKSECRET",
                     "discord": f"http://127.0.0.1:{echo.server_port}/api/webhooks/99/DISCORDSECRETDISCORDSECRET"})
        sched = digest_schedule.DigestScheduler(load_settings(config, environ={}), KeyStore(world["keys_file"]))
        assert sched.run_once() == {"overall": ["email", "webhook"]}
        state = json.loads((tmp_path / "state" / "digest-state.json").read_text())
        entries = next(iter(state["periods"].values()))["overall"]
        assert entries["slack"]["attempts"] == 1 and entries["discord"]["attempts"] == 1
        assert "to slack failed (attempt 1 of 5): cannot reach 127.0.0.1" in caplog.text
        assert "to discord failed (attempt 1 of 5): 127.0.0.1 answered HTTP 404" in caplog.text
        # every log line of this process, third-party clients' too, but the test's own receivers'
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name not in ("werkzeug", "mail.log"))
        assert "failed (attempt 1 of 5)" in ours
        for secret in ("SLACKSECRETSLACKSECRET", "DISCORDSECRETDISCORDSECRET", "WEBHOOKTOKENSECRET", "/api/webhooks/99"):
            assert secret not in ours and secret not in json.dumps(state), secret
    finally:
        echo.shutdown()
