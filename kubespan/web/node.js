// KubeSpan node page: polls /status (the same JSON `kubespan status -o json` reads) and shows this
// node's own view: its peers, their states, paths, endpoints, handshake ages and counters. Read-only.
// ?refresh=SECONDS sets the period (default 1, at least 0.25). Rows are updated in place, so focus and
// opened details survive a refresh.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const period = Math.max(0.25, Number(params.get("refresh")) || 1) * 1000;
  const SYMBOL = { up: "✓", down: "✗", unknown: "?" };
  let paused = false;
  let timer = null;
  let inflight = false;
  let lastOk = null;
  const rows = new Map(); // peer label -> {row, detail, cells, button}

  const $ = (id) => document.getElementById(id);
  const dash = (v) => (v === null || v === undefined || v === "" ? "–" : String(v));

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n) || 0;
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i++;
    }
    return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
  }

  function age(seconds) {
    if (seconds === null) return "never";
    const s = Math.max(0, Math.round(seconds));
    if (s < 120) return `${s} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  // The smoothed probe round trip (seconds in /status) in ms; "–" when there is none (no probe
  // answered yet, or a peer that does not answer probes), never a made-up 0.
  function rtt(seconds) {
    return typeof seconds === "number" ? `${(seconds * 1000).toFixed(1)} ms` : "–";
  }

  function pathText(p) {
    if (p.path === "relay") return `relay via ${p.relay_via || "?"}`;
    return p.path || "none";
  }

  function setFact(id, value) {
    $(id).textContent = dash(value);
  }

  function makeRow(label) {
    const row = document.createElement("tr");
    row.dataset.peer = label;
    const cells = {};
    for (const key of ["peer", "state", "path", "endpoint", "handshake", "rtt", "rx", "tx", "switches", "roams", "failures"]) {
      const td = document.createElement(key === "peer" ? "th" : "td");
      if (key === "peer") td.scope = "row";
      td.className = { rtt: "num", rx: "num", tx: "num", switches: "num", roams: "num", failures: "num", endpoint: "mono" }[key] || "";
      if (key === "state") td.classList.add("state");
      td.dataset.col = key;
      row.appendChild(td);
      cells[key] = td;
    }
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Show";
    button.setAttribute("aria-expanded", "false");
    button.setAttribute("aria-label", `Details of ${label}`);
    td.appendChild(button);
    row.appendChild(td);

    const detail = document.createElement("tr");
    detail.className = "detail";
    detail.hidden = true;
    const dtd = document.createElement("td");
    dtd.colSpan = 12;
    detail.appendChild(dtd);
    detail.id = `detail-${label.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    button.setAttribute("aria-controls", detail.id);
    button.addEventListener("click", () => {
      const open = detail.hidden;
      detail.hidden = !open;
      button.setAttribute("aria-expanded", String(open));
      button.textContent = open ? "Hide" : "Show";
    });
    return { row, detail, cells, button, dcell: dtd };
  }

  function renderDetail(entry, p) {
    const dl = document.createElement("dl");
    const items = [
      ["Node id", p.node_id],
      ["Public key", p.public_key],
      ["Mesh address", p.mesh_address],
      ["NAT class (published)", p.nat_class],
      ["Why not direct", p.why_not_direct],
      ["Last used endpoint", p.last_used_endpoint],
      ["Candidates", (p.candidates || []).join(", ")],
      ["Learned (roamed)", (p.learned || []).join(", ")],
      ["Allowed IPs", (p.allowed_ips || []).join(", ")],
      ["Connect time", p.connect_time === null || p.connect_time === undefined ? null : `${p.connect_time.toFixed(2)} s`],
    ];
    for (const [k, v] of items) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = dash(v);
      dl.append(dt, dd);
    }
    entry.dcell.replaceChildren(dl);
  }

  function render(st, nowSeconds) {
    document.title = `${st.nodename} · KubeSpan`;
    $("nodename").textContent = st.nodename || st.node_id;
    const ready = $("ready");
    ready.dataset.ready = String(!!st.ready);
    ready.textContent = st.ready ? "✓ ready" : "✗ not ready";
    setFact("mesh-address", st.mesh_address);
    setFact("public-key", st.public_key);
    setFact("listen-port", st.listen_port);
    setFact("backend", st.backend);
    setFact("steering", st.steering);
    setFact("public-ip", st.public_ip);
    setFact("endpoints", (st.endpoints || []).join(", "));
    const nat = st.nat || {};
    setFact("nat-class", nat.nat_class + (nat.error ? ` (${nat.error})` : ""));
    setFact("nat-mapped", `${dash(nat.mapped)} / ${dash(nat.published)}`);

    const tbody = $("peers").tBodies[0];
    const peers = st.peers || [];
    const seen = new Set();
    const counts = { up: 0, down: 0, unknown: 0 };
    let prev = null; // the entry placed last
    for (const p of peers) {
      seen.add(p.label);
      counts[p.state] = (counts[p.state] || 0) + 1;
      let entry = rows.get(p.label);
      if (!entry) {
        entry = makeRow(p.label);
        rows.set(p.label, entry);
      }
      // Keep status order; move a row only when it is out of place (moving it would drop its focus).
      const expected = prev ? prev.detail.nextElementSibling : tbody.firstElementChild;
      if (expected !== entry.row) tbody.insertBefore(entry.row, expected);
      if (entry.row.nextElementSibling !== entry.detail) tbody.insertBefore(entry.detail, entry.row.nextElementSibling);
      prev = entry;
      const c = entry.cells;
      c.peer.textContent = p.label;
      c.state.textContent = `${SYMBOL[p.state] || "?"} ${p.state}`;
      c.state.dataset.state = p.state;
      entry.row.dataset.state = p.state;
      c.path.textContent = pathText(p);
      c.path.title = p.why_not_direct || "";
      c.endpoint.textContent = dash(p.endpoint);
      c.handshake.textContent = p.last_handshake ? age(nowSeconds - p.last_handshake) : "never";
      c.rtt.textContent = rtt(p.rtt);
      c.rx.textContent = bytes(p.rx_bytes);
      c.tx.textContent = bytes(p.tx_bytes);
      c.switches.textContent = String(p.endpoint_switches);
      c.roams.textContent = String(p.roams);
      c.failures.textContent = String(p.failures);
      renderDetail(entry, p);
    }
    for (const [label, entry] of rows) {
      if (!seen.has(label)) {
        entry.row.remove();
        entry.detail.remove();
        rows.delete(label);
      }
    }
    const empty = tbody.querySelector("tr.empty");
    if (empty) empty.hidden = peers.length > 0;
    $("peer-summary").textContent = `${peers.length} · ${counts.up} up, ${counts.down} down, ${counts.unknown} unknown`;

    const problems = [...(st.errors || []), ...(st.conflicts || []).map((c) => `conflict: ${c}`)];
    $("problems").replaceChildren(
      ...problems.map((t) => {
        const li = document.createElement("li");
        li.textContent = t;
        return li;
      }),
    );
    $("problems-section").hidden = problems.length === 0;
    const r = st.relay;
    $("relay-section").hidden = !r;
    if (r) {
      $("relay").textContent = `${r.running ? "running" : "stopped"} · ${r.allocations} allocations · ` +
        `${r.forwarded_packets} packets (${bytes(r.forwarded_bytes)}) forwarded · ${r.expired} expired`;
    }
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
      const r = await fetch("/status", { cache: "no-store" });
      if (r.status === 503) {
        setStatus("The agent is starting…", true);
      } else if (!r.ok) {
        throw new Error(`HTTP ${r.status}`);
      } else {
        const st = await r.json();
        // Handshake ages against the node's clock (its Date header), not this browser's.
        const date = Date.parse(r.headers.get("Date") || "");
        render(st, (Number.isNaN(date) ? Date.now() : date) / 1000);
        lastOk = new Date();
        setStatus(`Updated ${lastOk.toLocaleTimeString()} (every ${period / 1000} s)`, false);
      }
    } catch (e) {
      const since = lastOk ? `; showing data from ${lastOk.toLocaleTimeString()}` : "";
      setStatus(`Cannot read /status (${e.message})${since}`, true);
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
