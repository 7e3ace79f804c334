// Alerts: the active alerts with their context, acknowledge (an Alertmanager silence) and
// feedback, and the history with filters, all through the alert API (/api/v1/alerts).
"use strict";

(() => {
  const {api, el, num, when, utcDate} = ATE;
  const SEVERITY = {critical: "bad", warning: "warn", info: "info"};
  const STATE = {firing: "bad", acknowledged: "good", silenced: "info", inhibited: "info"};
  const by = document.getElementById("by");
  const filters = document.getElementById("history-filters");
  by.value = localStorage.getItem("ate-by") || "";
  by.addEventListener("change", () => localStorage.setItem("ate-by", by.value.trim()));

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = Math.round(seconds % 60);
    return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
  }
  const tokenText = (t) => t ? `${t.name || t.id}${t.tenant ? ` (${t.tenant})` : ""}` : "–";
  const author = () => by.value.trim() ? {by: by.value.trim()} : {};

  async function act(button, path, body, done, method = "POST") {
    const note = button.closest(".alert").querySelector(".outcome");
    button.disabled = true;
    try {
      await api(path, {method, body: {...body, ...author()}});
      note.textContent = done;
      await refresh();
    } catch (e) {
      note.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  }

  function ackControls(a) {
    if (a.state === "acknowledged" && a.acknowledgement) {
      const ack = a.acknowledgement;
      return el("p", {class: "context"}, `Acknowledged by ${ack.by || "admin"}`,
        ack.until ? ` until ${when(ack.until)}` : "", ack.comment ? `: ${ack.comment}` : "", " ",
        el("button", {type: "button", class: "secondary small", dataset: {action: "unacknowledge"},
                      onclick: (event) => act(event.currentTarget, `../api/v1/alerts/${a.id}/acknowledge`, {},
                                              "No longer acknowledged.", "DELETE")}, "Unacknowledge"));
    }
    const id = a.id;
    const comment = el("input", {name: "comment", id: `c-${id}`, maxlength: "1000", size: "30", placeholder: "what you are doing about it"});
    const length = el("select", {name: "duration", id: `d-${id}`},
      [["1h", "1 hour"], ["4h", "4 hours"], ["24h", "24 hours"], ["168h", "7 days"]].map(
        ([value, label]) => el("option", {value, selected: value === "4h"}, label)));
    const button = el("button", {type: "submit", dataset: {action: "acknowledge"}}, "Acknowledge");
    return el("form", {class: "ack", onsubmit: (event) => {
      event.preventDefault();
      act(button, `../api/v1/alerts/${id}/acknowledge`,
          {comment: comment.value.trim() || undefined, duration: length.value}, "Acknowledged: its notifications are silenced.");
    }}, el("label", {for: `c-${id}`}, "Comment", comment), el("label", {for: `d-${id}`}, "For", length), button);
  }

  function feedbackControls(a) {
    const button = (verdict, label) => el("button", {type: "button", class: "secondary small", dataset: {verdict},
      onclick: (event) => act(event.currentTarget, `../api/v1/alerts/${a.id}/feedback`, {verdict},
                              `Thank you: recorded as ${label.toLowerCase()}.`)}, label);
    return el("p", {class: "context"}, "Was it right to fire? ",
      button("true_positive", "True positive"), " ", button("false_positive", "False positive"));
  }

  function alertCard(a) {
    const context = [`since ${when(a.since)}`];
    // the value with its unit as the alert states it; a bare number only for alerts without one
    if (a.measured) context.push(`measured ${a.measured}`);
    else if (a.value !== null && a.value !== undefined) context.push(`value ${ATE_FORMAT.number(a.value)}`);
    if (a.threshold) context.push(`threshold ${a.threshold}`);
    return el("article", {class: "alert", dataset: {alertId: a.id, severity: a.severity, state: a.state},
                          "aria-labelledby": `a-${a.id}`},
      el("header", {},
        el("span", {class: `badge ${SEVERITY[a.severity] || "info"}`}, a.severity || "none"),
        el("h3", {id: `a-${a.id}`}, a.type),
        el("span", {class: `badge ${STATE[a.state] || "info"}`, dataset: {field: "state"}}, a.state),
        el("span", {class: "muted"}, a.token ? `token ${tokenText(a.token)}` : "")),
      el("p", {}, a.summary || ""),
      a.description ? el("p", {class: "context"}, a.description) : null,
      el("p", {class: "context"}, context.join(" · "),
        a.runbook ? [" · ", el("a", {href: a.runbook}, "runbook")] : null,
        a.dashboard ? [" · ", el("a", {href: a.dashboard}, "dashboard")] : null),
      ackControls(a), feedbackControls(a),
      el("p", {class: "context outcome", role: "status"}));
  }

  // cards are replaced only when their alert changed, so a comment being typed survives a refresh
  function showActive(alerts) {
    const list = document.getElementById("active");
    const old = new Map([...list.children].filter((n) => n.dataset.alertId).map((n) => [n.dataset.alertId, n]));
    const cards = alerts.map((a) => {
      const version = JSON.stringify([a.state, a.acknowledgement, a.value, a.since]);
      const kept = old.get(a.id);
      if (kept && kept.dataset.version === version) return kept;
      const card = alertCard(a);
      card.dataset.version = version;
      return card;
    });
    list.replaceChildren(...(cards.length ? cards : [el("p", {class: "muted"}, "Nothing is firing.")]));
    document.getElementById("active-count").textContent = `(${alerts.length})`;
  }

  function historyQuery() {
    const q = new URLSearchParams({limit: "100"});
    for (const name of ["token", "type", "severity"]) if (filters[name].value.trim()) q.set(name, filters[name].value.trim());
    if (filters.from.value) q.set("from", filters.from.value);
    // up to the end of that day; today: up to now (a firing episode lasts until the range's end)
    if (filters.to.value && filters.to.value < utcDate(new Date())) {
      q.set("to", utcDate(new Date(Date.parse(filters.to.value + "T00:00:00Z") + 86400e3)));
    }
    return q;
  }

  function showHistory(page) {
    document.getElementById("history-count").textContent =
      `${num(page.total)} episode${page.total === 1 ? "" : "s"} from ${when(page.from)} to ${when(page.to)}` +
      (page.total > page.alerts.length ? `; the newest ${page.alerts.length} shown` : "");
    document.getElementById("history").replaceChildren(page.alerts.length ? ATE.table(
      ["Started", "Ended", "Lasted", "Alert", "Severity", "Token", "Status", "Acknowledged by", "Feedback"],
      page.alerts.map((a) => [when(a.starts_at), when(a.ends_at), duration(a.duration_seconds), a.type,
                              el("span", {class: `badge ${SEVERITY[a.severity] || "info"}`}, a.severity || "–"),
                              tokenText(a.token), a.status, a.acknowledgement ? a.acknowledgement.by : "–",
                              a.feedback ? a.feedback.verdict.replace("_", " ") : "–"]),
      {id: "history-table"}) : el("p", {class: "muted"}, "No alerts in this range."));
  }

  async function load() {
    const [active, page] = await Promise.all([api("../api/v1/alerts"), api("../api/v1/alerts/history?" + historyQuery())]);
    showActive(active.alerts);
    showHistory(page);
  }

  filters.from.value = utcDate(new Date(Date.now() - 6 * 86400e3));
  filters.to.value = utcDate(new Date());
  filters.addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  api("../admin/token-details").then((doc) => {
    for (const t of doc.tokens) filters.token.append(el("option", {value: t.id}, t.name ? `${t.name} (${t.id})` : t.id));
  }).catch((e) => ATE.showError(e.message));

  const refresh = ATE.every(load);
})();
