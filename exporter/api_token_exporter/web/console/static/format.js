// The console's one number and date formatter: every page and chart shows numbers through it.
// tests/test_console_format.py runs it in Node against a table of cases.
"use strict";

const ATE_FORMAT = (() => {
  const DASH = "–";
  const missing = (x) => x === null || x === undefined || Number.isNaN(Number(x));

  // 1234567 -> "1,234,567"; fractions keep up to 3 decimals (small ones 3 significant digits)
  function number(x) {
    if (missing(x)) return DASH;
    const n = Number(x);
    if (Number.isInteger(n)) return n.toLocaleString("en-US");
    if (Math.abs(n) < 1) return n.toLocaleString("en-US", {maximumSignificantDigits: 3});
    return n.toLocaleString("en-US", {maximumFractionDigits: 3});
  }

  // 999 -> "999", 1000 -> "1K", 1100 -> "1.1K", 2500 -> "2.5K", 1.5e9 -> "1.5B": at most 3
  // significant digits, for chart axes and narrow cells
  function compact(x) {
    if (missing(x)) return DASH;
    const n = Number(x);
    if (Math.abs(n) < 999.5) return String(Number(n.toPrecision(Math.abs(n) >= 1 || n === 0 ? 3 : 2)));
    const units = [[1e3, "K"], [1e6, "M"], [1e9, "B"], [1e12, "T"]];
    for (let i = 0; i < units.length; i++) {
      const scaled = n / units[i][0];
      if (Math.abs(scaled) < 999.5 || i === units.length - 1) return String(Number(scaled.toPrecision(3))) + units[i][1];
    }
  }

  // US dollars with cents: 0.25 -> "$0.25", 1234.5 -> "$1,234.50"; below a cent, up to 4 decimals
  function usd(x) {
    if (missing(x)) return DASH;
    const n = Number(x);
    const small = n !== 0 && Math.abs(n) < 0.01;
    return (n < 0 ? "-$" : "$") + Math.abs(n).toLocaleString("en-US", {
      minimumFractionDigits: small ? 4 : 2, maximumFractionDigits: small ? 4 : 2});
  }

  // a chart axis in dollars: as many decimals as the tick step needs, cents at least below $10
  function usdTick(x, step) {
    const digits = Math.min(4, Math.max(Math.abs(x) < 10 ? 2 : 0, -Math.floor(Math.log10(step || 1))));
    return "$" + Number(x).toLocaleString("en-US", {minimumFractionDigits: digits, maximumFractionDigits: digits});
  }

  const pad = (n) => String(n).padStart(2, "0");
  // Unix seconds (or a Date) in UTC: "2026-12-07" and "2026-12-07 14:05 UTC"
  function isoDate(t) {
    if (missing(t)) return DASH;
    const d = t instanceof Date ? t : new Date(Number(t) * 1000);
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
  }
  function isoDateTime(t) {
    if (missing(t)) return DASH;
    const d = t instanceof Date ? t : new Date(Number(t) * 1000);
    return `${isoDate(d)} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
  }

  // the time of day of Unix seconds in UTC, to the second: "14:05:07"
  function isoTime(t) {
    if (missing(t)) return DASH;
    const d = t instanceof Date ? t : new Date(Number(t) * 1000);
    return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
  }

  return {number, compact, usd, usdTick, isoDate, isoDateTime, isoTime};
})();

if (typeof module !== "undefined") module.exports = ATE_FORMAT;
