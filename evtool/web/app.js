"use strict";
// The live page of `evtool serve`. Money is never a JS number: parseExact keeps each JSON number as
// its exact text; the chart's bar heights use only the leading digits of those texts.
const KEY = "evtool.token";
const EVERY = Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 5) * 1000;
const $ = (id) => document.getElementById(id);
let last = null;

function parseExact(text) {
  let i = 0;
  const ws = () => { while (" \t\n\r".includes(text[i]) && i < text.length) i++; };
  const take = (re) => { re.lastIndex = i; const m = re.exec(text); if (!m) throw new Error("bad JSON at " + i); i = re.lastIndex; return m[0]; };
  function value() {
    ws();
    const c = text[i];
    if (c === "{") {
      i++; const o = Object.create(null); ws();
      if (text[i] === "}") { i++; return o; }
      for (;;) { ws(); const k = JSON.parse(take(/"(?:[^"\\]|\\.)*"/y)); ws(); take(/:/y); o[k] = value(); ws();
        if (text[i] === ",") { i++; continue; } take(/\}/y); return o; }
    }
    if (c === "[") {
      i++; const a = []; ws();
      if (text[i] === "]") { i++; return a; }
      for (;;) { a.push(value()); ws(); if (text[i] === ",") { i++; continue; } take(/\]/y); return a; }
    }
    if (c === '"') return JSON.parse(take(/"(?:[^"\\]|\\.)*"/y));
    const w = take(/true|false|null|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/y);
    return w === "true" ? true : w === "false" ? false : w === "null" ? null : w;  // numbers stay text
  }
  const v = value(); ws(); if (i !== text.length) throw new Error("bad JSON"); return v;
}

class Unauthorized extends Error {}
async function api(path) {
  const resp = await fetch(path, { headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) }, cache: "no-store" });
  const body = parseExact(await resp.text());
  if (resp.status === 401) throw new Unauthorized(body.error);
  if (!resp.ok && resp.status !== 404) throw new Error(body.error || "HTTP " + resp.status);
  return { status: resp.status, body };
}

const group = (n) => n == null ? "-" : String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
function digits(d) { const [i, f = ""] = d.replace("-", "").split("."); return [i, f]; }
// |a| / |b| from the leading digits of two decimal texts (pixels need no more).
function ratio(a, b) {
  const [ai, af] = digits(a), [bi, bf] = digits(b), f = Math.max(af.length, bf.length);
  const A = (ai + af.padEnd(f, "0")).replace(/^0+/, ""), B = (bi + bf.padEnd(f, "0")).replace(/^0+/, "");
  if (!B) return A ? Infinity : 0;
  const shift = Math.max(0, B.length - 15);
  const bh = Number(B.slice(0, B.length - shift)), ah = A.length > shift ? Number(A.slice(0, A.length - shift)) : 0;
  return ah / bh;
}
const neg = (d) => d.startsWith("-");
function cmpAbs(a, b) { const r = ratio(a, b); return r > 1 ? 1 : r < 1 ? -1 : 0; }

function rows(table, users) {
  table.replaceChildren(...users.map((u) => {
    const tr = document.createElement("tr"), a = document.createElement("td"), b = document.createElement("td");
    a.textContent = u.userId; b.textContent = u.revenue; b.className = "money"; tr.append(a, b); return tr;
  }));
}

function chart(p) {
  const svgNS = "http://www.w3.org/2000/svg", W = 720, H = 180, list = p.periods;
  $("bytime").textContent = "(" + p.time + " time, UTC)";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 30}`); svg.setAttribute("width", "100%");
  let max = "0";
  for (const r of list) if (cmpAbs(r.revenue, max) > 0) max = r.revenue;
  const bw = list.length ? Math.min(60, (W - 10) / list.length) : 0, mid = list.some((r) => neg(r.revenue)) ? H / 2 : H;
  list.forEach((r, k) => {
    const h = max === "0" ? 0 : ratio(r.revenue, max) * (mid === H ? H - 14 : H / 2 - 14);
    const rect = document.createElementNS(svgNS, "rect");
    rect.setAttribute("x", 5 + k * bw); rect.setAttribute("width", Math.max(1, bw - 4));
    rect.setAttribute("y", neg(r.revenue) ? mid : mid - h); rect.setAttribute("height", Math.max(1, h));
    rect.setAttribute("class", neg(r.revenue) ? "bar neg" : "bar");
    const t = document.createElementNS(svgNS, "title"); t.textContent = `${r.period}: ${r.revenue}`; rect.append(t);
    svg.append(rect);
    if (list.length <= 12 || k === 0 || k === list.length - 1) {
      const lab = document.createElementNS(svgNS, "text");
      lab.setAttribute("x", 5 + k * bw); lab.setAttribute("y", H + 14); lab.textContent = r.period; svg.append(lab);
      const v = document.createElementNS(svgNS, "text");
      v.setAttribute("x", 5 + k * bw); v.setAttribute("y", H + 26); v.textContent = r.revenue; svg.append(v);
    }
  });
  $("chart").replaceChildren(svg);
}

function health(s, rx, rejects) {
  const now = Date.parse(s.time);
  const lastCommit = s.journals.map((j) => j.last_processed).filter(Boolean).map(Date.parse).reduce((a, b) => Math.max(a, b), 0);
  const rate = (key, value, t) => last && last[key] != null && t > last[key + "_t"] ? ((value - last[key]) * 1000 / (t - last[key + "_t"])).toFixed(1) + " /s" : "-";
  const accepted = Number(rx.events_accepted), applied = Number(s.totals.applied), rxt = Date.parse(rx.time);
  const items = [
    ["journal lag", `${group(s.totals.lag_lines)} lines (${group(s.totals.lag_bytes)} bytes)`],
    ["last commit", lastCommit ? Math.round((now - lastCommit) / 1000) + " s ago" : "never"],
    ["accepted", rate("acc", accepted, rxt) + `  (${group(rx.events_accepted)} since start)`],
    ["applied", rate("app", applied, now) + `  (${group(s.totals.applied)} in all)`],
    ["rejected", `${group(s.totals.rejected)} (${group(s.totals.rejects_pending)} pending)`],
    ["database", s.database.reachable ? "reachable, PostgreSQL " + s.database.version : "unreachable: " + s.database.error],
    ["receiver", rx.healthy ? "healthy" : rx.error],
  ];
  $("health").replaceChildren(...items.flatMap(([k, v]) => { const dt = document.createElement("dt"), dd = document.createElement("dd"); dt.textContent = k; dd.textContent = v; return [dt, dd]; }));
  $("reasons").replaceChildren(...rejects.map((r) => { const li = document.createElement("li"); li.textContent = `${r.path}:${r.line} ${r.reason}`; return li; }));
  last = { acc: accepted, acc_t: rxt, app: applied, app_t: now };
}

async function refresh() {
  if (!sessionStorage.getItem(KEY)) { $("login").hidden = false; $("view").hidden = true; return; }
  try {
    const [r, p, s, rx, rj, w] = await Promise.all([api("/api/report"), api("/api/periods?by=" + $("by").value),
      api("/api/status"), api("/api/receiver"), api("/api/rejects?limit=5"), api("/api/window?minutes=15")]);
    const rep = r.body;
    $("revenue").textContent = rep.revenue; $("users").textContent = group(rep.users);
    $("adds").textContent = group(rep.events.add_revenue.count) + " events"; $("added").textContent = rep.events.add_revenue.amount;
    $("subs").textContent = group(rep.events.subtract_revenue.count) + " events"; $("subtracted").textContent = rep.events.subtract_revenue.amount;
    rows($("top"), rep.top); rows($("bottom"), rep.bottom);
    chart(p.body); health(s.body, rx.body, rj.body);
    const win = w.body;
    $("window").textContent = `${group(win.events)} events, revenue ${win.revenue}, ${group(win.users)} active users`;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString() + `, every ${EVERY / 1000} s`;
    $("problem").hidden = true; $("login").hidden = true; $("view").hidden = false;
  } catch (e) {
    if (e instanceof Unauthorized) { sessionStorage.removeItem(KEY); $("login").hidden = false; $("view").hidden = true; }
    $("problem").textContent = e.message + "; retrying"; $("problem").hidden = false;
  }
}

async function loop() { await refresh(); setTimeout(loop, EVERY); }

document.addEventListener("DOMContentLoaded", () => {
  const m = location.hash.match(/^#token=(.+)$/);
  if (m) { sessionStorage.setItem(KEY, decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname + location.search); }
  $("login").addEventListener("submit", (e) => { e.preventDefault(); sessionStorage.setItem(KEY, $("token").value); $("token").value = ""; refresh(); });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem(KEY); refresh(); });
  $("by").addEventListener("change", refresh);
  $("lookup").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const u = await api("/api/users/" + encodeURIComponent($("user").value));
      $("found").textContent = u.status === 404 ? u.body.error : `${u.body.userId}: ${u.body.revenue}`;
    } catch (err) { $("found").textContent = err.message; }
  });
  loop();
});
