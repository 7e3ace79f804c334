"""Digest channels: a digest document (digest.py) as a Slack message (Block Kit), a Discord
message (embeds), an email (multipart/alternative: text and HTML) and a generic webhook (the
document itself), and their delivery.

The payloads keep the limits Slack and Discord document (docs/digests.md lists them and where
they come from): a longer text is cut with an ellipsis, never refused by the receiver. Webhook
URLs of Slack and Discord carry their secret in the path, so no message, log line or error here
shows a URL, a password or a token (``scrub``). The digest settings are checked where all
settings are (core/digest_settings.py).
"""
from __future__ import annotations

import datetime as dt
import html
import json
import re
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Callable, Iterable, List, Optional
from urllib.parse import urlsplit

from . import digest

FORMATS = ("text", "json", "slack", "discord", "email")
HTTP_TIMEOUT = 10.0
SMTP_TIMEOUT = 30.0
USER_AGENT = "api-token-exporter-digest/1"

# Slack Block Kit (docs.slack.dev/reference/block-kit/blocks, .../composition-objects/text-object)
SLACK_MAX_BLOCKS, SLACK_HEADER, SLACK_SECTION, SLACK_FIELDS, SLACK_FIELD = 50, 150, 3000, 10, 2000
SLACK_CONTEXT_ELEMENTS, SLACK_TEXT = 10, 3000
# Discord (discord.com/developers/docs/resources/message#embed-object-embed-limits, execute webhook)
DISCORD_CONTENT, DISCORD_TITLE, DISCORD_DESCRIPTION, DISCORD_FIELDS = 2000, 256, 4096, 25
DISCORD_FIELD_NAME, DISCORD_FIELD_VALUE, DISCORD_FOOTER, DISCORD_TOTAL, DISCORD_EMBEDS = 256, 1024, 2048, 6000, 10
COLOURS = {"ok": 0x2EB67D, "warning": 0xECB22E, "critical": 0xE01E5A}


def cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _secret_parts(value: str) -> List[str]:
    """A secret and, for a URL, the parts of it that carry the secret (a receiver may echo its
    path): the path, the query and each longer path segment, longest first."""
    parts = [value]
    if "://" in value:
        split = urlsplit(value)
        parts += [split.path, split.query, split.password or ""]
        parts += [seg for seg in split.path.split("/") if len(seg) >= 12]
    return sorted({p for p in parts if p and len(p) >= 4 and p != "/"}, key=len, reverse=True)


def scrub(text: str, settings, extra: Iterable[str] = ()) -> str:
    """``text`` without any URL and without the values of the digest's secrets."""
    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+", "<url>", text)
    secrets = list(extra)
    if settings is not None:
        secrets += [getattr(settings, name, None) or "" for name in (
            "digest_slack_webhook_url", "digest_discord_webhook_url", "digest_webhook_url",
            "digest_webhook_token", "digest_smtp_password")]
    for secret in secrets:
        for part in _secret_parts(secret) if secret else ():
            text = text.replace(part, "***")
    return text


# -- Slack ---------------------------------------------------------------------------------------
def slack_escape(text: str) -> str:
    """Slack's three control characters (docs.slack.dev: formatting text, escaping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _level(d: dict) -> str:
    severities = d["alerts"]["bySeverity"]
    if severities.get("critical") or any(b["level"] in ("critical", "exhausted") for b in d["budgets"]):
        return "critical"
    if d["alerts"]["total"] or any(b["level"] == "warning" for b in d["budgets"]):
        return "warning"
    return "ok"


def _sections(d: dict, escape: Callable[[str], str], code: Callable[[str], str]) -> List[tuple]:
    """(title, lines) of the lists every channel shows."""
    g = digest

    def named(e):
        extra = ", ".join(x for x in (e.get("name"), e.get("tenant")) if x)
        return code(e["token"]) + (f" {escape(extra)}" if extra else "")

    al = d["alerts"]
    alert_lines = [escape(g.alert_line(x)) for x in al["byName"]]
    if al.get("error"):
        alert_lines.append(escape(al["error"]))
    return [
        ("Top tokens", [f"{named(e)}: {escape(g.token_line(e))}" for e in d["topTokens"]]),
        ("Top endpoints", [f"{code(e['route'])}: {escape(g.endpoint_line(e))}" for e in d["topEndpoints"]]),
        ("Top models", [f"{code(m['service'] + '/' + m['model'])}: {escape(g.model_line(m))}" for m in d["llm"]["topModels"]]),
        ("Budgets", [f"{named(b)}: {escape(g.budget_line(b))}" for b in d["budgets"]]),
        ("Alerts and anomalies", [escape(g.alerts_heading(d))] + alert_lines),
    ]


def _lines_within(lines: List[str], limit: int, bullet: str) -> str:
    """As many whole lines as fit in ``limit`` characters, then how many were left out."""
    out: List[str] = []
    used = 0
    for i, line in enumerate(lines):
        rest = len(lines) - i - 1
        reserve = len(f"\n… and {rest} more") if rest else 0
        item = cut(bullet + line, max(20, limit - reserve))
        if out and used + len(item) + reserve > limit:
            out.append(f"… and {len(lines) - i} more")
            break
        out.append(item)
        used += len(item) + 1
    return "\n".join(out) or "none"


def slack_payload(d: dict) -> dict:
    """An incoming-webhook message: ``text`` (the notification and fallback) and ``blocks``."""
    g = digest
    p, q = d["period"], d["previousPeriod"]
    blocks: List[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": cut(d["title"], SLACK_HEADER), "emoji": False}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": cut(
            f"{p['start']} .. {p['end']} · against {q['start']} .. {q['end']}", SLACK_TEXT)}]},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": cut(f"*{label}*\n{slack_escape(value)}\n_{slack_escape(diff)}_", SLACK_FIELD)}
            for label, value, diff in g.headline(d)][:SLACK_FIELDS]},
        {"type": "divider"},
    ]
    for title, lines in _sections(d, slack_escape, lambda s: f"`{slack_escape(s)}`"):
        body = _lines_within(lines, SLACK_SECTION - len(title) - 4, "• ") if lines else "none"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": cut(f"*{title}*\n{body}", SLACK_SECTION)}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"api-token-exporter · {d['generatedAt']}"}]})
    r, llm = d["requests"], d["llm"]
    fallback = (f"{d['title']}: {r['total']:,} requests ({g.signed(d['change']['requests'])}), {r['errors']:,} errors, "
                f"{llm['totalTokens']:,} LLM tokens, ${llm['estimatedCost']:,.4f}, {d['alerts']['total']:,} alerts")
    return {"text": cut(slack_escape(fallback), SLACK_TEXT), "blocks": blocks[:SLACK_MAX_BLOCKS]}


# -- Discord -------------------------------------------------------------------------------------
def discord_escape(text: str) -> str:
    """Discord markdown characters escaped, and mentions made inert."""
    text = re.sub(r"([\\*_~`|>\[\]])", r"\\\1", text)
    return text.replace("@", "@\u200b")


def _embed_size(embed: dict) -> int:
    return (len(embed.get("title", "")) + len(embed.get("description", ""))
            + len(embed.get("footer", {}).get("text", "")) + len(embed.get("author", {}).get("name", ""))
            + sum(len(f["name"]) + len(f["value"]) for f in embed.get("fields", [])))


def discord_payload(d: dict) -> dict:
    """An execute-webhook body: ``content`` and one embed, within Discord's limits; no mention
    in it pings anyone (``allowed_mentions``)."""
    g = digest
    p, q = d["period"], d["previousPeriod"]
    fields = [{"name": label, "value": cut(f"{discord_escape(value)}\n{discord_escape(diff)}", DISCORD_FIELD_VALUE),
               "inline": True} for label, value, diff in g.headline(d)]
    n = d["alerts"]["anomalies"]
    fields.append({"name": "Alerts", "value": f"{d['alerts']['total']:,} ({n:,} {'anomaly' if n == 1 else 'anomalies'})",
                   "inline": True})
    for title, lines in _sections(d, discord_escape, lambda s: f"`{s.replace('`', '')}`"):
        fields.append({"name": title, "value": _lines_within(lines, DISCORD_FIELD_VALUE, "• ") if lines else "none",
                       "inline": False})
    embed = {
        "title": cut(d["title"], DISCORD_TITLE),
        "description": cut(f"{p['start']} .. {p['end']}\nagainst {q['start']} .. {q['end']}", DISCORD_DESCRIPTION),
        "color": COLOURS[_level(d)],
        "fields": fields[:DISCORD_FIELDS],
        "footer": {"text": "api-token-exporter"},
        "timestamp": d["generatedAt"],
    }
    while _embed_size(embed) > DISCORD_TOTAL and embed["fields"]:      # the last lists go first
        embed["fields"].pop()
    r = d["requests"]
    content = f"{d['title']}: {r['total']:,} requests ({g.signed(d['change']['requests'])})"
    return {"content": cut(discord_escape(content), DISCORD_CONTENT), "embeds": [embed],
            "allowed_mentions": {"parse": []}, "username": "api-token-exporter"}


# -- email ---------------------------------------------------------------------------------------
def _html(d: dict) -> str:
    g = digest
    e = html.escape
    p, q = d["period"], d["previousPeriod"]
    cell = 'style="padding:4px 12px;border-bottom:1px solid #ddd;text-align:{}"'
    rows = "\n".join(f"<tr><td {cell.format('left')}><b>{e(label)}</b></td><td {cell.format('right')}>{e(value)}</td>"
                   f"<td {cell.format('right')}>{e(diff)}</td></tr>" for label, value, diff in g.headline(d))
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(d['title'])}</title></head>",
        '<body style="font-family:Arial,Helvetica,sans-serif;font-size:14px;color:#222">',
        f"<h2>{e(d['title'])}</h2>",
        f"<p style=\"color:#666\">{e(p['start'])} .. {e(p['end'])}, against {e(q['start'])} .. {e(q['end'])}</p>",
        '<table style="border-collapse:collapse">\n<tr><th></th><th style="text-align:right;padding:4px 12px">'
        'this period</th><th style="text-align:right;padding:4px 12px">against the previous</th></tr>', rows, "</table>",
    ]
    for title, lines in _sections(d, e, lambda s: f"<code>{e(s)}</code>"):
        parts.append(f"<h3>{e(title)}</h3>")
        parts.append("<ul>\n" + "\n".join(f"<li>{line}</li>" for line in lines) + "\n</ul>" if lines else "<p>none</p>")
    parts.append(f'<p style="color:#888;font-size:12px">generated {e(d["generatedAt"])} by api-token-exporter</p>'
                 "</body></html>")
    return "\n".join(parts) + "\n"


def email_message(d: dict, sender: str, recipients: List[str]) -> EmailMessage:
    """multipart/alternative: the plain text first, the HTML second (the one mail readers prefer)."""
    msg = EmailMessage()         # lines of at most 78 characters (a long subject is folded, RFC 5322)
    msg["Subject"] = d["title"]
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"            # RFC 3834: no auto-replies to it
    msg["X-Digest-Period"] = d["period"]["label"]
    msg.set_content(digest.to_text(d))
    msg.add_alternative(_html(d), subtype="html")
    return msg


def send_email(msg: EmailMessage, s) -> None:
    host, port = s.digest_smtp_host, s.digest_smtp_port
    if s.digest_smtp_tls == "ssl":
        smtp = smtplib.SMTP_SSL(host, port, timeout=SMTP_TIMEOUT, context=ssl.create_default_context())
    else:
        smtp = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT)
    with smtp:
        smtp.ehlo()
        if s.digest_smtp_tls == "starttls":
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if s.digest_smtp_user:
            smtp.login(s.digest_smtp_user, s.digest_smtp_password)
        smtp.send_message(msg)


# -- delivery ------------------------------------------------------------------------------------
@dataclass
class Delivery:
    channel: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.channel}: {'sent' if self.ok else 'FAILED'}" + (f" ({self.detail})" if self.detail else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):      # a webhook that moved answers 3xx: say so
        return None


def post_json(url: str, payload: dict, token: Optional[str] = None, attempts: int = 2,
              sleep: Callable[[float], None] = time.sleep) -> str:
    """POST ``payload``; '' when the receiver accepted it (2xx), else why not, without the URL.
    A 429 or 5xx, or no connection, is tried once more after Retry-After (at most 10 s).
    The standard library's client: it logs no request line (a webhook URL is a credential)."""
    headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(payload).encode("utf-8")
    host = urlsplit(url).hostname or "?"
    opener = urllib.request.build_opener(_NoRedirect)
    problem = ""
    for attempt in range(attempts):
        status, body, retry_after = None, "", None
        try:
            with opener.open(urllib.request.Request(url, data=data, headers=headers, method="POST"),
                             timeout=HTTP_TIMEOUT) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status, retry_after = exc.code, exc.headers.get("Retry-After") if exc.headers else None
            try:
                body = exc.read(2000).decode("utf-8", "replace")
            except OSError:
                body = ""
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            problem = f"cannot reach {host} ({type(reason).__name__})"
        if status is not None:
            if 200 <= status < 300:
                return ""
            body = scrub(re.sub(r"\s+", " ", body), None, [url] + ([token] if token else []))[:200]
            problem = f"{host} answered HTTP {status}" + (f": {body}" if body else "")
            if status != 429 and status < 500:
                return problem
        if attempt + 1 < attempts:
            try:
                wait = float(retry_after) if retry_after else 1.0
            except ValueError:
                wait = 1.0
            sleep(min(max(wait, 0.0), 10.0))
    return problem


def render(d: dict, fmt: str, settings=None) -> str:
    """The digest as one channel would carry it (for --dry-run and --format)."""
    if fmt == "json":
        return json.dumps(d, indent=2) + "\n"
    if fmt == "slack":
        return json.dumps(slack_payload(d), indent=2, ensure_ascii=False) + "\n"
    if fmt == "discord":
        return json.dumps(discord_payload(d), indent=2, ensure_ascii=False) + "\n"
    if fmt == "email":
        sender = (settings.digest_smtp_from if settings is not None else None) or "digest@localhost"
        to = (list(settings.digest_email_to) if settings is not None else []) or ["you@localhost"]
        return email_message(d, sender, to).as_string()
    return digest.to_text(d)


def deliver(d: dict, s, channels: Iterable[str], post: Callable = post_json,
            mail: Callable = send_email) -> List[Delivery]:
    """Send ``d`` to each of ``channels``; one failing does not stop the others."""
    results = []
    for channel in channels:
        try:
            if channel == "slack":
                problem = post(s.digest_slack_webhook_url, slack_payload(d))
            elif channel == "discord":
                problem = post(s.digest_discord_webhook_url, discord_payload(d))
            elif channel == "webhook":
                problem = post(s.digest_webhook_url, d, s.digest_webhook_token)
            elif channel == "email":
                mail(email_message(d, s.digest_smtp_from, list(s.digest_email_to)), s)
                problem = ""
            else:
                problem = "unknown channel"
        except smtplib.SMTPResponseException as exc:
            problem = f"the SMTP server answered {exc.smtp_code} ({type(exc).__name__})"
        except (smtplib.SMTPException, ssl.SSLError, socket.timeout, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        results.append(Delivery(channel, not problem, scrub(problem, s)))
    return results
