// Live: the requests as they happen, pushed by the server as Server-Sent Events from
// /admin/live (one message a second; read with fetch so the session's CSRF header goes along).
// The stream ends after a while, when the server restarts or the tab is hidden; the page
// reconnects. A tenant's session gets its tenant's tokens only.
"use strict";

(() => {
  const {el, num} = ATE;
  const F = ATE_FORMAT;
  const csrf = document.querySelector('meta[name="ate-csrf"]').content;
  const updated = document.getElementById("updated");
  const pause = document.getElementById("refresh");
  const MAX_ROWS = 100;
  const tone = (code) => code >= 500 ? "bad" : code >= 400 ? "warn" : "good";
  const ms = (x) => x === null || x === undefined ? "–" : `${num(x)} ms`;
  let controller = null, stopped = false, retryMs = 2000, timer = null, chart = null;

  pause.textContent = "Pause";
  pause.addEventListener("click", () => {
    if (stopped) { stopped = false; pause.textContent = "Pause"; connect(); }
    else { stop("Paused"); stopped = true; pause.textContent = "Resume"; }
  });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) stop("Paused while the page is hidden");
    else if (!stopped) connect();
  });

  function stop(why) {
    clearTimeout(timer);
    if (controller) controller.abort();
    controller = null;
    updated.textContent = why;
  }

  function again(why, wait = retryMs) {
    if (stopped || document.hidden) return;
    updated.textContent = why ? `Reconnecting in ${Math.round(wait / 1000)} s` : "Reconnecting…";
    if (why) ATE.showError(why);
    clearTimeout(timer);
    timer = setTimeout(connect, wait);
  }

  async function connect() {
    if (controller) controller.abort();
    clearTimeout(timer);
    const mine = controller = new AbortController();
    updated.dataset.connects = String(Number(updated.dataset.connects || 0) + 1);   // streams opened
    let response;
    try {
      response = await fetch("../admin/live", {headers: {"Accept": "text/event-stream", "X-CSRF-Token": csrf},
                                               credentials: "same-origin", signal: mine.signal});
    } catch (e) {
      if (mine === controller) again("The server did not answer.");
      return;
    }
    if (response.status === 401) return location.assign("login?next=live");
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      const wait = Number(response.headers.get("Retry-After"));
      return again(detail, wait > 0 ? wait * 1000 : retryMs);
    }
    updated.textContent = "Live";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", ended = null;
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
          ended = frame(buffer.slice(0, end)) || ended;
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      if (mine !== controller) return;          // stopped here
      return again("The live stream was interrupted.");
    }
    if (mine !== controller) return;
    // the stream's time is up: again at once; the server stopping or gone: after a pause
    again(null, ended === "time" ? 0 : retryMs);
  }

  // one Server-Sent Events frame; returns the reason of an "end" event
  function frame(text) {
    let event = "message", data = "";
    for (const line of text.split("\n")) {
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data += (data ? "\n" : "") + value;
      else if (field === "retry" && Number(value) > 0) retryMs = Number(value);
    }
    if (!data) return null;
    const doc = JSON.parse(data);
    if (event === "tick") show(doc);
    return event === "end" ? doc.reason : null;
  }

  function setCard(key, value, text) {
    const node = document.querySelector(`[data-card="${key}"] .value`);
    node.textContent = text;
    node.dataset.value = String(value);
  }

  function show(doc) {
    ATE.showError("");
    document.getElementById("main").removeAttribute("aria-busy");
    const sum = (values) => values.slice(-doc.window_seconds).reduce((a, b) => a + b, 0);
    const requests = sum(doc.seconds.requests), errors = sum(doc.seconds.errors);
    const p95s = doc.tokens.map((t) => t.p95_ms).filter((v) => v !== null);
    const slowest = p95s.length ? Math.max(...p95s) : null;
    setCard("per_second", requests / doc.window_seconds, num(Math.round(requests / doc.window_seconds * 100) / 100));
    setCard("errors", errors, num(errors));
    setCard("p95_ms", slowest, ms(slowest));
    setCard("tokens", doc.tokens.length, num(doc.tokens.length));
    drawChart(doc.seconds);
    const label = (t) => t.name ? `${t.name} (${t.token_id})` : t.token_id;
    document.querySelector("#live-tokens tbody").replaceChildren(...(doc.tokens.length
      ? doc.tokens.map((t) => el("tr", {dataset: {token: t.token || "", requests: String(t.requests), errors: String(t.errors)}},
          el("td", {}, el("code", {}, label(t))), el("td", {class: "num"}, num(t.per_second)),
          el("td", {class: "num"}, num(t.requests)), el("td", {class: "num"}, num(t.errors)),
          el("td", {class: "num"}, ms(t.p50_ms)), el("td", {class: "num"}, ms(t.p95_ms))))
      : [el("tr", {}, el("td", {colspan: "6", class: "muted"}, "No requests in the last 10 seconds"))]));
    const body = document.querySelector("#live-requests tbody");
    if (doc.requests.length) {
      if (!body.querySelector("tr[data-status]")) body.replaceChildren();
      body.prepend(...doc.requests.map((r) => el("tr", {dataset: {status: String(r.status), token: r.token || ""}},
        el("td", {}, F.isoTime(r.time)), el("td", {}, el("code", {}, label(r))),
        el("td", {}, el("code", {}, `${r.method} ${r.endpoint}`)),
        el("td", {}, el("span", {class: `badge ${tone(r.status)}`}, String(r.status))),
        el("td", {class: "num"}, ms(r.duration_ms)))));
      while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
    }
    const note = document.getElementById("not-shown");
    if (doc.not_shown) {
      note.hidden = false;
      note.textContent = `${num(doc.not_shown)} more requests came in that second than the list shows.`;
    }
    updated.textContent = `Live · ${F.isoTime(doc.time)} UTC`;
    updated.dataset.count = String(Number(updated.dataset.count || 0) + 1);
  }

  function drawChart(seconds) {
    const data = [seconds.requests.map((_, i) => seconds.start + i), seconds.requests, seconds.errors];
    const plot = document.querySelector("#chart-live .plot");
    if (chart) return chart.setData(data);
    chart = new uPlot({
      width: Math.max(280, plot.clientWidth), height: 200,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      scales: {y: {range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1]}},
      series: [{value: (u, ts) => ts === null ? "–" : F.isoTime(ts)},
               {label: "Requests", stroke: "#0b5cad", fill: "#0b5cad2e", width: 2, points: {show: false},
                value: (u, v) => v === null ? "–" : num(v)},
               {label: "Errors", stroke: "#cf222e", width: 2, points: {show: false},
                value: (u, v) => v === null ? "–" : num(v)}],
      axes: [{space: 70, values: (u, vals) => vals.map((ts) => F.isoTime(ts).slice(0, 8))},
             {size: 56, values: (u, vals) => vals.map((v) => F.compact(v))}],
      legend: {show: true, live: true},
    }, data, plot);
  }
  window.addEventListener("resize", () => {
    if (chart) chart.setSize({width: Math.max(280, document.querySelector("#chart-live .plot").clientWidth), height: 200});
  });

  connect();
})();
