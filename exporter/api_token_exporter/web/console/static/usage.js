// Usage: the periods, trends and predictions from /api/analytics/usage, the breakdown by
// model and service from /analytics/tokens, for one token or all, with CSV and JSON exports of
// what is shown. The charts and the breakdown cover From to To; choosing Daily, Weekly or
// Monthly moves From to that view's usual span (30 days, 12 weeks, 12 months) unless it was
// set by hand. Charts are uPlot (vendored in uplot/); each has its data as a table too.
"use strict";

(() => {
  const {api, el, num, usd, utcDate} = ATE;
  const VIEWS = {daily: ["date", "per day"], weekly: ["weekStart", "per week"], monthly: ["month", "per month"]};
  const CHARTS = {
    requests: {label: "Requests", color: "#0b5cad", kind: "area", format: num},
    tokens: {label: "LLM tokens", color: "#8250df", kind: "bars", format: num},
    cost: {label: "Cost (USD)", color: "#1a7f37", kind: "line", format: usd},
  };
  const charts = window.ATE_CHARTS = {};
  const form = document.getElementById("filters");
  const params = new URLSearchParams(location.search);
  const today = utcDate(new Date());
  // the first day of a view's usual span ending on the day ``to``: 30 days, or the Monday 11
  // weeks before to's week, or the first of the month 11 months before to's month
  function presetFrom(view, to) {
    const d = new Date(to + "T00:00:00Z");
    if (view === "daily") d.setUTCDate(d.getUTCDate() - 29);
    if (view === "weekly") d.setUTCDate(d.getUTCDate() - (d.getUTCDay() + 6) % 7 - 77);
    if (view === "monthly") { d.setUTCDate(1); d.setUTCMonth(d.getUTCMonth() - 11); }
    return utcDate(d);
  }
  const view = VIEWS[params.get("view")] ? params.get("view") : "daily";
  const to = params.get("to") || today;
  const state = {token: params.get("token") || "", from: params.get("from") || presetFrom(view, to), to, view};
  let shown = null;            // the documents on screen, for the exports

  form.token.value = state.token;
  form.from.value = state.from;
  form.to.value = state.to;
  document.querySelector(`#view input[value="${state.view}"]`).checked = true;

  const F = ATE_FORMAT;
  const epoch = (period) => Date.parse(period.length === 7 ? period + "-01T00:00:00Z" : period + "T00:00:00Z") / 1000;

  function query(extra = {}) {
    const q = new URLSearchParams(extra);
    if (state.token) q.set("token", state.token);
    return q.toString() ? "?" + q : "";
  }

  // weeks ticked on their Mondays and months on their first day (the points themselves), as
  // many as fit; days where uPlot puts them
  function xAxis(view) {
    const axis = {space: 90, values: (u, vals) => vals.map((ts) => F.isoDate(ts))};
    if (view !== "daily") {
      axis.splits = (u) => {
        const xs = u.data[0], every = Math.max(1, Math.ceil(xs.length * 90 / Math.max(1, u.width)));
        return xs.filter((_, i) => (xs.length - 1 - i) % every === 0);
      };
    }
    return axis;
  }

  function chartOptions(key, width, step, view) {
    const c = CHARTS[key];
    const series = {label: c.label, stroke: c.color, width: 2, value: (u, v) => v === null ? "–" : c.format(v)};
    if (c.kind === "area") series.fill = c.color + "2e";
    if (c.kind === "bars") Object.assign(series, {fill: c.color + "b3", paths: uPlot.paths.bars({size: [0.7, 48]}), points: {show: false}});
    if (c.kind === "line") series.points = {show: true, size: 5};
    return {
      width, height: 210, tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      scales: {x: {time: true, range: (u, min, max) => [min - step / 2, max + step / 2]},
               y: {range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1]}},
      series: [{value: (u, ts) => ts === null ? "–" : F.isoDate(ts)}, series],
      axes: [xAxis(view),
             {size: 64, values: (u, vals, axis, space, step) => vals.map((v) => key !== "cost" ? F.compact(v)
               : F.usdTick(v, step))}],
      legend: {show: true, live: true},      // the value under the cursor, with its date
    };
  }

  function drawChart(key, rows, asked) {
    const figure = document.getElementById(`chart-${key}`);
    const plot = figure.querySelector(".plot");
    const [field, words] = VIEWS[asked.view];
    const xs = rows.map((r) => epoch(r[field]));
    const ys = rows.map((r) => r[key]);
    const step = xs.length > 1 ? xs[1] - xs[0] : 86400;
    if (charts[key]) charts[key].destroy();
    charts[key] = new uPlot(chartOptions(key, Math.max(280, plot.clientWidth), step, asked.view), [xs, ys], plot);
    const total = ys.reduce((a, b) => a + b, 0);
    plot.setAttribute("aria-label", `${CHARTS[key].label} ${words}, ${asked.from} to ${asked.to}: ` +
                      `${CHARTS[key].format(total)} in total. The table below has each value.`);
    figure.querySelector(".data").replaceChildren(ATE.table([field === "date" ? "Day" : field === "month" ? "Month" : "Week from",
                                                             CHARTS[key].label],
      rows.map((r) => [r[field], CHARTS[key].format(r[key])]).reverse()));
  }

  // From and To as the API's start and end: To's whole day, until now for today
  function dateRange(filters) {
    const q = {start: filters.from};
    if (filters.to < today) q.end = utcDate(new Date(Date.parse(filters.to + "T00:00:00Z") + 86400e3));
    return q;
  }

  // ``asked``: the filters the answers are for (the user may have changed them meanwhile)
  function show(usage, breakdown, asked) {
    shown = {usage, breakdown, asked};
    for (const [period, entry] of Object.entries(usage.summary)) {
      const card = document.querySelector(`[data-period="${period}"]`);
      for (const field of ["requests", "tokens", "cost"]) {
        const node = card.querySelector(`[data-field="${field}"]`);
        node.textContent = field === "cost" ? usd(entry[field]) : num(entry[field]);
        node.dataset.value = String(entry[field]);
      }
    }
    for (const key of Object.keys(CHARTS)) drawChart(key, usage.trends[asked.view], asked);
    const p = usage.predictions;
    for (const [key, format] of [["estimatedMonthlyCost", usd], ["projectedRequests", num], ["projectedTokens", num]]) {
      const node = document.querySelector(`[data-prediction="${key}"] .value`);
      node.textContent = format(p[key]);
      node.dataset.value = String(p[key]);
    }
    document.getElementById("basis").textContent =
      `At the ${p.basis} (${(p.monthProgress * 100).toFixed(1)} % of the month has passed).`;
    document.getElementById("by-model").replaceChildren(breakdown.byModel.length ? ATE.table(
      ["Model", "Prompt tokens", "Completion tokens", "LLM requests", "Cost"],
      breakdown.byModel.map((m) => [m.model, num(m.promptTokens), num(m.completionTokens), num(m.requestCount), usd(m.estimatedCost)]),
      {id: "models"}) : el("p", {class: "muted"}, "No LLM usage in this range."));
    const services = Object.entries(breakdown.byService);
    document.getElementById("by-service").replaceChildren(services.length ? ATE.table(
      ["Service", "Models", "Total tokens", "LLM requests", "Cost"],
      services.map(([name, s]) => [name, s.models.join(", "), num(s.totalTokens), num(s.requestCount), usd(s.estimatedCost)]),
      {id: "services"}) : el("p", {class: "muted"}, "No LLM usage in this range."));
  }

  async function load() {
    const asked = {...state};
    const [usage, breakdown] = await Promise.all([
      api("../api/analytics/usage" + query({view: asked.view, ...dateRange(asked)})),
      api("../analytics/tokens" + query({...dateRange(asked), byDay: "false"})),
    ]);
    show(usage, breakdown, asked);
  }

  function remember() {
    const q = new URLSearchParams({view: state.view, from: state.from, to: state.to});
    if (state.token) q.set("token", state.token);
    history.replaceState(null, "", "?" + q);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (form.from.value > form.to.value) return ATE.showError("From must not be after To.");
    Object.assign(state, {token: form.token.value, from: form.from.value, to: form.to.value});
    remember();
    refresh();
  });
  document.getElementById("view").addEventListener("change", (event) => {
    if (state.from === presetFrom(state.view, state.to)) {
      state.from = form.from.value = presetFrom(event.target.value, state.to);
    }
    state.view = event.target.value;
    remember();
    refresh();
  });
  window.addEventListener("resize", () => {
    for (const [key, chart] of Object.entries(charts)) {
      chart.setSize({width: Math.max(280, document.querySelector(`#chart-${key} .plot`).clientWidth), height: 210});
    }
  });

  function slug() {
    return shown.asked.view + (shown.asked.token ? "-" + shown.asked.token : "");
  }
  document.getElementById("export-csv").addEventListener("click", () => {
    if (!shown) return;
    const view = shown.asked.view, field = VIEWS[view][0];
    const lines = ["period,requests,llm_tokens,cost_usd"].concat(shown.usage.trends[view].map(
      (r) => [r[field], r.requests, r.tokens, r.cost].join(",")));
    ATE.download(`usage-${slug()}.csv`, "text/csv", lines.join("\n") + "\n");
  });
  document.getElementById("export-json").addEventListener("click", () => {
    if (!shown) return;
    const u = shown.usage, view = shown.asked.view;
    ATE.download(`usage-${slug()}.json`, "application/json", JSON.stringify({
      generatedAt: u.generatedAt, filters: {...shown.asked},
      summary: u.summary, trend: {view, points: u.trends[view]}, predictions: u.predictions,
      breakdown: {start: shown.breakdown.summary.timeframe.startDate, end: shown.breakdown.summary.timeframe.endDate,
                  byModel: shown.breakdown.byModel, byService: shown.breakdown.byService},
    }, null, 2) + "\n");
  });

  // the token list once: the tokens this session may see
  api("../admin/token-details").then((doc) => {
    for (const t of doc.tokens) form.token.append(el("option", {value: t.id}, t.name ? `${t.name} (${t.id})` : t.id));
    form.token.value = state.token;
  }).catch((e) => ATE.showError(e.message));

  const refresh = ATE.every(load);
})();
