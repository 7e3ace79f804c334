// What every console page shares: JSON calls with the session's CSRF token, DOM building with
// text only (names and routes come from clients: never parsed as HTML), number formats and the
// refresh loop. The JSON endpoints sit beside /ui, so their paths are relative ("../admin/stats").
"use strict";

const ATE = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const csrf = meta("ate-csrf");
  const refreshSeconds = Number(meta("ate-refresh"));

  // A read the server asks to repeat soon (analytics already being computed for this session:
  // 429 or 503 with a short Retry-After) is repeated, up to 3 times; a longer wait is shown.
  async function api(path, {method = "GET", body} = {}, attempt = 0) {
    const headers = {"Accept": "application/json", "X-CSRF-Token": csrf};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {method, headers, credentials: "same-origin",
                                        body: body === undefined ? undefined : JSON.stringify(body)});
    const wait = Number(response.headers.get("Retry-After"));
    if (method === "GET" && (response.status === 429 || response.status === 503) && wait > 0 && wait <= 5
        && attempt < 3) {
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      return api(path, {method, body}, attempt + 1);
    }
    let doc = null;
    try { doc = await response.json(); } catch (e) { /* not JSON */ }
    if (response.status === 401) {
      location.assign("login?next=" + encodeURIComponent(document.body.dataset.page));
    }
    if (!response.ok) throw new Error((doc && doc.detail) || `HTTP ${response.status}`);
    return doc;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const num = ATE_FORMAT.number, usd = ATE_FORMAT.usd;     // format.js: the one formatter
  // "2026-12-01T10:00:00.000Z" or "2026-12-01 10:00:00" (UTC) -> "2026-12-01 10:00:00"
  const when = (t) => t ? String(t).replace("T", " ").replace(/\.\d+Z$|Z$/, "") : "–";
  const utcDate = (d) => d.toISOString().slice(0, 10);

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // load() now, on the button, and every refreshSeconds while the page is visible
  function every(load) {
    const updated = document.getElementById("updated");
    let running = null, timer = null;
    async function run() {
      if (running) return running;
      running = (async () => {
        try {
          await load();
          document.getElementById("main").removeAttribute("aria-busy");    // the loading look ends
          showError("");
          updated.textContent = "Updated " + new Date().toISOString().slice(11, 19) + " UTC" +
            (refreshSeconds ? ` · every ${refreshSeconds} s` : "");
          updated.dataset.count = String(Number(updated.dataset.count || 0) + 1);
        } catch (e) {
          showError(e.message);
        } finally {
          running = null;
        }
      })();
      return running;
    }
    function schedule() {
      clearInterval(timer);
      if (refreshSeconds > 0 && !document.hidden) timer = setInterval(run, refreshSeconds * 1000);
    }
    document.getElementById("refresh").addEventListener("click", run);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) run(); schedule(); });
    run();
    schedule();
    return run;
  }

  // a file download of text the page already holds (exports: what is shown, as shown)
  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], {type}));
    const a = el("a", {href: url, download: name});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function table(headers, rows, attrs = {}) {
    return el("table", {class: "table", ...attrs},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {scope: "col"}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => c instanceof Node ? el("td", {}, c) : el("td", {}, c))))));
  }

  return {api, el, num, usd, when, utcDate, every, download, table, showError, refreshSeconds};
})();
