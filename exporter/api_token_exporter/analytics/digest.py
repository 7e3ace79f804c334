"""Usage digests (`api-token-exporter digest`, and the exporter's schedule): a summary of one
period, overall or per tenant, with the period of the same length before it.

The summary is a JSON document (the generic webhook's body; digest_channels formats it for
Slack, Discord and email): HTTP requests and errors, top tokens and endpoints, LLM tokens and
cost, budget use, the alerts and anomalies of the period, and the change against the previous
period. Every count is exact (exact.py), and the LLM section is computed by the very function
behind `report` and /analytics/tokens, so a digest and `report` for the same period agree.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import queries as analytics
from .queries import UTC, AnalyticsError, PrometheusUnavailable, iso

DIGEST_KIND = "api-token-exporter.digest"
DIGEST_VERSION = 1
PERIODS = ("day", "week")
BUDGET_WINDOWS = {"daily": 86400.0, "monthly": 30 * 86400.0}   # as the budget rules and alerts
BUDGET_LEVELS = ((1.0, "exhausted"), (0.95, "critical"), (0.85, "warning"))   # seed thresholds
MAX_ALERT_EPISODES = 1000


@dataclass(frozen=True)
class Period:
    """(start, end] in Unix seconds; ``name`` is day, week or range."""
    name: str
    start: float
    end: float

    @property
    def previous(self) -> "Period":
        lo, hi = analytics.previous_range(self.start, self.end)
        return Period(self.name, lo, hi)

    @property
    def key(self) -> str:
        return f"{self.name}:{int(self.start)}-{int(self.end)}"

    @property
    def label(self) -> str:
        first = dt.datetime.fromtimestamp(self.start, UTC)
        last = dt.datetime.fromtimestamp(self.end, UTC)
        whole_days = self.start % 86400 == 0 and self.end % 86400 == 0
        if whole_days and self.end - self.start == 86400:
            return first.strftime("%Y-%m-%d")
        if whole_days:
            return f"{first:%Y-%m-%d} to {last - dt.timedelta(days=1):%Y-%m-%d}"
        fmt = "%Y-%m-%d %H:%M" if self.start % 60 == 0 and self.end % 60 == 0 else "%Y-%m-%d %H:%M:%S"
        return f"{first.strftime(fmt)} to {last.strftime(fmt)} UTC"

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "start": iso(self.start), "end": iso(self.end)}


def day_start(ts: float) -> float:
    return float(int(ts // 86400) * 86400)


def resolve_period(kind: Optional[str], start: Optional[str], end: Optional[str], now: float) -> Period:
    """``day``: yesterday (UTC); ``week``: the 7 whole days before today; or ``start``/``end``
    (ISO 8601; end defaults to now)."""
    if start or end:
        if kind:
            raise AnalyticsError("give either --period or --start/--end, not both")
        if not start:
            raise AnalyticsError("--end needs --start")
        lo = analytics.parse_time("start", start)
        hi = analytics.parse_time("end", end) if end else now
        if hi > now + 60:
            raise AnalyticsError("end must not be in the future")
        if lo >= hi:
            raise AnalyticsError("start must be before end")
        if hi - lo > 366 * 86400:
            raise AnalyticsError("a digest covers at most 366 days")
        return Period("range", lo, hi)
    kind = kind or "day"
    if kind not in PERIODS:
        raise AnalyticsError(f"period must be day or week, got {kind!r}")
    hi = day_start(now)
    return Period(kind, hi - (86400 if kind == "day" else 7 * 86400), hi)


# -- who a digest is about -----------------------------------------------------------------------
@dataclass
class Audience:
    """Overall (``tenant`` None: every token) or one tenant's tokens."""
    tenant: Optional[str]
    scope: analytics.Scope

    @property
    def key(self) -> str:
        return "overall" if self.tenant is None else f"tenant:{self.tenant}"

    @property
    def title(self) -> str:
        return "all tokens" if self.tenant is None else f"tenant {self.tenant}"


def tenant_audience(keystore, tenant: str) -> Audience:
    return Audience(tenant, analytics.Scope([k.id for k in keystore.all() if k.tenant == tenant]))


def audiences(mode: str, keystore=None, tenant: Optional[str] = None) -> List[Audience]:
    """One tenant (``tenant``), every tenant of the key file (``per-tenant``) or ``overall``."""
    if tenant:
        if keystore is None:
            raise AnalyticsError("a tenant's digest needs the key file (--keys-file or keys_file)")
        if not any(k.tenant == tenant for k in keystore.all()):
            raise AnalyticsError(f"no key of tenant {tenant!r} in the key file")
        return [tenant_audience(keystore, tenant)]
    if mode == "per-tenant":
        if keystore is None:
            raise AnalyticsError("per-tenant digests need the key file (--keys-file or keys_file)")
        tenants = sorted({k.tenant for k in keystore.all() if k.tenant})
        if not tenants:
            raise AnalyticsError("per-tenant digests: no key in the key file has a tenant")
        return [tenant_audience(keystore, t) for t in tenants]
    return [Audience(None, analytics.Scope())]


# -- alerts of the period ------------------------------------------------------------------------
class HistoryAlerts:
    """Episodes from the alert history (alert_store): exact starts and ends."""
    name = "history"

    def __init__(self, history):
        self.history = history

    def episodes(self, start: float, end: float) -> List[dict]:
        rows, _ = self.history.history(start, end, limit=MAX_ALERT_EPISODES)
        return [{"alertname": e.alertname, "severity": e.labels.get("severity", ""),
                 "token": e.labels.get("token", ""), "anomaly": e.labels.get("anomaly", ""),
                 "startsAt": iso(e.starts_at), "endsAt": iso(e.ends_at) if e.ends_at else None}
                for e, _events in rows if e.starts_at <= end and (e.ends_at is None or e.ends_at > start)]


class PrometheusAlerts:
    """Without an alert history: the alerts Prometheus's ``ALERTS`` series shows firing at any
    evaluation in the period, one entry per alert (its episodes are not told apart)."""
    name = "prometheus"

    def __init__(self, client: analytics.PrometheusClient):
        self.client = client

    def episodes(self, start: float, end: float) -> List[dict]:
        expr = (f'max by (alertname, severity, token, anomaly) (max_over_time('
                f'ALERTS{{alertstate="firing", alertname!="Watchdog"}}[{max(1, int(end - start))}s] @ {end:.3f}))')
        return [{"alertname": m.get("alertname", ""), "severity": m.get("severity", ""),
                 "token": m.get("token", ""), "anomaly": m.get("anomaly", ""), "startsAt": None, "endsAt": None}
                for m, _ in self.client.query(expr, end)]


def alerts_section(source, audience: Audience, period: Period, top_n: int) -> dict:
    if source is None:
        return {"source": "none", "total": 0, "anomalies": 0, "bySeverity": {}, "byName": []}
    try:
        found = source.episodes(period.start, period.end)
    except PrometheusUnavailable:
        raise
    except Exception as exc:                     # a broken history database: the rest still goes out
        return {"source": source.name, "error": f"the alert history could not be read ({type(exc).__name__})",
                "total": 0, "anomalies": 0, "bySeverity": {}, "byName": []}
    if audience.scope.tokens is not None:         # a tenant sees its own tokens' alerts only
        own = set(audience.scope.tokens)
        found = [a for a in found if a["token"] in own]
    groups: Dict[Tuple[str, str], dict] = {}
    for a in found:
        g = groups.setdefault((a["alertname"], a["severity"]), {
            "alertname": a["alertname"], "severity": a["severity"], "anomaly": a["anomaly"] or None,
            "count": 0, "tokens": []})
        g["count"] += 1
        if a["token"] and a["token"] not in g["tokens"]:
            g["tokens"].append(a["token"])
    rank = {"critical": 0, "warning": 1, "info": 2}
    by_name = sorted(groups.values(), key=lambda g: (rank.get(g["severity"], 3), -g["count"], g["alertname"]))
    for g in by_name:
        g["tokens"].sort()
    severities: Dict[str, int] = {}
    for a in found:
        severities[a["severity"] or "none"] = severities.get(a["severity"] or "none", 0) + 1
    return {"source": source.name, "total": len(found), "anomalies": sum(1 for a in found if a["anomaly"]),
            "bySeverity": dict(sorted(severities.items())), "byName": by_name[:max(top_n * 2, 10)]}


# -- the summary -------------------------------------------------------------------------------
def _requests_parts(m: str) -> analytics.Parts:
    sel = f"apitoken_requests_total{{{m}}}"
    return {"token_code": (sel, ("token", "code")), "route_code": (sel, ("route", "code")),
            "llm_tokens": (f"apitoken_llm_tokens_total{{{m}}}", ("token",)),
            "llm_cost": (f"apitoken_llm_cost_usd_total{{{m}}}", ("token",))}


def _previous_parts(m: str) -> analytics.Parts:
    sel = f"apitoken_requests_total{{{m}}}"
    return {"token_code": (sel, ("token", "code")),
            "tokens": (f"apitoken_llm_tokens_total{{{m}}}", ()),
            "cost": (f"apitoken_llm_cost_usd_total{{{m}}}", ()),
            "llm_requests": (f"apitoken_llm_requests_total{{{m}}}", ())}


def _is_error(code: str) -> bool:
    return code[:1] in ("4", "5")


def _budgets(client: analytics.PrometheusClient, m: str, at: float) -> List[Tuple[str, str, float]]:
    rows = client.query(f"max by (token, period) (last_over_time(apitoken_budget_usd{{{m}}}[1h] @ {at:.3f}))", at)
    return sorted((labels.get("token", ""), labels.get("period", ""), value) for labels, value in rows
                  if value > 0 and labels.get("period") in BUDGET_WINDOWS)


def build_digest(client: analytics.PrometheusClient, period: Period, audience: Audience, keystore=None,
                 alerts=None, top_n: int = 5, now: Optional[float] = None,
                 deadline: Optional[float] = None) -> dict:
    """The digest document of ``period`` for ``audience``."""
    now = time.time() if now is None else now
    m = audience.scope.matcher
    a, b = period.start, period.end
    before = period.previous
    budgets = _budgets(client, m, b)
    windows = sorted({p for _, p, _ in budgets})
    jobs = [(_requests_parts(m), a, b), (_previous_parts(m), before.start, before.end)]
    jobs += [({"cost": (f"apitoken_llm_cost_usd_total{{{m}}}", ("token",))}, b - BUDGET_WINDOWS[w], b)
             for w in windows]
    results = analytics.run_queries(client, jobs, None, deadline=deadline)
    llm_doc, llm_rows = analytics.tokens_report_rows(client, audience.scope, a, b, deadline=deadline)

    def grouped(rows, q):
        return [(labels, value) for labels, value in rows if labels.get("q") == q]

    tokens: Dict[str, dict] = {}

    def token(t: str) -> dict:
        if t not in tokens:
            key = keystore.get(t) if keystore is not None else None
            tokens[t] = {"token": t, "name": key.name if key else "", "tenant": key.tenant if key else "",
                         "requests": 0, "errors": 0, "serverErrors": 0, "llmTokens": 0, "cost": 0.0,
                         "previousRequests": 0}
        return tokens[t]

    totals = {"requests": 0, "errors": 0, "serverErrors": 0}
    for labels, value in grouped(results[0], "token_code"):
        n, code, entry = int(round(value)), labels.get("code", ""), token(labels.get("token", ""))
        entry["requests"] += n
        totals["requests"] += n
        if _is_error(code):
            entry["errors"] += n
            totals["errors"] += n
        if code.startswith("5"):
            entry["serverErrors"] += n
            totals["serverErrors"] += n
    for labels, value in grouped(results[0], "llm_tokens"):
        token(labels.get("token", ""))["llmTokens"] += int(round(value))
    for labels, value in grouped(results[0], "llm_cost"):
        entry = token(labels.get("token", ""))
        entry["cost"] = round(entry["cost"] + value, 6)
    routes: Dict[str, dict] = {}
    for labels, value in grouped(results[0], "route_code"):
        route = routes.setdefault(labels.get("route", ""), {"route": labels.get("route", ""), "requests": 0,
                                                             "errors": 0, "serverErrors": 0})
        n, code = int(round(value)), labels.get("code", "")
        route["requests"] += n
        route["errors"] += n if _is_error(code) else 0
        route["serverErrors"] += n if code.startswith("5") else 0

    prev = {"requests": 0, "errors": 0, "serverErrors": 0, "tokens": 0, "cost": 0.0, "llmRequests": 0}
    for labels, value in results[1]:
        q, n = labels.get("q"), value
        if q == "token_code":
            code = labels.get("code", "")
            prev["requests"] += int(round(n))
            prev["errors"] += int(round(n)) if _is_error(code) else 0
            prev["serverErrors"] += int(round(n)) if code.startswith("5") else 0
            if labels.get("token", "") in tokens:
                tokens[labels["token"]]["previousRequests"] += int(round(n))
        elif q == "tokens":
            prev["tokens"] += int(round(n))
        elif q == "cost":
            prev["cost"] = round(prev["cost"] + n, 6)
        elif q == "llm_requests":
            prev["llmRequests"] += int(round(n))

    spent = {w: {labels.get("token", ""): value for labels, value in rows}
             for w, rows in zip(windows, results[2:])}
    budget_rows = []
    for t, window, budget in budgets:
        used = round(spent[window].get(t, 0.0), 6)
        ratio = round(used / budget, 4)
        level = next((name for limit, name in BUDGET_LEVELS if ratio >= limit), "ok")
        key = keystore.get(t) if keystore is not None else None
        budget_rows.append({"token": t, "name": key.name if key else "", "period": window,
                            "budgetUsd": budget, "spentUsd": used, "usedRatio": ratio, "level": level,
                            "window": {"start": iso(b - BUDGET_WINDOWS[window]), "end": iso(b)}})
    budget_rows.sort(key=lambda r: (-r["usedRatio"], r["token"], r["period"]))

    s = llm_doc["summary"]
    llm_requests = sum(r["requestCount"] for r in llm_rows)
    current = {"requests": totals["requests"], "errors": totals["errors"], "serverErrors": totals["serverErrors"],
               "tokens": s["totalTokens"], "cost": s["estimatedCost"], "llmRequests": llm_requests}
    change = {name: analytics.change(current[name], prev[name])
              for name in ("requests", "errors", "serverErrors", "tokens", "cost", "llmRequests")}
    top_tokens = sorted(tokens.values(), key=lambda e: (-e["requests"], -e["cost"], -e["llmTokens"], e["token"]))
    top_tokens = [e for e in top_tokens if e["requests"] or e["llmTokens"] or e["cost"]]
    for e in top_tokens:
        e["requestsChangePercent"] = analytics.change(e["requests"], e["previousRequests"])["changePercent"]
    models = sorted(llm_rows, key=lambda r: (-r["estimatedCost"], -r["totalTokens"], r["service"], r["model"]))
    return {
        "kind": DIGEST_KIND,
        "version": DIGEST_VERSION,
        "title": f"API usage digest, {audience.title}: {period.label}",
        "scope": {"tenant": audience.tenant,
                  "tokens": None if audience.scope.tokens is None else len(audience.scope.tokens)},
        "period": period.as_dict(),
        "previousPeriod": before.as_dict(),
        "requests": {"total": totals["requests"], "errors": totals["errors"],
                     "serverErrors": totals["serverErrors"],
                     "errorRate": round(totals["errors"] / totals["requests"], 4) if totals["requests"] else 0.0,
                     "tokensUsed": sum(1 for e in tokens.values() if e["requests"])},
        "llm": {"totalTokens": s["totalTokens"], "promptTokens": s["promptTokens"],
                "completionTokens": s["completionTokens"], "requests": llm_requests,
                "estimatedCost": s["estimatedCost"],
                "topModels": [{"service": r["service"], "model": r["model"], "totalTokens": r["totalTokens"],
                               "requestCount": r["requestCount"], "estimatedCost": round(r["estimatedCost"], 6)}
                              for r in models[:top_n]]},
        "change": change,
        "topTokens": top_tokens[:top_n],
        "topEndpoints": sorted(routes.values(), key=lambda r: (-r["requests"], r["route"]))[:top_n],
        "budgets": budget_rows[:max(top_n, 10)],
        "alerts": alerts_section(alerts, audience, period, top_n),
        "generatedAt": iso(now),
    }


# -- plain text -------------------------------------------------------------------------------
def signed(c: dict, money: bool = False) -> str:
    """'+12 (+9.1 %)', '-$0.0400 (-20.0 %)', '+5 (new)', '±0'."""
    diff = c["change"]
    sign = "+" if diff > 0 else "-" if diff < 0 else "±"
    amount = f"${abs(diff):,.4f}" if money else f"{abs(diff):,}"
    if c["changePercent"] is None:
        return f"{sign}{amount} (new)" if diff else f"{sign}{amount}"
    return f"{sign}{amount} ({c['changePercent']:+.1f} %)"


def headline(d: dict) -> List[Tuple[str, str, str]]:
    """(label, value, change against the previous period) of the main numbers."""
    r, llm, ch = d["requests"], d["llm"], d["change"]
    return [
        ("Requests", f"{r['total']:,}", signed(ch["requests"])),
        ("Errors", f"{r['errors']:,} ({r['errorRate'] * 100:.1f} %, 5xx {r['serverErrors']:,})", signed(ch["errors"])),
        ("LLM tokens", f"{llm['totalTokens']:,}", signed(ch["tokens"])),
        ("LLM cost", f"${llm['estimatedCost']:,.4f}", signed(ch["cost"], money=True)),
        ("LLM requests", f"{llm['requests']:,}", signed(ch["llmRequests"])),
    ]


def who(e: dict) -> str:
    extra = ", ".join(x for x in (e.get("name"), e.get("tenant")) if x)
    return f"{e['token']} ({extra})" if extra else e["token"]


def count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def token_line(e: dict) -> str:
    line = f"{count(e['requests'], 'request')}, {count(e['errors'], 'error')}"
    if e["llmTokens"] or e["cost"]:
        line += f", {e['llmTokens']:,} LLM tokens, ${e['cost']:,.4f}"
    if e["requestsChangePercent"] is not None:
        line += f" ({e['requestsChangePercent']:+.1f} % requests)"
    return line


def endpoint_line(e: dict) -> str:
    return f"{count(e['requests'], 'request')}, {count(e['errors'], 'error')}"


def model_line(m: dict) -> str:
    return f"{count(m['totalTokens'], 'token')}, {count(m['requestCount'], 'request')}, ${m['estimatedCost']:,.4f}"


def budget_line(b: dict) -> str:
    return (f"{b['period']} ${b['spentUsd']:,.4f} of ${b['budgetUsd']:,.2f} "
            f"({b['usedRatio'] * 100:.1f} %, {b['level']})")


def alert_line(g: dict) -> str:
    tokens = ", ".join(g["tokens"][:5]) + (f" and {len(g['tokens']) - 5} more" if len(g["tokens"]) > 5 else "")
    kind = f"anomaly ({g['anomaly']})" if g["anomaly"] else g["severity"] or "alert"
    return f"{g['alertname']} [{kind}] x{g['count']}" + (f": {tokens}" if tokens else "")


def alerts_heading(d: dict) -> str:
    al = d["alerts"]
    source = {"history": "alert history", "prometheus": "Prometheus ALERTS", "none": "none"}.get(al["source"], al["source"])
    anomalies = f"{al['anomalies']:,} " + ("anomaly" if al["anomalies"] == 1 else "anomalies")
    return f"{count(al['total'], 'alert')} ({anomalies}), from {source}"


def to_text(d: dict) -> str:
    p, q = d["period"], d["previousPeriod"]
    lines = [d["title"], f"{p['start']} .. {p['end']}, against {q['start']} .. {q['end']}", ""]
    rows = headline(d)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines += [f"{label.ljust(w0)}  {value.rjust(w1)}  {diff}" for label, value, diff in rows]
    sections = [
        ("Top tokens", [f"{who(e)}: {token_line(e)}" for e in d["topTokens"]]),
        ("Top endpoints", [f"{e['route']}: {endpoint_line(e)}" for e in d["topEndpoints"]]),
        ("Top models", [f"{m['service']}/{m['model']}: {model_line(m)}" for m in d["llm"]["topModels"]]),
        ("Budgets (at the end of the period)", [f"{who(b)}: {budget_line(b)}" for b in d["budgets"]]),
        ("Alerts and anomalies: " + alerts_heading(d),
         [alert_line(g) for g in d["alerts"]["byName"]] + ([d["alerts"]["error"]] if d["alerts"].get("error") else [])),
    ]
    for title, items in sections:
        lines += ["", title] + ([f"  {i}" for i in items] if items else ["  none"])
    lines += ["", f"generated {d['generatedAt']} by api-token-exporter"]
    return "\n".join(lines) + "\n"


# -- the command --------------------------------------------------------------------------------
EXIT_BAD_ARGUMENTS, EXIT_PROMETHEUS, EXIT_DELIVERY = 2, 3, 4


def alerts_source(settings, client):
    """The alert history when the alert API keeps one (alertmanager_url, and alert_db_url or
    state_dir), else Prometheus's ALERTS."""
    from ..core.config import ConfigError
    url = settings.alert_db_url
    if not url and settings.alertmanager_url and settings.state_dir:
        url = f"sqlite:///{os.path.join(os.path.abspath(settings.state_dir), 'alerts.db')}"
    if url:
        try:
            from ..alerting.store import AlertHistory
            return HistoryAlerts(AlertHistory(url))
        except (ConfigError, ImportError):
            pass
    return PrometheusAlerts(client)


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2) + "\n"
