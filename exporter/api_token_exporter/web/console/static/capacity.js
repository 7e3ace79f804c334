// Capacity: the scenario planner over /api/analytics/capacity. At a multiple of each token's
// current pace: when each rate-limit window first runs out, and the month-end cost.
"use strict";

(() => {
  const {api, el, num, usd, when} = ATE;
  const form = document.getElementById("scenario");
  const state = {multiplier: "1", token: ""};

  function inWords(seconds) {
    if (seconds < 60) return `${Math.round(seconds)} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} days`;
  }

  function runsOut(w) {
    if (w.runsOutInSeconds === null) return el("span", {class: "badge good"}, "not at this pace");
    if (w.runsOutInSeconds === 0) return el("span", {class: "badge bad"}, "now, until it resets");
    return [el("span", {class: `badge ${w.runsOutInSeconds <= 3600 ? "bad" : "warn"}`}, `in ${inWords(w.runsOutInSeconds)}`),
            " ", when(w.runsOutAt)];
  }

  const ratio = (r) => r === null ? "–" : el("span", {class: `badge ${r >= 1 ? "bad" : r >= 0.8 ? "warn" : "good"}`},
                                            `${(r * 100).toFixed(r < 0.1 ? 1 : 0)} %`);

  function rows(t) {
    const windows = t.windows.length ? t.windows : [null];
    return windows.map((w, i) => {
      const cells = [];
      if (i === 0) {
        cells.push(el("th", {scope: "rowgroup", rowspan: String(windows.length)}, t.name || t.token,
                      el("div", {class: "muted"}, el("code", {}, t.token), t.tenant ? ` · ${t.tenant}` : "")));
        cells.push(el("td", {class: "num", rowspan: String(windows.length)}, `${num(Math.round(t.pacePerHour))} → ${num(Math.round(t.scenarioPerHour))}`));
      }
      if (w) {
        cells.push(el("td", {}, w.window), el("td", {class: "num"}, `${num(w.remaining)} / ${num(w.limit)}`),
                   el("td", {}, w.resetsAt ? when(w.resetsAt).slice(11) : "–"),
                   el("td", {class: "num"}, num(Math.round(w.scenarioUse)), " ", ratio(w.useRatio)),
                   el("td", {dataset: {field: "runs-out"}}, runsOut(w)));
      } else {
        cells.push(el("td", {colspan: "5", class: "muted"}, "no limits: inactive, expired or not in the key file"));
      }
      if (i === 0) {
        cells.push(el("td", {class: "num", rowspan: String(windows.length), dataset: {field: "month-end-cost", value: String(t.monthEnd.cost)}},
                      usd(t.monthEnd.cost)));
      }
      return el("tr", {dataset: {token: t.token, window: w ? w.window : "",
                                 runsOutIn: w && w.runsOutInSeconds !== null ? String(w.runsOutInSeconds) : ""}}, cells);
    });
  }

  function setTotal(key, value, format) {
    const node = document.querySelector(`[data-total="${key}"] .value`);
    node.textContent = format(value);
    node.dataset.value = String(value);
  }

  async function load() {
    const q = new URLSearchParams({multiplier: state.multiplier});
    if (state.token) q.set("token", state.token);
    const doc = await api("../api/analytics/capacity?" + q);
    setTotal("mtd-cost", doc.total.monthToDate.cost, usd);
    setTotal("end-cost", doc.total.monthEnd.cost, usd);
    setTotal("end-requests", doc.total.monthEnd.requests, num);
    setTotal("end-tokens", doc.total.monthEnd.tokens, num);
    document.getElementById("basis").textContent = `At ${doc.multiplier}x. Windows: ${doc.basis.windows}. ` +
      `Month end (${when(doc.monthEnds)}): ${doc.basis.monthEnd}.`;
    document.querySelector("#capacity tbody").replaceChildren(...doc.tokens.flatMap(rows));
    document.getElementById("capacity").dataset.multiplier = String(doc.multiplier);
  }

  form.addEventListener("change", (event) => {
    if (event.target.name === "preset") {
      form.multiplier.value = event.target.value;
      state.multiplier = event.target.value;
      refresh();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const typed = Number(form.multiplier.value);
    if (!(typed > 0 && typed <= 1000)) return ATE.showError("The multiplier must be above 0 and at most 1000.");
    state.multiplier = String(typed);
    state.token = form.token.value;
    for (const radio of form.preset) radio.checked = radio.value === state.multiplier;
    refresh();
  });
  api("../admin/token-details").then((doc) => {
    for (const t of doc.tokens) form.token.append(el("option", {value: t.id}, t.name ? `${t.name} (${t.id})` : t.id));
  }).catch((e) => ATE.showError(e.message));

  const refresh = ATE.every(load);
})();
