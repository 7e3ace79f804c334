"""The alert API on the exporter (docs/alerts.md#the-alert-api): active alerts, history,
acknowledgements, feedback and settings behind the admin token, and the webhook Alertmanager
posts every notification to, behind its own token."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time

from flask import Response, jsonify, request

log = logging.getLogger("api_token_exporter.alerts")

ALERTS_PATH = "/api/v1/alerts"
WEBHOOK_PATH = "/api/v1/alerts/webhook"
ACK_DEFAULT, ACK_MAX = 24 * 3600, 30 * 86400
HISTORY_DEFAULT_DAYS, HISTORY_MAX_LIMIT = 7, 1000
MAX_BODY_BYTES, MAX_BODY_DEPTH = 1_048_576, 12
ALERT_ID = re.compile(r"[0-9a-f]{16}")
CSV_FIELDS = ("id", "type", "severity", "status", "token", "token_name", "tenant", "starts_at", "ends_at",
              "duration_seconds", "acknowledged_by", "acknowledged_at", "acknowledgement_comment", "verdict",
              "notified", "found_in", "summary")


def build_alert_management(core):
    """(AlertManagement, AlertSettings) from the settings, with the sync running."""
    from ..core.config import ConfigError, optional_import
    optional_import("requests", "alerts", "The alert API (alertmanager_url)")
    optional_import("sqlalchemy", "alerts", "The alert history")
    from .management import AlertManagement
    from .settings import AlertSettings
    from .store import AlertHistory, default_url
    from .client import Alertmanager, Prometheus
    from ..mixin.thresholds import PACKAGED_THRESHOLDS
    s = core.settings
    url = s.alert_db_url or default_url(s.state_dir)
    if not url:
        raise ConfigError("The alert history needs a database: set alert_db_url (sqlite:///path or "
                          "postgresql://...) or state_dir")
    history = AlertHistory(url)
    prometheus = Prometheus(s.prometheus_url, s.prometheus_timeout) if s.prometheus_url else None
    am = Alertmanager(s.alertmanager_url, s.prometheus_timeout)
    management = AlertManagement(history, am, prometheus, core.keystore, core.metrics, s.alert_sync_interval)
    thresholds = s.thresholds_file or PACKAGED_THRESHOLDS
    if not os.path.isfile(thresholds):
        raise ConfigError(f"thresholds_file {thresholds} does not exist (unset, the packaged defaults are used)")
    settings = AlertSettings(history, thresholds, s.alert_rules_dir, prometheus, s.alertmanager_config_file, am)
    if s.alert_rules_dir or s.alertmanager_config_file:
        management.on_sync.append(settings.converge)
    return management.start(), settings


def _parse_duration(value) -> float:
    from ..core.durations import DurationError, parse_duration
    if value is None:
        return ACK_DEFAULT
    try:
        secs = parse_duration(value) if isinstance(value, str) else None
    except DurationError:
        secs = None
    if secs is None or not 60 <= secs <= ACK_MAX:
        raise ValueError("duration must be a duration from 1m to 30d, such as 30m, 4h or 1d")
    return secs


def _author(body: dict) -> str:
    given = body.get("by") if isinstance(body, dict) else None
    given = given or request.headers.get("X-Admin-User")
    if given is None:
        return "admin"
    if not isinstance(given, str) or not re.fullmatch(r"[\w .@+-]{1,100}", given):
        raise ValueError("by must be a name of up to 100 letters, digits, spaces and . @ + -")
    return f"admin ({given})"


def register(app, paths: set, prefixes: list, core, admin_denied, same, bearer):
    """Add the alert routes to the endpoints app."""
    import sqlalchemy

    from ..core import validation
    from ..core.timestamps import TimestampError, parse_timestamp
    from .management import STATES, Conflict, NotFound
    from .settings import ApplyError, SettingsBusy, SettingsError
    from .store import VERDICTS
    from .client import UpstreamError

    s = core.settings
    management, settings = build_alert_management(core)
    app.extensions["ate_alerts"] = management
    paths.update({ALERTS_PATH, ALERTS_PATH + "/history", ALERTS_PATH + "/settings"})
    prefixes.append(ALERTS_PATH + "/")

    def error(status: int, detail: str):
        return jsonify({"detail": detail}), status

    @app.errorhandler(sqlalchemy.exc.SQLAlchemyError)
    def _database_error(exc):
        log.warning("alert history database: %s", type(exc).__name__)
        return error(503, "The alert history database is unavailable; try again later")

    def body_or_error():
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return None, error(413, f"Body larger than {MAX_BODY_BYTES} bytes")
        raw = request.stream.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            return None, error(413, f"Body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw or b"{}")
        except RecursionError:
            body = None
        except (ValueError, UnicodeDecodeError) as exc:
            return None, error(400, f"Body is not valid JSON: {exc}")
        if body is None or not validation.json_depth(body, MAX_BODY_DEPTH):
            return None, error(400, f"Body must be a JSON object nesting at most {MAX_BODY_DEPTH} levels")
        if not isinstance(body, dict):
            return None, error(400, "Body must be a JSON object")
        return body, None

    def upstream(call):
        try:
            return call()
        except NotFound as exc:
            return error(404, str(exc))
        except Conflict as exc:
            return error(409, str(exc))
        except UpstreamError as exc:
            return error(502, str(exc))

    @app.route(ALERTS_PATH, methods=["GET"])
    def alerts_active():
        denied = admin_denied()
        if denied:
            return denied
        state = request.args.get("state")
        if state and state not in STATES:
            return error(400, f"state must be one of {', '.join(STATES)}")
        return upstream(lambda: jsonify({"alerts": management.active(
            request.args.get("type"), request.args.get("severity"), request.args.get("token"), state)}))

    @app.route(ALERTS_PATH + "/history", methods=["GET"])
    def alerts_history():
        denied = admin_denied()
        if denied:
            return denied
        now = time.time()
        try:
            end = parse_timestamp(request.args["to"], "to") if request.args.get("to") else now
            start = parse_timestamp(request.args["from"], "from") if request.args.get("from") \
                else end - HISTORY_DEFAULT_DAYS * 86400
            limit = int(request.args.get("limit", 100))
            offset = int(request.args.get("offset", 0))
        except TimestampError as exc:
            return error(400, str(exc))
        except ValueError:
            return error(400, "limit and offset must be whole numbers")
        if start >= end:
            return error(400, "from must be before to")
        if not 1 <= limit <= HISTORY_MAX_LIMIT or offset < 0:
            return error(400, f"limit must be from 1 to {HISTORY_MAX_LIMIT} and offset at least 0")
        try:
            management.sync_on_demand()
        except UpstreamError:
            pass                     # history answers from the database while they are away
        page = management.history_page(start, end, request.args.get("token"), request.args.get("type"),
                                       request.args.get("severity"), limit, offset)
        if request.args.get("format") == "csv" or "text/csv" in (request.headers.get("Accept") or ""):
            return Response(_csv(page["alerts"]), content_type="text/csv; charset=utf-8", headers={
                "Content-Disposition": "attachment; filename=alert-history.csv",
                "X-Total-Count": str(page["total"])})
        if offset + limit < page["total"]:
            page["next_offset"] = offset + limit
        return jsonify(page)

    @app.route(ALERTS_PATH + "/settings", methods=["GET", "PUT"])
    def alert_settings():
        denied = admin_denied()
        if denied:
            return denied
        if request.method == "GET":
            return jsonify(settings.current())
        body, bad = body_or_error()
        if bad:
            return bad
        try:
            return jsonify(settings.update(body, _author(body)))
        except (SettingsError, ValueError) as exc:
            return error(400, str(exc))
        except SettingsBusy as exc:
            return error(409, str(exc))
        except ApplyError as exc:
            return error(502, str(exc))

    def alert_request(alert_id):
        """(body, None) for an admin's request about a well-formed alert id, else (None, refusal)."""
        denied = admin_denied()
        if denied:
            return None, denied
        if not ALERT_ID.fullmatch(alert_id):
            return None, error(404, "An alert id is the 16 hex digits of its fingerprint")
        return body_or_error()

    @app.route(ALERTS_PATH + "/<alert_id>/acknowledge", methods=["POST", "DELETE"])
    def acknowledge(alert_id):
        body, bad = alert_request(alert_id)
        if bad:
            return bad
        try:
            by = _author(body)
            if request.method == "DELETE":
                return upstream(lambda: jsonify(management.unacknowledge(alert_id, by)))
            comment = body.get("comment") or "Acknowledged through api-token-exporter"
            if not isinstance(comment, str) or len(comment) > 1000:
                raise ValueError("comment must be text of at most 1000 characters")
            duration = _parse_duration(body.get("duration"))
        except ValueError as exc:
            return error(400, str(exc))
        return upstream(lambda: (jsonify(management.acknowledge(alert_id, by, comment, duration)), 201))

    @app.route(ALERTS_PATH + "/<alert_id>/feedback", methods=["POST"])
    def feedback(alert_id):
        body, bad = alert_request(alert_id)
        if bad:
            return bad
        verdict, note = body.get("verdict"), body.get("note") or ""
        if verdict not in VERDICTS:
            return error(400, f"verdict must be one of {', '.join(VERDICTS)}")
        if not isinstance(note, str) or len(note) > 2000:
            return error(400, "note must be text of at most 2000 characters")
        try:
            by = _author(body)
        except ValueError as exc:
            return error(400, str(exc))
        return upstream(lambda: (jsonify(management.feedback(alert_id, verdict, note, by)), 201))

    if s.alert_webhook_token:
        paths.add(WEBHOOK_PATH)

        @app.route(WEBHOOK_PATH, methods=["POST"])
        def webhook():
            if not same(bearer(request.headers.get("Authorization")), s.alert_webhook_token):
                return error(401, "The alert webhook needs alert_webhook_token as a bearer token")
            body, bad = body_or_error()
            if bad:
                return bad
            try:
                result = management.receive(body)
            except ValueError as exc:
                return error(400, str(exc))
            return jsonify(result), 200 if not result["errors"] or result["stored"] else 400
    return management


def _csv(alerts) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for a in alerts:
        token, ack, verdict = a["token"] or {}, a["acknowledgement"] or {}, a["feedback"] or {}
        row = {"id": a["id"], "type": a["type"], "severity": a["severity"], "status": a["status"],
               "token": token.get("id"), "token_name": token.get("name"), "tenant": token.get("tenant"),
               "starts_at": a["starts_at"], "ends_at": a["ends_at"], "duration_seconds": a["duration_seconds"],
               "acknowledged_by": ack.get("by"), "acknowledged_at": ack.get("at"),
               "acknowledgement_comment": ack.get("comment"), "verdict": verdict.get("verdict"),
               "notified": a["notified"], "found_in": a["found_in"], "summary": a["summary"]}
        # a spreadsheet must not run what an alert's text says (formula injection)
        writer.writerow({k: ("'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v)
                         for k, v in row.items()})
    return out.getvalue()
