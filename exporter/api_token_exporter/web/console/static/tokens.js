// Tokens: the eight summary cards, a card per token and the recent requests, from /admin/stats
// and /admin/token-details (a tenant's session gets its tenant's tokens only).
"use strict";

(() => {
  const {api, el, num, when} = ATE;
  // a reset today (UTC) by its time, a later one with its date too: "tomorrow 09:17" must not read as the past
  const resetShown = (reset) => !reset ? "–"
    : reset.slice(0, 10) === ATE_FORMAT.isoDate(new Date()) ? reset.slice(11) : when(reset).slice(5, 16);
  const STATUS = {active: ["Active", "good"], rate_limited: ["Rate limited", "warn"], invalid: ["Invalid", "bad"],
                  inactive: ["Inactive", "bad"], expired: ["Expired", "bad"]};
  const tone = (code) => code >= 500 ? "bad" : code >= 400 ? "warn" : "good";

  function setCard(key, value) {
    const node = document.querySelector(`[data-card="${key}"] .value`);
    node.textContent = num(value);
    node.dataset.value = String(value);
  }

  const stat = (label, value, field) =>
    el("div", {}, el("dt", {}, label), el("dd", {dataset: {field, value: String(value)}}, num(value)));

  function tokenCard(t) {
    const [label, badge] = STATUS[t.status] || [t.status, "bad"];
    const heading = `token-${t.id}`;
    return el("article", {class: "token", "aria-labelledby": heading, dataset: {token: t.id, status: t.status}},
      el("header", {},
        el("h3", {id: heading}, t.name || t.id),
        el("span", {class: `badge ${badge}`, dataset: {field: "status"}}, label)),
      el("p", {class: "muted ident"}, el("code", {dataset: {field: "masked"}}, t.token_id),
         ` · ${t.id}`, t.tenant ? ` · ${t.tenant}` : ""),
      el("dl", {class: "stats"}, stat("Uses", t.usage_count, "usage_count"),
         stat("Successes", t.success_count, "success_count"), stat("Errors", t.error_count, "error_count")),
      el("table", {class: "windows"},
        el("caption", {class: "visually-hidden"}, `Rate-limit windows of ${t.name || t.id}`),
        el("thead", {}, el("tr", {}, ["Window", "Remaining", "Resets (UTC)"].map((h) => el("th", {scope: "col"}, h)))),
        el("tbody", {}, Object.entries(t.rate_limits).map(([window, w]) =>
          el("tr", {dataset: {window, remaining: String(w.remaining), limit: String(w.limit)}},
            el("th", {scope: "row"}, window),
            el("td", {}, `${num(w.remaining)} / ${num(w.limit)}`),
            el("td", {}, resetShown(w.reset)))))),
      el("p", {class: "last"}, "Last used ", el("span", {dataset: {field: "last_used"}}, when(t.last_used)),
         el("br"), "Hour window resets ", el("span", {dataset: {field: "reset"}}, when(t.rate_limit.reset))),
      el("h4", {}, "Top endpoints"),
      t.top_endpoints.length
        ? el("ol", {class: "endpoints"}, t.top_endpoints.map(([route, n]) =>
            el("li", {dataset: {route, count: String(n)}}, el("code", {}, route), el("span", {}, num(n)))))
        : el("p", {class: "muted"}, "No requests yet"));
  }

  function requestRow(r) {
    return el("tr", {dataset: {status: String(r.status)}},
      el("td", {}, r.time_str),
      el("td", {}, el("code", {}, `${r.method} ${r.endpoint}`)),
      el("td", {}, el("code", {}, r.token)),
      el("td", {}, el("span", {class: `badge ${tone(r.status)}`}, String(r.status))));
  }

  async function load() {
    const [stats, details] = await Promise.all([api("../admin/stats"), api("../admin/token-details")]);
    const t = stats.tokens;
    setCard("total_tokens", t.count);
    setCard("active", t.active);
    setCard("rate_limited", t.rate_limited);
    setCard("invalid", t.invalid);
    setCard("total_requests", stats.total_requests);
    setCard("successes", stats.success_count);
    setCard("errors", stats.error_count);
    setCard("per_hour", t.effective_limit);
    document.getElementById("tokens").replaceChildren(...details.tokens.map(tokenCard));
    const rows = stats.recent_requests.slice(0, 20).map(requestRow);
    document.querySelector("#recent tbody").replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", {colspan: "4", class: "muted"}, "No requests yet"))]));
  }

  ATE.every(load);
})();
