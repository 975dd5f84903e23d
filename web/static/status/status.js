"use strict";
// The gateway's status page: asks for the admin key once (kept in this tab's session storage), then
// reads status/data every few seconds and redraws. Everything shown is set as text, never as markup:
// miners' and validators' errors are their words, not ours.
(() => {
  const STORAGE_KEY = "sn1-gateway.admin-key";
  const DATA_URL = "status/data";
  const params = new URLSearchParams(window.location.search);
  const refreshS = Math.min(60, Math.max(1, Number(params.get("refresh")) || 3));
  const SVG = "http://www.w3.org/2000/svg";
  let timer = null;
  let updates = 0;
  let memoryKey = null;  // where session storage is unavailable, the key lasts as long as the page

  const $ = (id) => document.getElementById(id);

  function storedKey() {
    try { return window.sessionStorage.getItem(STORAGE_KEY) || memoryKey; } catch (_) { return memoryKey; }
  }
  function storeKey(key) {
    memoryKey = key;
    try { window.sessionStorage.setItem(STORAGE_KEY, key); } catch (_) { /* kept in memory only */ }
  }
  function forgetKey() {
    memoryKey = null;
    try { window.sessionStorage.removeItem(STORAGE_KEY); } catch (_) { /* nothing was stored */ }
  }

  // -- formatting ------------------------------------------------------------------------------------
  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const value = seconds * 1000;
    return value >= 10000 ? (value / 1000).toFixed(1) + " s" : value.toFixed(value >= 100 ? 0 : 1) + " ms";
  }
  function count(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US");
  }
  function percent(x) { return (x === null || x === undefined) ? "–" : (x * 100).toFixed(1) + " %"; }
  function rate(x) { return (x === null || x === undefined) ? "–" : x.toFixed(x >= 10 ? 0 : 2); }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return seconds.toFixed(0) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(0) + " min";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }
  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  // -- DOM helpers -----------------------------------------------------------------------------------
  function cell(text, className, title) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) td.className = className;
    if (title) td.title = title;
    return td;
  }
  function fillTable(id, rows, makeRow) {
    const body = $(id).tBodies[0];
    const fresh = document.createElement("tbody");
    for (const row of rows) fresh.appendChild(makeRow(row));
    $(id).replaceChild(fresh, body);
  }
  function tiles(id, items) {
    const box = $(id);
    box.replaceChildren();
    for (const [label, value, bad] of items) {
      const tile = document.createElement("div");
      tile.className = bad ? "tile bad" : "tile";
      const b = document.createElement("b");
      b.textContent = value;
      const span = document.createElement("span");
      span.textContent = label;
      tile.append(b, span);
      box.appendChild(tile);
    }
  }

  // -- the charts ------------------------------------------------------------------------------------
  function svgElement(name, attributes) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    return element;
  }
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }
  function drawChart(svg, points, series, format, seconds) {
    const width = 640, height = 170, left = 56, right = 10, top = 10, bottom = 22;
    const plotW = width - left - right, plotH = height - top - bottom;
    svg.replaceChildren();
    let max = 0;
    for (const p of points) for (const s of series) if (p[s.key] !== null && p[s.key] > max) max = p[s.key];
    max = niceMax(max);
    const x = (t) => left + plotW * (1 + t / seconds);
    const y = (v) => top + plotH * (1 - v / max);
    for (let i = 0; i <= 4; i += 1) {
      const value = (max * i) / 4;
      svg.appendChild(svgElement("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: "grid" }));
      const label = svgElement("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end", class: "axis" });
      label.textContent = format(value);
      svg.appendChild(label);
    }
    for (const [t, text] of [[-seconds, "-" + duration(seconds)], [-seconds / 2, "-" + duration(seconds / 2)], [0, "now"]]) {
      const label = svgElement("text", { x: x(t), y: height - 6, "text-anchor": t === 0 ? "end" : (t === -seconds ? "start" : "middle"), class: "axis" });
      label.textContent = text;
      svg.appendChild(label);
    }
    for (const s of series) {
      let path = "";
      let area = "";
      let open = false;
      const known = (i) => i >= 0 && i < points.length && points[i][s.key] !== null && points[i][s.key] !== undefined;
      points.forEach((p, i) => {
        if (!known(i)) { open = false; return; }
        const px = x(p.t).toFixed(1), py = y(p[s.key]).toFixed(1);
        path += (open ? " L" : " M") + px + " " + py;
        open = true;
        if (!known(i - 1) && !known(i + 1)) {  // a lone point draws no line: a dot instead
          svg.appendChild(svgElement("circle", { cx: px, cy: py, r: 3, class: "dot " + s.className }));
        }
      });
      if (s.area && points.length) {
        area = "M" + x(points[0].t).toFixed(1) + " " + y(0);
        for (const p of points) area += " L" + x(p.t).toFixed(1) + " " + y(p[s.key] || 0).toFixed(1);
        area += " L" + x(points[points.length - 1].t).toFixed(1) + " " + y(0) + " Z";
        svg.appendChild(svgElement("path", { d: area, class: "area" }));
      }
      if (path) svg.appendChild(svgElement("path", { d: path.trim(), class: "line " + s.className }));
    }
  }

  // -- rendering -------------------------------------------------------------------------------------
  function renderHeader(data) {
    const state = $("state");
    state.textContent = data.draining ? "draining" : (data.ready ? "ready" : "not ready");
    state.className = "pill " + (data.draining ? "warn" : (data.ready ? "ok" : "bad"));
    $("identity").textContent = "v" + data.version + " · hotkey " + data.hotkey;
    $("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString();
  }

  function renderRequests(data) {
    const points = data.chart.points;
    const recent = points.slice(-12);  // the last minute
    const perSecond = recent.length ? recent.reduce((a, p) => a + p.requests_per_s, 0) / recent.length : 0;
    const lastTtft = [...points].reverse().find((p) => p.ttft_p50_s !== null);
    tiles("request-tiles", [
      ["requests/s, last minute", rate(perSecond)],
      ["requests served", count(data.requests.total)],
      ["5xx answers", count(data.requests.errors), data.requests.errors > 0],
      ["in flight", count(data.requests.in_flight)],
      ["time to first token p50", lastTtft ? ms(lastTtft.ttft_p50_s) : "–"],
      ["p99", lastTtft ? ms(lastTtft.ttft_p99_s) : "–"],
    ]);
    drawChart($("chart-requests"), points, [
      { key: "requests_per_s", className: "requests", area: true },
      { key: "errors_per_s", className: "errors" },
    ], (v) => rate(v), data.chart.seconds);
    drawChart($("chart-ttft"), points, [
      { key: "ttft_p50_s", className: "p50" },
      { key: "ttft_p99_s", className: "p99" },
    ], (v) => ms(v), data.chart.seconds);
  }

  function renderMiners(miners) {
    $("miner-count").textContent = "(" + miners.length + ")";
    fillTable("miners", miners, (m) => {
      const tr = document.createElement("tr");
      tr.dataset.uid = String(m.uid);
      const breaker = m.breaker === "open" && m.retry_in_s !== null ? "open (" + duration(m.retry_in_s) + ")" : m.breaker;
      tr.append(
        cell(m.uid, "num"),
        cell(m.hotkey_short, "mono", m.hotkey || ""),
        cell(breaker.replace("_", "-"), "state-" + m.breaker),
        cell(ms(m.ttft_s), "num"),
        cell(percent(m.failure_rate), "num"),
        cell(count(m.requests), "num", count(m.successes) + " good, " + count(m.failures) + " failed"),
        cell(m.last_error, m.last_error ? "error-text" : ""),
      );
      return tr;
    });
  }

  function renderScoring(scoring) {
    if (!scoring) { tiles("scoring-tiles", [["scoring", "not running"]]); return; }
    if (!scoring.enabled) {
      tiles("scoring-tiles", [["scoring", "off (scoring.enabled = false)"]]);
    } else {
      tiles("scoring-tiles", [
        ["queued", count(scoring.queued) + " / " + count(scoring.queue_size)],
        ["in flight", count(scoring.in_flight)],
        ["delivered", count(scoring.delivered)],
        ["spooled (waiting)", count(scoring.spool_pending) + " · " + bytes(scoring.spool_bytes), scoring.spool_pending > 0],
        ["validators refusing us", count(scoring.refused), scoring.refused > 0],
        ["dropped", count(scoring.dropped_total), scoring.dropped_total > 0],
      ]);
    }
    const warnings = $("scoring-warnings");
    warnings.replaceChildren();
    const dropped = Object.entries(scoring.dropped).map(([reason, n]) => "dropped (" + reason + "): " + count(n));
    for (const text of [...scoring.warnings, ...dropped]) {
      const li = document.createElement("li");
      li.textContent = text;
      warnings.appendChild(li);
    }
    fillTable("validators", scoring.validators, (v) => {
      const tr = document.createElement("tr");
      const state = v.refused_signer ? "refuses" : (v.backoff_s > 0 ? "backoff" : "ok");
      const stateText = v.refused_signer ? "refuses our hotkey" : (v.backoff_s > 0 ? "backing off " + duration(v.backoff_s) : "ok");
      const errorCell = cell(v.hint || v.last_error, v.hint ? "hint" : (v.last_error ? "error-text" : ""));
      tr.append(
        cell(v.hotkey_short, "mono", v.hotkey),
        cell(v.axon, "mono"),
        cell(count(v.delivered), "num"),
        cell(count(v.failures), "num"),
        cell(count(v.rejected), "num"),
        cell(stateText, "state-" + state),
        errorCell,
      );
      return tr;
    });
  }

  function renderKeys(keys) {
    $("key-count").textContent = keys.count === null || keys.count === undefined ? "" : "(" + count(keys.count) + ")";
    $("keys-error").textContent = keys.error || "";
    fillTable("keys", keys.top || [], (k) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(k.prefix + "…", "mono"),
        cell(count(k.requests), "num"),
        cell(count(k.tokens), "num"),
        cell(count(k.rate_limit), "num"),
        cell(k.last_used_at ? new Date(k.last_used_at).toLocaleString() : "never"),
      );
      return tr;
    });
  }

  function renderActors(actors) {
    fillTable("actors", actors, (a) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(a.name),
        cell(a.status, "state-" + a.status),
        cell(count(a.restarts), "num"),
        cell(duration(a.for_s), "num"),
        cell(a.last_error, a.last_error ? "error-text" : ""),
      );
      return tr;
    });
  }

  function render(data) {
    renderHeader(data);
    renderRequests(data);
    renderMiners(data.miners);
    renderScoring(data.scoring);
    renderKeys(data.keys);
    renderActors(data.actors);
  }

  // -- the loop --------------------------------------------------------------------------------------
  function banner(text) {
    $("banner").textContent = text || "";
    $("banner").hidden = !text;
  }
  function ask(message) {
    if (timer !== null) { window.clearTimeout(timer); timer = null; }
    $("dashboard").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-message").textContent = message || "";
    $("login-key").value = "";
    $("login-key").focus();
  }
  function schedule() {
    if (timer !== null) window.clearTimeout(timer);
    timer = window.setTimeout(poll, refreshS * 1000);
  }
  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return "HTTP " + response.status;
  }

  async function poll() {
    timer = null;
    const key = storedKey();
    if (!key) { ask(); return; }
    let response;
    try {
      response = await fetch(DATA_URL, { headers: { "admin-key": key }, cache: "no-store" });
    } catch (exc) {
      banner("The gateway does not answer (" + exc.message + "); trying again.");
      schedule();
      return;
    }
    if (response.status === 401 || response.status === 403) {
      const message = await errorMessage(response);
      forgetKey();
      ask(message);
      return;
    }
    if (!response.ok) {
      banner((await errorMessage(response)) + "; trying again.");
      schedule();
      return;
    }
    const data = await response.json();
    banner("");
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("forget").hidden = false;
    render(data);
    updates += 1;
    document.body.dataset.updates = String(updates);  // how many times the figures were drawn
    schedule();
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("login-key").value.trim();
    if (!key) return;
    storeKey(key);
    $("login-key").value = "";
    poll();
  });
  $("forget").addEventListener("click", () => { forgetKey(); ask("The admin key was forgotten."); });
  poll();
})();
