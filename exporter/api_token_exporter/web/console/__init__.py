"""The console (/ui): pages that show tokens, usage and cost, alerts and capacity without Grafana,
served by the endpoints app whenever admin_token is set (docs/console.md).

The pages are server-rendered HTML; a little JavaScript fills them from the JSON endpoints,
which accept the console's session besides their own credentials. A session is a signed cookie
(HttpOnly, SameSite=Strict) that names the role and carries the CSRF token the page sends back
in a header; no credential is in it. It is signed with console_secret, or else a key derived
from admin_token by HMAC, so every worker and replica that shares the admin token reads it, and
changing the admin token (or revoking the API key a tenant signed in with) ends it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import urlsplit

from flask import Blueprint, jsonify, make_response, redirect, render_template, request, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ...core.keystore import hash_key

PREFIX = "/ui"
COOKIE = "ate_console"
CSRF_HEADER = "X-CSRF-Token"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
PAGES = (("tokens", "Tokens"), ("live", "Live"), ("usage", "Usage"), ("alerts", "Alerts"), ("capacity", "Capacity"))


@dataclass(frozen=True)
class Principal:
    """Whom a request acts for: the admin (every token) or a tenant (the tokens its key sees)."""
    role: str                              # "admin" or "tenant"
    tokens: Optional[Tuple[str, ...]]      # None: every token
    label: str                             # shown in the page header
    credential: str                        # the admin_rate_limit budget its requests count against
    csrf: str = ""

    @property
    def admin(self) -> bool:
        return self.role == "admin"


ADMIN = Principal("admin", None, "admin", "admin")


class SessionRefused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail

    def response(self):
        return jsonify({"detail": self.detail}), self.status


def from_this_site() -> bool:
    """The request comes from the console's own pages: by Fetch Metadata where the browser sends
    it; else the Origin header, where there is one, names this host (a client that sends
    neither is no browser a page can drive)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


class Sessions:
    """Sign-in with the admin token or an API key, and the signed session cookie that follows."""

    def __init__(self, settings, keystore, authenticate):
        """``authenticate``: the request pipeline's key check (UsageCore.authenticate), so a key
        signs in exactly when the API would accept it."""
        self.keystore, self.admin_token, self.authenticate = keystore, settings.admin_token, authenticate
        secret = settings.console_secret or hmac.new(settings.admin_token.encode("utf-8"),
                                                     b"api-token-exporter console sessions",
                                                     hashlib.sha256).hexdigest()
        self._secret = secret.encode("utf-8")
        self._serializer = URLSafeTimedSerializer(secret, salt="api-token-exporter console")
        self.lifetime = settings.console_session_lifetime

    def _verifier(self, credential: str) -> str:
        """Ties a session to its credential without holding it: a changed admin token or a
        replaced key no longer matches."""
        return hmac.new(self._secret, credential.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def sign_in(self, credential: str) -> Optional[str]:
        """A new session's cookie value for the admin token or a usable API key, else None."""
        if not credential:
            return None
        if hmac.compare_digest(credential.encode("utf-8"), self.admin_token.encode("utf-8")):
            payload = {"r": "admin", "v": self._verifier("admin:" + self.admin_token)}
        else:
            key, refused = self.authenticate(credential)
            if refused is not None:
                return None
            # the secret used: a rotated one in its grace period signs in until the grace ends
            payload = {"r": "tenant", "k": key.id, "v": self._verifier("key:" + hash_key(credential))}
        payload["c"] = secrets.token_urlsafe(24)
        return self._serializer.dumps(payload)

    def principal(self, value: Optional[str]) -> Optional[Principal]:
        """The principal of a cookie value; None if absent, forged, expired or its credential
        changed or was revoked."""
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=self.lifetime)
        except BadSignature:                         # SignatureExpired is one too
            return None
        if not isinstance(data, dict) or not isinstance(data.get("v"), str) or not isinstance(data.get("c"), str):
            return None
        if data.get("r") == "admin":
            if hmac.compare_digest(data["v"], self._verifier("admin:" + self.admin_token)):
                return Principal("admin", None, "admin", "admin", data["c"])
            return None
        key = self.keystore.get(data.get("k")) if data.get("r") == "tenant" and isinstance(data.get("k"), str) else None
        if key is None or not key.active or key.expired():
            return None
        secrets_in_force = [key.key_hash] + ([key.previous.key_hash] if key.previous_valid() else [])
        if not any(hmac.compare_digest(data["v"], self._verifier("key:" + h)) for h in secrets_in_force):
            return None
        label = f"tenant {key.tenant} ({key.name or key.id})" if key.tenant else f"key {key.name or key.id}"
        return Principal("tenant", tuple(self.keystore.visible_to(key)), label, f"key:{key.id}", data["c"])

    def from_request(self) -> Optional[Principal]:
        """The session of a same-origin request with its CSRF token in the X-CSRF-Token header;
        None without a session cookie; SessionRefused for a bad one."""
        value = request.cookies.get(COOKIE)
        if value is None:
            return None
        principal = self.principal(value)
        if principal is None:
            raise SessionRefused(401, f"The console session has expired or is no longer valid: sign in "
                                      f"again at {PREFIX}/")
        if not from_this_site():
            raise SessionRefused(403, "The console session is for requests from its own pages only")
        if not hmac.compare_digest((request.headers.get(CSRF_HEADER) or "").encode("utf-8"),
                                            principal.csrf.encode("utf-8")):
            raise SessionRefused(403, f"Missing or wrong {CSRF_HEADER} header for this console session")
        return principal


def register(app, paths: set, prefixes: list, core, alerts: bool) -> Sessions:
    """Add the console's pages to the endpoints app (the Alerts page where ``alerts``: the alert
    API is there); returns its Sessions, which the JSON endpoints consult."""
    s = core.settings
    sessions = Sessions(s, core.keystore, core.authenticate)
    available = {"tokens": True, "live": True, "usage": bool(s.prometheus_url), "capacity": bool(s.prometheus_url),
                 "alerts": alerts}
    console = Blueprint("console", __name__, url_prefix=PREFIX, template_folder="templates",
                        static_folder="static")
    paths.add(PREFIX)
    prefixes.append(PREFIX + "/")

    def nav(principal: Principal):
        return [(name, title) for name, title in PAGES
                if available[name] and (principal.admin or name != "alerts")]

    def cookie(response, value: str, max_age: int):
        response.set_cookie(COOKIE, value, max_age=max_age, path="/", httponly=True, samesite="Strict",
                            secure=request.is_secure)
        return response

    def login_page(error: Optional[str] = None, status: int = 200):
        nxt = request.values.get("next", "")
        return render_template("login.html", error=error, next=nxt if nxt in available else ""), status

    @console.after_request
    def headers(response):
        response.headers.update(SECURITY_HEADERS)
        if response.mimetype == "text/html":
            response.headers["Cache-Control"] = "no-store"
        return response

    @console.route("", methods=["GET"])
    @console.route("/", methods=["GET"])
    def home():
        return redirect(url_for("console.page", name="tokens"))

    @console.route("/login", methods=["GET", "POST"])
    def sign_in():
        if request.method == "GET":
            if sessions.principal(request.cookies.get(COOKIE)) is not None:
                return redirect(url_for("console.page", name="tokens"))
            return login_page()
        if not from_this_site():
            return login_page("Sign in from the console's own page.", 403)
        value = sessions.sign_in(request.form.get("credential", "").strip())
        if value is None:
            return login_page("That is neither the admin token nor a valid, active API key.", 401)
        target = request.form.get("next", "")
        response = redirect(url_for("console.page", name=target if target in available else "tokens"), 303)
        return cookie(response, value, int(sessions.lifetime))

    @console.route("/logout", methods=["POST"])
    def sign_out():
        principal = sessions.principal(request.cookies.get(COOKIE))
        if principal is not None and not hmac.compare_digest(
                request.form.get("csrf_token", "").encode("utf-8"), principal.csrf.encode("utf-8")):
            return render_template("message.html", title="Not signed out",
                                   message="The form was not sent by this console session."), 403
        return cookie(redirect(url_for("console.sign_in"), 303), "", 0)

    @console.route("/<name>", methods=["GET"])
    def page(name):
        if not available.get(name):
            return render_template("message.html", title="Not here",
                                   message=_why_not(name)), 404
        principal = sessions.principal(request.cookies.get(COOKIE))
        if principal is None:
            return redirect(url_for("console.sign_in", next=name))
        if name == "alerts" and not principal.admin:
            return render_template("message.html", title="Alerts", message="Alerts are for the admin."), 403
        title = dict(PAGES)[name]
        return make_response(render_template(f"{name}.html", page=name, title=title, principal=principal,
                                             nav=nav(principal), refresh=s.console_refresh_seconds))

    app.register_blueprint(console)
    return sessions


def _why_not(name: str) -> str:
    if name in ("usage", "capacity"):
        return "This page answers from Prometheus: set prometheus_url."
    if name == "alerts":
        return ("This page is the alert API's, which the exporter service (api-token-exporter serve) "
                "runs with alertmanager_url set: open its console.")
    return "There is no such page."

