"""Built-in endpoints: /metrics, /healthz, /runbooks, /admin/token-details, /admin/stats, the
live view's stream /admin/live, the ingest endpoint /v1/events, the analytics and alert APIs and the console (/ui). Every credential
is compared in constant time."""
from __future__ import annotations

import base64
import binascii
import html
import hmac
import json
import logging
import os
import re
import threading
import time
from typing import List, Optional, Tuple

from flask import Flask, Response, jsonify, request

from ..core import validation
from ..core.geo import client_ip, parse_trusted_proxies
from ..core.keystore import KEY_PREFIX, well_formed_key
from ..core.ratelimit import RateLimiter
from ..core.usage import DETAIL_FIELDS, UsageError
from ..core.validation import ValidationError
from .bridge import LOOP_STREAM
from .console import PREFIX as CONSOLE_PREFIX
from .live import LIVE_PATH, LiveStreams
from .pipeline import REFUSALS
from .throttle import FailureThrottle

log = logging.getLogger("api_token_exporter")

ADMIN_PATHS = ("/admin/token-details", "/admin/stats")
INGEST_PATH = "/v1/events"
HEALTH_PATH = "/healthz"
RUNBOOKS_PATH = "/runbooks"       # what each alert's runbook_url points at by default
ANALYTICS_PATHS = ("/analytics/tokens", "/api/analytics/usage", "/api/analytics/capacity")
MAX_DURATION_SECONDS = 3600.0
LONGEST_RANGE_DAYS = 3650          # /analytics/tokens without byDay: one query whatever the range
MAX_JSON_DEPTH = 8                 # {"events": [{"llm": {...}}]} is 4 deep


def _same(given: Optional[str], expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _bearer(header: Optional[str]) -> Optional[str]:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def _basic(header: Optional[str]) -> Optional[Tuple[str, str]]:
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return user, password


def _unauthorized(detail: str, scheme: str):
    response = jsonify({"detail": detail})
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'{scheme} realm="api-token-exporter"'
    return response


METRICS_CLOSED = ("Metrics are not public: set metrics_bearer_token (or metrics_basic_user and "
                  "metrics_basic_password) and give Prometheus the credentials, serve them on "
                  "metrics_port bound to 127.0.0.1, or set metrics_public: true")


def retry_later(status: int, detail: str, wait: int) -> Response:
    """A refusal to repeat after ``wait`` seconds: the JSON detail and Retry-After."""
    response = jsonify({"detail": detail})
    response.status_code = status
    response.headers["Retry-After"] = str(wait)
    return response


class AnswerCache:
    """The same question within ``seconds`` gets the same answer, computed once."""

    def __init__(self, seconds: float, size: int = 256):
        self.seconds, self.size = seconds, size
        self._answers: dict = {}
        self._lock = threading.Lock()

    def get(self, question, compute):
        if self.seconds <= 0:
            return compute()
        now = time.monotonic()
        with self._lock:
            hit = self._answers.get(question)
            if hit is not None and hit[0] > now:
                return hit[1]
        answer = compute()
        with self._lock:
            if len(self._answers) >= self.size:
                self._answers = {q: a for q, a in self._answers.items() if a[0] > now}
                if len(self._answers) >= self.size:
                    self._answers.clear()
            self._answers[question] = (now + self.seconds, answer)
        return answer


def build_endpoints(core, serve_metrics: bool = True, admin: bool = True, health: bool = False,
                    anonymous_metrics: bool = True, admin_views=None):
    """Return (wsgi_app, paths it answers, path prefixes it answers) for a UsageCore. Without
    credentials configured, ``anonymous_metrics`` False refuses the metrics path (403) rather
    than serving it to all. ``admin_views``: more admin JSON (path -> callable returning it),
    behind the same admin token and budget (the proxy's /admin/pool/*)."""
    s = core.settings
    app = Flask("api_token_exporter.web.endpoints")
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    paths = set()
    prefixes: List[str] = []

    @app.errorhandler(404)
    def _not_found(_):
        return jsonify({"detail": "Not found"}), 404

    # guessing credentials: an address whose credentials failed auth_failure_limit times in a
    # minute gets 429 here until the minute is over; health and runbooks are always answered
    throttle = FailureThrottle(s.auth_failure_limit)
    trusted = parse_trusted_proxies(s.trusted_proxies)
    sign_in_path = CONSOLE_PREFIX + "/login"

    def tries_a_credential() -> bool:
        headers = request.headers
        return bool(headers.get("Authorization") or headers.get("X-Admin-Token") or headers.get(s.header_name)
                    or request.method == "POST" and request.path == sign_in_path)

    @app.before_request
    def throttled():
        if request.path in (HEALTH_PATH, RUNBOOKS_PATH):
            return None
        address = client_ip(request.environ, trusted)
        wait = throttle.retry_after(address)
        if wait is None:
            return None
        core.metrics.auth_failure("throttled", address)
        return retry_later(429, f"Too many failed credentials from this address: try again in {wait} "
                                "seconds (auth_failure_limit)", wait)

    @app.after_request
    def count_failure(response):
        if response.status_code == 401 and tries_a_credential():
            throttle.failed(client_ip(request.environ, trusted))
        return response

    @app.errorhandler(405)
    def _not_allowed(_):
        return jsonify({"detail": "Method not allowed"}), 405

    if serve_metrics:
        paths.add(s.metrics_path)

        @app.route(s.metrics_path, methods=["GET"])
        def metrics():
            header = request.headers.get("Authorization")
            if s.metrics_bearer_token:
                if not _same(_bearer(header), s.metrics_bearer_token):
                    return _unauthorized("Metrics need a valid bearer token", "Bearer")
            elif s.metrics_basic_user:
                creds = _basic(header) or ("", "")
                user_ok = _same(creds[0], s.metrics_basic_user)
                password_ok = _same(creds[1], s.metrics_basic_password)
                if not (user_ok and password_ok):
                    return _unauthorized("Metrics need valid basic credentials", "Basic")
            elif not anonymous_metrics:
                return jsonify({"detail": METRICS_CLOSED}), 403
            body, content_type = core.view.render(request.headers.get("Accept"))
            return Response(body, content_type=content_type)

    if health:
        paths |= {HEALTH_PATH, RUNBOOKS_PATH}

    @app.route(RUNBOOKS_PATH, methods=["GET"])
    def runbooks():
        return Response(_runbooks_page(), content_type="text/html; charset=utf-8")

    gate = None                 # the analytics' bound and breaker, with prometheus_url (below)

    @app.route(HEALTH_PATH, methods=["GET"])
    def healthz():
        store = core.metrics.store
        answer = {"status": "ok" if core.keystore.healthy else "degraded",
                  "keys": len(core.keystore),
                  "key_file_error": core.keystore.last_error,
                  "store": {"dropped_series": store.dropped_series(), "capacity": store.capacity,
                            "state_dir": store.directory if core.settings.state_dir else None}}
        if gate is not None:
            answer["analytics"] = gate.state()
        return jsonify(answer)

    # analytics and admin answers cost Prometheus queries and store merges: a per-credential
    # limit keeps any one key (or a leaked admin token) from turning them against the servers
    budget = RateLimiter("memory://")
    budget_plan = budget.plan({"minute": s.admin_rate_limit})

    def over_budget(credential: str):
        decision = budget.hit_plan(credential, budget_plan)
        if decision.allowed:
            return None
        wait = decision.refused_by.reset_in(time.time())
        return retry_later(429, f"At most {s.admin_rate_limit} analytics and admin requests per minute per "
                                f"credential (admin_rate_limit). Try again in {wait} seconds", wait)

    sessions = None
    if admin and s.admin_token:
        from . import console
        paths.update(ADMIN_PATHS)
        sessions = console.register(app, paths, prefixes, core, alerts=bool(s.alertmanager_url and health))

        def caller(admin_only: bool):
            """(principal, None) or (None, refusal): the admin token (bearer or X-Admin-Token),
            or a console session with its CSRF header (a tenant's only where not ``admin_only``)."""
            given = _bearer(request.headers.get("Authorization")) or request.headers.get("X-Admin-Token")
            if given is not None and _same(given, s.admin_token):
                return console.ADMIN, over_budget("admin")
            try:
                principal = sessions.from_request()
            except console.SessionRefused as exc:
                return None, exc.response()
            if principal is None:
                return None, _unauthorized("Admin endpoints need the admin token", "Bearer")
            if admin_only and not principal.admin:
                return None, (jsonify({"detail": "Only the admin may do this"}), 403)
            return principal, over_budget(principal.credential)

        def admin_denied():
            return caller(admin_only=True)[1]

        def visible(principal):
            return None if principal.tokens is None else frozenset(principal.tokens)

        @app.route("/admin/token-details", methods=["GET"])
        def token_details():
            principal, refused = caller(admin_only=False)
            return refused or jsonify(core.tracker.token_details(core.keystore, s.rate_limits, core.view,
                                                                 tokens=visible(principal)))

        @app.route("/admin/stats", methods=["GET"])
        def admin_stats():
            principal, refused = caller(admin_only=False)
            return refused or jsonify(core.tracker.stats(core.keystore, s.rate_limits, core.view,
                                                         tokens=visible(principal)))

        live = LiveStreams(core, s.console_live_viewers, s.console_live_seconds)
        paths.add(LIVE_PATH)

        @app.route(LIVE_PATH, methods=["GET"])
        def live_stream():
            principal, refused = caller(admin_only=False)
            if refused:
                return refused
            stream = live.open(visible(principal))
            if stream is None:
                return retry_later(503, f"At most {s.console_live_viewers} live views at once on this server "
                                        "(console_live_viewers): try again in 5 seconds", 5)
            request.environ[LOOP_STREAM] = stream         # served from the event loop where it can be
            return Response(stream, content_type="text/event-stream; charset=utf-8",
                            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

        for path, view in (admin_views or {}).items():
            paths.add(path)
            app.add_url_rule(path, path, lambda view=view: admin_denied() or jsonify(view()), methods=["GET"])

        if s.alertmanager_url and health:       # the exporter service's (an API keeps its own paths)
            from ..alerting import api as alert_api
            alert_api.register(app, paths, prefixes, core, admin_denied, _same, _bearer)

    if admin and s.ingest_token:
        paths.add(INGEST_PATH)

        def body_too_large():
            return jsonify({"detail": f"Body larger than {s.ingest_max_bytes} bytes"}), 413

        @app.route(INGEST_PATH, methods=["POST"])
        def ingest():
            if not _same(_bearer(request.headers.get("Authorization")), s.ingest_token):
                return _unauthorized("Ingest needs the ingest token as a bearer token", "Bearer")
            if request.content_length is not None and request.content_length > s.ingest_max_bytes:
                return body_too_large()
            raw = request.stream.read(s.ingest_max_bytes + 1)     # chunked too: never more
            if len(raw) > s.ingest_max_bytes:
                return body_too_large()
            try:
                doc = json.loads(raw)
            except RecursionError:
                doc = None
            except (ValueError, UnicodeDecodeError) as exc:
                return jsonify({"detail": f"Body is not valid JSON: {exc}"}), 400
            if doc is None and raw.strip() != b"null" or not validation.json_depth(doc, MAX_JSON_DEPTH):
                return jsonify({"detail": f"Body nests deeper than {MAX_JSON_DEPTH} levels"}), 400
            events = doc.get("events") if isinstance(doc, dict) else doc
            if not isinstance(events, list):
                return jsonify({"detail": "Body must be {\"events\": [...]} or a JSON list of events"}), 400
            if len(events) > s.ingest_max_events:
                return jsonify({"detail": f"At most {s.ingest_max_events} events per batch, "
                                          f"got {len(events)}"}), 413
            accepted, errors = 0, []
            for index, event in enumerate(events):
                problems = ingest_event(core, event)
                if problems:
                    errors.append({"index": index, "errors": problems})
                else:
                    accepted += 1
            core.metrics.ingest(accepted, len(errors))
            status = 200 if accepted or not events else 400
            return jsonify({"accepted": accepted, "rejected": len(errors), "errors": errors}), status

    if admin and s.prometheus_url:
        from ..core.config import optional_import
        optional_import("requests", "analytics", "The analytics API (prometheus_url)")
        from ..analytics import queries as analytics
        from ..analytics.gate import QueryGate, Refused
        client = analytics.PrometheusClient(s.prometheus_url, s.prometheus_timeout)
        paths.update(ANALYTICS_PATHS)
        cache = AnswerCache(s.analytics_cache_seconds)
        gate = QueryGate(s.analytics_max_concurrent, s.analytics_max_per_caller, s.analytics_breaker_failures,
                         s.analytics_breaker_cooldown)

        def scope_or_error():
            """(scope, credential, None) or (None, None, refusal). Admin token: every token. A
            tenant's API key, or a console session: that tenant's tokens only."""
            if s.admin_token and _same(_bearer(request.headers.get("Authorization")), s.admin_token):
                return analytics.Scope(), "admin", over_budget("admin")
            raw = request.headers.get(s.header_name)
            if not raw and sessions is not None:
                try:
                    principal = sessions.from_request()
                except console.SessionRefused as exc:
                    return None, None, exc.response()
                if principal is not None:
                    credential = principal.credential
                    return analytics.Scope(principal.tokens), credential, over_budget(credential)
            if not raw:
                return None, None, (_unauthorized(
                    "Analytics need the admin token (Authorization: Bearer <admin_token>) or an API "
                    f"key ({s.header_name}); none was given or the bearer token is wrong", "Bearer"))
            key, reason = core.authenticate(raw)
            if reason is not None:                  # the same refusal as the API's own
                code, detail = REFUSALS[reason]
                return None, None, (jsonify({"detail": detail}), code)
            return analytics.Scope(core.keystore.visible_to(key)), f"key:{key.id}", over_budget(f"key:{key.id}")

        def answer(build):
            scope, credential, error = scope_or_error()
            if error:
                return error
            question = (request.path, ("*",) if scope.tokens is None else tuple(scope.tokens),
                        tuple(sorted(request.args.items())))
            try:
                scope = scope.narrow(request.args.get("token"))
                return jsonify(cache.get(question, lambda: gate.run(credential, lambda: build(scope))))
            except analytics.AnalyticsError as exc:
                return jsonify({"detail": str(exc)}), 400
            except analytics.PrometheusUnavailable as exc:
                return jsonify({"detail": f"Analytics unavailable: {exc}"}), 503
            except Refused as exc:
                return retry_later(exc.status, exc.detail, exc.retry_after)

        @app.route("/analytics/tokens", methods=["GET"])
        def analytics_tokens():
            def build(scope):
                # byDay=false: no query per day, so the range may be as long as Prometheus keeps
                by_day = request.args.get("byDay", "true") != "false"
                start, end = analytics.resolve_range(request.args.get("days"), request.args.get("start"),
                                                     request.args.get("end"), time.time(),
                                                     max_days=s.analytics_max_days if by_day else LONGEST_RANGE_DAYS)
                return analytics.tokens_report(client, scope, start, end, deadline=s.prometheus_timeout,
                                               by_day=by_day)
            return answer(build)

        @app.route("/api/analytics/usage", methods=["GET"])
        def analytics_usage():
            def build(scope):
                now = time.time()
                start, end, views = analytics.trend_request(request.args.get("view"), request.args.get("start"),
                                                            request.args.get("end"), now)
                return analytics.usage_report(client, scope, now, deadline=s.prometheus_timeout,
                                              compare=request.args.get("compare"), start=start, end=end, views=views)
            return answer(build)

        @app.route("/api/analytics/capacity", methods=["GET"])
        def analytics_capacity():
            def build(scope):
                multiplier = analytics.parse_multiplier(request.args.get("multiplier"))
                now = time.time()
                keys = {k.id: {"name": k.name, "tenant": k.tenant,
                               "limits": core.limits_for(k) if k.active and not k.expired(now) else {}}
                        for k in core.keystore.all() if scope.tokens is None or k.id in scope.tokens}
                return analytics.capacity_report(client, scope, now, keys, multiplier, deadline=s.prometheus_timeout)
            return answer(build)

    elif admin and health:          # the exporter service without Prometheus: say what is missing
        paths.update(ANALYTICS_PATHS)

        def no_prometheus():
            return jsonify({"detail": "The analytics API answers from Prometheus: set prometheus_url "
                                      "(ATE_PROMETHEUS_URL) to its base URL"}), 404
        for path in ANALYTICS_PATHS:
            app.add_url_rule(path, "no_prometheus" + path, no_prometheus, methods=["GET"])

    return app, paths, tuple(prefixes)


def validate_event(core, event) -> Tuple[Optional[dict], List[str]]:
    """Check one ingest event; returns (clean event, []) or (None, [reasons]). Reasons name the
    field and the rule, never the submitted value. Unknown fields are ignored."""
    if not isinstance(event, dict):
        return None, ["event must be a JSON object"]
    errors: List[str] = []
    clean = {}

    def check(key, fn, *args):
        try:
            clean[key] = fn(*args)
        except ValidationError as exc:
            errors.append(str(exc))

    token, api_key = event.get("token"), event.get("api_key")
    if api_key is not None:
        key = None
        if isinstance(api_key, str) and well_formed_key(api_key):
            key = core.keystore.lookup(api_key)
        if key is None:
            errors.append("api_key is not a known key")
        else:
            clean["token"] = key.id
    elif token is None:
        errors.append("token (a key id) or api_key is required")
    else:
        check("token", validation.token_id, "token", token)
        if "token" in clean and core.keystore.get(token) is None:    # a known id needs no more
            del clean["token"]
            if token.startswith(KEY_PREFIX) or core.keystore.lookup(token) is not None:
                # a key pasted into `token` must never become a label
                errors.append("token must be a key id, not the key itself (send a key as api_key)")
            elif not core.settings.ingest_allow_unknown_tokens:
                errors.append("token is not a key id in the key store")
            else:
                clean["token"] = token
    check("route", validation.route, "route", event.get("route"))
    if "route" in clean and core.is_a_key(clean["route"]):
        del clean["route"]
        errors.append("route must not hold an API key")
    method = event.get("method", "GET")
    if isinstance(method, str) and 0 < len(method) <= 32:
        clean["method"] = validation.method(method)
    else:
        errors.append("method must be an HTTP method name")
    status = event.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        errors.append("status must be an HTTP status code from 100 to 599")
    else:
        clean["status"] = status
    if "duration_seconds" in event or "duration_ms" not in event:
        check("duration", validation.number, "duration_seconds", event.get("duration_seconds"),
              0.0, MAX_DURATION_SECONDS)
    else:
        check("duration", validation.number, "duration_ms", event.get("duration_ms"),
              0.0, MAX_DURATION_SECONDS * 1000)
        if "duration" in clean:
            clean["duration"] /= 1000.0
    llm = event.get("llm")
    if llm is not None:
        if not isinstance(llm, dict):
            errors.append("llm must be an object with service, model, input_tokens, output_tokens")
        else:
            try:
                clean["llm"] = core.validate_usage(llm.get("service"), llm.get("model"),
                                                   llm.get("input_tokens", 0), llm.get("output_tokens", 0),
                                                   *(0 if llm.get(name) is None else llm[name]
                                                     for name in DETAIL_FIELDS))
            except UsageError as exc:
                errors.append(f"llm: {exc}")
    country, client = event.get("country"), event.get("client_ip")
    if country is not None:
        if isinstance(country, str) and re.fullmatch(r"[A-Za-z]{2}", country):
            clean["country"] = country.upper()
        else:
            errors.append("country must be an ISO 3166-1 alpha-2 code such as DE")
    elif client is not None and core.countries is not None:
        if isinstance(client, str) and len(client) <= 64:
            clean["country"] = core.countries.country(client)      # ZZ when it is no address
        else:
            errors.append("client_ip must be an IP address")
    return (None, errors) if errors else (clean, [])


def ingest_event(core, event) -> List[str]:
    clean, errors = validate_event(core, event)
    if errors:
        return errors
    core.record_request(clean["token"], clean["route"], clean["method"], clean["status"],
                        clean["duration"])
    usage = clean.get("llm")
    if usage is not None:
        core.count_llm(clean["token"], usage)
    if "country" in clean and core.countries is not None:
        core.metrics.observe_country(clean["token"], clean["country"])
    return []


def _runbooks_page() -> str:
    """The runbooks (docs/runbooks.md, shipped in the package) as a page whose anchors are the
    ones alert links use: #<alert name in lower case>. Markdown reads well as it is."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "mixin", "runbooks.md"), encoding="utf-8") as fh:
        text = fh.read()
    lines = []
    for line in html.escape(text).splitlines():
        heading = re.match(r"#+ (.+)$", line)
        if heading:
            anchor = re.sub(r"[^a-z0-9 -]", "", heading.group(1).strip().lower()).replace(" ", "-")
            line = f'<a id="{anchor}"></a><b>{line}</b>'
        lines.append(line)
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>api-token-exporter runbooks</title>"
            "<style>body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:60em}"
            "pre{white-space:pre-wrap;font:inherit}</style></head><body><pre>"
            + "\n".join(lines) + "</pre></body></html>\n")


def metrics_open_without_credentials(settings, addr: str) -> bool:
    """A metrics port may answer without credentials when opened on purpose or only local."""
    return settings.metrics_public or addr in ("127.0.0.1", "::1", "localhost")


def serve_metrics_port(core, port: int, addr: str = "127.0.0.1"):
    """Serve /metrics (with the same auth) on its own port, in a daemon thread; the server, or
    None when the port is taken.

    Under a server with several workers only the first to bind serves it (with state_dir
    shared, its answer sums every worker); the others log it once and go on, rather than
    failing to boot again and again."""
    import errno
    import socket
    from werkzeug.serving import make_server
    open_ = metrics_open_without_credentials(core.settings, addr)
    metrics_app, _, _ = build_endpoints(core, serve_metrics=True, admin=False, anonymous_metrics=open_)
    probe = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server will
        probe.bind((addr, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics_port %s:%d is already in use (another worker of this server, or "
                    "another program): this process (pid %d) does not serve it", addr, port,
                    os.getpid())
        return None
    finally:
        probe.close()
    server = make_server(addr, port, metrics_app, threaded=True)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server
