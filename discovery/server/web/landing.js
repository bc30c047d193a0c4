// Discovery service landing page: polls /stats (counts and cumulative counters only) and shows counts,
// and rates computed between two polls. ?refresh=SECONDS sets the period (default 2, at least 0.5).
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const period = Math.max(0.5, Number(params.get("refresh")) || 2) * 1000;
  let previous = null; // last /stats answer
  let lastOk = null; // Date of the last good answer
  let paused = false;
  let timer = null;
  let inflight = false;

  const $ = (id) => document.getElementById(id);
  const fmtInt = (n) => Number(n).toLocaleString("en-US");
  const fmtRate = (r) => (r === null ? "–" : r < 10 ? r.toFixed(2) : r.toFixed(1));
  const errorsOf = (codes) => Object.entries(codes || {}).reduce((s, [c, n]) => (c === "OK" ? s : s + n), 0);
  const exhaustedOf = (rpcs) => Object.values(rpcs || {}).reduce((s, m) => s + ((m.codes || {}).RESOURCE_EXHAUSTED || 0), 0);

  function rate(now, before, dt) {
    if (before === undefined || before === null || !(dt > 0) || now < before) return null;
    return (now - before) / dt;
  }

  function render(s) {
    for (const el of document.querySelectorAll("[data-stat]")) {
      el.textContent = fmtInt(s[el.dataset.stat] || 0);
    }
    const prev = previous && s.uptime_seconds >= previous.uptime_seconds ? previous : null;
    const dt = prev ? s.uptime_seconds - prev.uptime_seconds : 0;
    const rpcs = s.rpcs || {};
    const started = (r) => Object.values(r).reduce((a, m) => a + m.started, 0);
    $("rpc-rate").textContent = fmtRate(prev ? rate(started(rpcs), started(prev.rpcs || {}), dt) : null);
    $("exhausted-rate").textContent = fmtRate(prev ? rate(exhaustedOf(rpcs), exhaustedOf(prev.rpcs), dt) : null);

    const store = s.store || {};
    const healthy = store.healthy !== false;
    $("store").textContent = (healthy ? "✓ ok" : "✗ degraded") + (store.kind ? ` (${store.kind})` : "");
    $("store").dataset.health = healthy ? "ok" : "degraded";

    const body = document.createElement("tbody");
    const names = Object.keys(rpcs).sort();
    for (const name of names) {
      const m = rpcs[name];
      const p = prev && prev.rpcs ? prev.rpcs[name] : undefined;
      const tr = document.createElement("tr");
      tr.dataset.method = name;
      const cells = [
        name,
        fmtRate(prev ? rate(m.started, p ? p.started : 0, dt) : null),
        fmtRate(prev ? rate(errorsOf(m.codes), p ? errorsOf(p.codes) : 0, dt) : null),
        fmtInt(m.started),
        fmtInt(errorsOf(m.codes)),
      ];
      cells.forEach((text, i) => {
        const td = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) td.scope = "row";
        td.textContent = text;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    }
    if (!names.length) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = document.createElement("td");
      td.colSpan = 5;
      td.textContent = "No RPCs yet";
      tr.appendChild(td);
      body.appendChild(tr);
    }
    $("rpcs").replaceChild(body, $("rpcs").tBodies[0]);
    $("meta").textContent = `version ${s.version || "?"} · up ${Math.floor(s.uptime_seconds || 0)} s`;
    previous = s;
  }

  function setStatus(text, stale) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("stale", stale);
    document.body.dataset.stale = stale ? "true" : "false";
  }

  async function poll() {
    timer = null;
    inflight = true;
    try {
      const r = await fetch("/stats", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const s = await r.json();
      render(s);
      lastOk = new Date();
      setStatus(`Updated ${lastOk.toLocaleTimeString()} (every ${period / 1000} s)`, false);
    } catch (e) {
      const since = lastOk ? `; showing data from ${lastOk.toLocaleTimeString()}` : "";
      setStatus(`Cannot read /stats (${e.message})${since}`, true);
    }
    inflight = false;
    if (!paused) timer = setTimeout(poll, period);
  }

  function togglePause() {
    paused = !paused;
    const b = $("pause");
    b.setAttribute("aria-pressed", String(paused));
    b.textContent = paused ? "Resume updates" : "Pause updates";
    if (paused && timer !== null) {
      clearTimeout(timer);
      timer = null;
    } else if (!paused && timer === null && !inflight) {
      poll();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("pause").addEventListener("click", togglePause);
    poll();
  });
})();
