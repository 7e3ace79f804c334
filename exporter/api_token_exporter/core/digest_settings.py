"""The digest settings (``digest_*``): checked with every other setting when settings load,
so a digest that cannot work is refused at start-up, naming the setting and never a secret."""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable, List, Optional
from urllib.parse import urlsplit

from .errors import ConfigError

CHANNELS = ("slack", "discord", "email", "webhook")
SCHEDULES = ("off", "daily", "weekly")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
SCOPES = ("overall", "per-tenant")
SMTP_TLS = ("starttls", "ssl", "none")


class DigestConfigError(ValueError):
    pass


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_time_of_day(value: str) -> int:
    """'08:00' -> seconds after midnight UTC."""
    found = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", str(value).strip())
    if not found:
        raise DigestConfigError(f"digest_time must be HH:MM (UTC, 00:00 to 23:59), got {value!r}")
    return int(found.group(1)) * 3600 + int(found.group(2)) * 60


def check(s) -> None:
    """Refuse a digest setting that cannot work, naming it (never showing a secret)."""
    try:
        if s.digest_schedule not in SCHEDULES:
            raise DigestConfigError(f"digest_schedule must be off, daily or weekly, got {s.digest_schedule!r}")
        parse_time_of_day(s.digest_time)
        if s.digest_weekday.lower() not in WEEKDAYS:
            raise DigestConfigError(f"digest_weekday must be a day of the week (monday ... sunday), "
                                    f"got {s.digest_weekday!r}")
        if s.digest_scope not in SCOPES:
            raise DigestConfigError(f"digest_scope must be overall or per-tenant, got {s.digest_scope!r}")
        if not 1 <= s.digest_top_n <= 25:
            raise DigestConfigError("digest_top_n must be from 1 to 25")
        for name in ("digest_slack_webhook_url", "digest_discord_webhook_url", "digest_webhook_url"):
            value = getattr(s, name)
            if value:
                parts = urlsplit(value)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise DigestConfigError(f"{name} must be an http:// or https:// URL (not shown: it is a secret)")
        if s.digest_smtp_tls not in SMTP_TLS:
            raise DigestConfigError(f"digest_smtp_tls must be starttls, ssl or none, got {s.digest_smtp_tls!r}")
        if not 1 <= s.digest_smtp_port <= 65535:
            raise DigestConfigError("digest_smtp_port must be from 1 to 65535")
        if bool(s.digest_smtp_user) != bool(s.digest_smtp_password):
            raise DigestConfigError("digest_smtp_user and digest_smtp_password go together")
        if s.digest_email_to:
            if not s.digest_smtp_host:
                raise DigestConfigError("digest_email_to needs digest_smtp_host")
            if not s.digest_smtp_from:
                raise DigestConfigError("digest_email_to needs digest_smtp_from (the sender address)")
            for address in list(s.digest_email_to) + [s.digest_smtp_from]:
                if not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", address):
                    raise DigestConfigError(f"digest email address {address!r} is not an address")
        if s.digest_smtp_password and s.digest_smtp_tls == "none" and not _loopback(s.digest_smtp_host or ""):
            raise DigestConfigError("digest_smtp_tls none would send the SMTP password in clear to "
                                    f"{s.digest_smtp_host}: use starttls or ssl")
        if s.digest_schedule != "off":
            if not s.prometheus_url:
                raise DigestConfigError("digest_schedule needs prometheus_url (digests are read from Prometheus)")
            if not configured(s):
                raise DigestConfigError("digest_schedule needs a channel: digest_slack_webhook_url, "
                                        "digest_discord_webhook_url, digest_webhook_url or digest_email_to")
            if s.digest_scope == "per-tenant" and not s.keys_file:
                raise DigestConfigError("digest_scope per-tenant needs keys_file (the tenants of the keys)")
    except DigestConfigError as exc:
        raise ConfigError(str(exc)) from None


def configured(s, wanted: Optional[Iterable[str]] = None) -> List[str]:
    """The channels the settings give, in CHANNELS order, limited to ``wanted``."""
    have = {"slack": bool(s.digest_slack_webhook_url), "discord": bool(s.digest_discord_webhook_url),
            "email": bool(s.digest_email_to), "webhook": bool(s.digest_webhook_url)}
    wanted = set(wanted) if wanted else set(CHANNELS)
    return [c for c in CHANNELS if have[c] and c in wanted]
