// spanctl dashboard: renders the view model that /events streams (Server-Sent Events).
// No build step, no dependencies. The matrix is updated in place (a keyboard user keeps focus).
"use strict";

const SYM = { up: "✓", down: "✗", unknown: "?", absent: "∅", nodata: "⊘", self: "—" };
const PATH = { lan: "L", direct: "D", relay: "R", none: "" };
const SVGNS = "http://www.w3.org/2000/svg";
const COMPACT = 12;
const HAS_STATUS = { up: true, down: true, unknown: true }; // the cell holds a KubeSpanPeerStatus // more nodes than this: cells show symbol and path only

let view = null;
let offset = 0; // server clock - our clock, seconds
let selected = null; // [row, col]
let focusKey = null; // the matrix cell that holds the roving tabindex
let matrixNames = "";
let source = null;
let lostSince = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}

function now() {
  return Date.now() / 1000 + offset;
}

function age(ts) {
  if (ts === null || ts === undefined) return "never";
  let d = Math.max(0, Math.round(now() - ts));
  if (d < 60) return d + "s";
  if (d < 3600) return Math.floor(d / 60) + "m" + (d % 60) + "s";
  return Math.floor(d / 3600) + "h" + Math.floor((d % 3600) / 60) + "m";
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}

// The smoothed probe round trip (seconds in the status): "–" when the status has none (no probe
// answered yet, or a peer that does not answer probes), never a made-up 0.
function rtt(s) {
  return typeof s === "number" ? (s * 1000).toFixed(1) + " ms" : "–";
}

function pathText(c) {
  if (!c.path || c.path === "none") return "";
  return c.path === "relay" ? "relay via " + (c.relayVia || "?") : c.path;
}

function cellLabel(row, col, c) {
  if (c.state === "self") return row + " (itself)";
  if (c.state === "nodata") return row + " not reached: nothing known of " + col;
  if (c.state === "absent") return row + " has no status for " + col + (c.stale ? " (stale)" : "");
  const parts = [row + " to " + col + ": " + c.state];
  const p = pathText(c);
  if (p) parts.push(p);
  parts.push("handshake " + (c.handshake ? age(c.handshake) + " ago" : "never"));
  parts.push(typeof c.rtt === "number" ? "RTT " + rtt(c.rtt) : "no RTT measured");
  parts.push("rx " + bytes(c.rx) + ", tx " + bytes(c.tx));
  if (c.stale) parts.push("stale");
  return parts.join(", ");
}

// -- matrix ---------------------------------------------------------------------------------------

function key(r, c) {
  return r + "\u0000" + c;
}

function buildMatrix(names) {
  const table = document.getElementById("matrix");
  table.textContent = "";
  const head = el("tr", {}, el("th", { scope: "col", class: "corner", text: "reports ↓ / peer →" }));
  for (const n of names) head.append(el("th", { scope: "col", "data-col": n }, el("span", { text: n })));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const r of names) {
    const tr = el("tr", { "data-node": r });
    tr.append(el("th", { scope: "row", class: "rowhead" }, el("span", { class: "name", text: r }),
      el("span", { class: "reach" })));
    for (const c of names) {
      const td = el("td", { role: "gridcell", "data-row": r, "data-col": c, tabindex: "-1" });
      td.addEventListener("click", () => { moveFocus(r, c); select(r, c); });
      tr.append(td);
    }
    body.append(tr);
  }
  table.append(body);
  table._index = null;
  table.classList.toggle("compact", names.length > COMPACT);
  document.body.classList.toggle("large", names.length > COMPACT);
  table.onkeydown = onMatrixKey;
}

function updateMatrix(v, changed) {
  const names = v.names;
  const joined = names.join("\u0000");
  const table = document.getElementById("matrix");
  const hadFocus = table.contains(document.activeElement);
  if (joined !== matrixNames) {
    matrixNames = joined;
    buildMatrix(names);
  }
  const byName = Object.fromEntries(v.nodes.map((n) => [n.name, n]));
  const compact = names.length > COMPACT;
  const rebuilt = table._names !== joined;
  table._names = joined;
  for (const tr of table.tBodies[0].rows) {
    const r = tr.dataset.node;
    const node = byName[r] || {};
    tr.dataset.reach = node.reach || "unwatched";
    tr.classList.toggle("row-down", node.reach !== "ok");
    tr.querySelector(".reach").textContent = node.reach === "ok" ? "" :
      " ⊘ " + (node.reach || "unwatched") + (node.stale ? " (stale)" : "");
    if (changed && !rebuilt) continue; // a patch: only its cells, below
    for (const td of tr.cells) {
      if (!td.dataset.col) continue;
      const c = (v.matrix[r] || {})[td.dataset.col] || { state: "nodata" };
      fillCell(td, r, td.dataset.col, c, compact);
    }
  }
  if (changed && !rebuilt) {
    const index = table._index || (table._index = cellIndex(table));
    for (const [r, c, cell] of changed) {
      const td = index[key(r, c)];
      if (td) fillCell(td, r, c, cell, compact);
    }
  }
  if (!focusKey || !table.querySelector("td[tabindex='0']")) {
    const first = table.querySelector("td[data-row]");
    if (first) {
      const want = focusKey ? findCell(...focusKey) : null;
      setRoving(want || first);
    }
  }
  if (hadFocus && !table.contains(document.activeElement) && focusKey) {
    const td = findCell(...focusKey);
    if (td) td.focus();
  }
}

function fillCell(td, r, c, cell, compact) {
  td.setAttribute("aria-selected", selected && selected[0] === r && selected[1] === c ? "true" : "false");
  const sig = JSON.stringify(cell) + (compact ? "c" : "");
  if (td._sig === sig) return; // unchanged: only ages move, and tick() refreshes those
  td._sig = sig;
  td._cell = cell;
  const state = cell.state;
  td.className = "st-" + state + (cell.stale ? " stale" : "") + (cell.path ? " path-" + cell.path : "");
  td.dataset.state = state;
  td.dataset.stale = cell.stale ? "1" : "0";
  td.setAttribute("aria-label", cellLabel(r, c, cell));
  td.title = td.getAttribute("aria-label");
  const sym = (cell.stale && state !== "nodata" ? "~" : "") + (SYM[state] || "?");
  const lines = [el("span", { class: "sym", text: sym })];
  if (cell.path && PATH[cell.path]) {
    lines.push(el("span", { class: "path", text: PATH[cell.path] + (cell.path === "relay" && cell.relayVia && !compact ? "·" + cell.relayVia : "") }));
  }
  if (!compact && HAS_STATUS[state]) {
    lines.push(el("span", { class: "hs", "data-ts": cell.handshake ?? "", text: cell.handshake ? "hs " + age(cell.handshake) : "no hs" }));
    lines.push(el("span", { class: "rtt", text: "rtt " + rtt(cell.rtt) }));
    lines.push(el("span", { class: "bytes", text: "↓" + bytes(cell.rx) + " ↑" + bytes(cell.tx) }));
  }
  td.replaceChildren(...lines);
}

function cellIndex(table) {
  const index = {};
  for (const td of table.querySelectorAll("td[data-row]")) index[key(td.dataset.row, td.dataset.col)] = td;
  return index;
}

function findCell(r, c) {
  const table = document.getElementById("matrix");
  const index = table._index || (table._index = cellIndex(table));
  return index[key(r, c)] || null;
}

function setRoving(td) {
  for (const o of document.querySelectorAll("#matrix td[tabindex='0']")) o.tabIndex = -1;
  td.tabIndex = 0;
  focusKey = [td.dataset.row, td.dataset.col];
}

function moveFocus(r, c) {
  const td = findCell(r, c);
  if (!td) return;
  if (td._cell) td.setAttribute("aria-label", cellLabel(r, c, td._cell)); // fresh ages for a reader
  setRoving(td);
  td.focus();
}

function onMatrixKey(ev) {
  const td = ev.target.closest("td[data-row]");
  if (!td || !view) return;
  const names = view.names;
  let i = names.indexOf(td.dataset.row), j = names.indexOf(td.dataset.col);
  const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
  if (ev.key in moves) {
    i = Math.min(names.length - 1, Math.max(0, i + moves[ev.key][0]));
    j = Math.min(names.length - 1, Math.max(0, j + moves[ev.key][1]));
    moveFocus(names[i], names[j]);
    ev.preventDefault();
  } else if (ev.key === "Home" || ev.key === "End") {
    moveFocus(names[i], names[ev.key === "Home" ? 0 : names.length - 1]);
    ev.preventDefault();
  } else if (ev.key === "Enter" || ev.key === " ") {
    select(td.dataset.row, td.dataset.col);
    ev.preventDefault();
  }
}

// -- node list ------------------------------------------------------------------------------------

function services(s) {
  if (!s) return "–";
  const bad = s.unhealthy.length ? " — unhealthy: " + s.unhealthy.join(", ") : "";
  const stopped = s.stopped.length ? " — stopped: " + s.stopped.join(", ") : "";
  return s.total - s.unhealthy.length - s.stopped.length + "/" + s.total + " healthy" + bad + stopped;
}

function updateNodes(v) {
  const body = document.querySelector("#nodes tbody");
  const rows = v.nodes.map((n) => {
    const reach = n.reach === "ok" ? "✓ reachable" :
      "⊘ " + n.reach + (n.since ? " for " + age(n.since) : "") + (n.error ? ": " + n.error : "") + (n.stale ? " (data stale)" : "");
    return el("tr", { "data-node": n.name, "data-reach": n.reach, class: n.reach === "ok" ? "" : "row-down" },
      el("th", { scope: "row", text: n.name }),
      el("td", { class: "reach-" + n.reach, text: reach }),
      el("td", { text: n.role || "–" }),
      el("td", { text: n.addresses.join(", ") || "–" }),
      el("td", { text: n.meshAddress || "–" }),
      el("td", { text: n.natClass || "–" }),
      el("td", { text: n.site }),
      el("td", { text: n.version || "–" }),
      el("td", { text: services(n.services) }),
      el("td", { text: n.peersUp + "/" + n.peers }));
  });
  body.replaceChildren(...rows);
}

// -- topology -------------------------------------------------------------------------------------

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  for (const k of kids) if (k) e.append(k);
  return e;
}

let topoSig = "";
let topoLayout = "";
let topoEdges = {}; // "a|b" -> <line>
let topoNodes = {}; // name -> <g>

function edgeTitle(e) {
  return e.a + " ↔ " + e.b + ": " + e.state + (e.path !== "none" ? ", " + (e.path === "relay" ? "relay via " + e.relayVia : e.path) : "");
}

function styleNode(g, name, n) {
  g.setAttribute("class", "node reach-" + (n.reach || "unwatched"));
  g.querySelector("text").textContent = name + (n.reach && n.reach !== "ok" ? " ⊘" : "");
  g.querySelector("title").textContent = name + ": " + (n.reach || "unwatched");
}

function updateTopology(v) {
  const root = document.getElementById("topology");
  const sig = JSON.stringify([v.groups, v.edges, v.nodes.map((n) => n.reach)]);
  if (sig === topoSig) return;
  topoSig = sig;
  const byName = Object.fromEntries(v.nodes.map((n) => [n.name, n]));
  const layout = JSON.stringify([v.groups, v.edges.map((e) => e.a + "|" + e.b)]);
  if (layout === topoLayout) {
    // same nodes, groups and pairs: restyle in place (a 50-node mesh has 1,225 edges)
    for (const e of v.edges) {
      const line = topoEdges[e.a + "|" + e.b];
      const cls = "edge e-" + e.state + " p-" + e.path;
      if (line.getAttribute("class") !== cls) {
        line.setAttribute("class", cls);
        line.firstChild.textContent = edgeTitle(e);
      }
    }
    for (const [name, g] of Object.entries(topoNodes)) styleNode(g, name, byName[name] || {});
    return;
  }
  topoLayout = layout;
  // groups on a circle wide enough that they do not overlap; the viewBox then fits the drawing
  const cx = 0, cy = 0;
  const groups = v.groups;
  const pos = {};
  const radius = (n) => (n > 1 ? Math.max(30, (n * 48) / (2 * Math.PI)) : 0);
  const widest = Math.max(0, ...groups.map((g) => radius(g.nodes.length)));
  const R = groups.length > 1 ? (widest + 26 + 60) / Math.sin(Math.PI / groups.length) : 0;
  const parts = [];
  let minX = 0, minY = 0, maxX = 0, maxY = 0;
  groups.forEach((g, gi) => {
    const a = (2 * Math.PI * gi) / Math.max(1, groups.length) - Math.PI / 2;
    const gx = cx + R * Math.cos(a), gy = cy + R * Math.sin(a);
    const n = g.nodes.length;
    const r = radius(n);
    g.nodes.forEach((name, ni) => {
      const b = (2 * Math.PI * ni) / Math.max(1, n) + a + Math.PI / 2; // two nodes side by side, across the radius
      pos[name] = [gx + r * Math.cos(b), gy + r * Math.sin(b)];
    });
    minX = Math.min(minX, gx - r - 40); maxX = Math.max(maxX, gx + r + 40);
    minY = Math.min(minY, gy - r - 56); maxY = Math.max(maxY, gy + r + 40);
    parts.push(svg("circle", { cx: gx, cy: gy, r: r + 26, class: "group" }));
    const label = g.key + (g.natClasses.length ? " (" + g.natClasses.join(", ") + ")" : "");
    const t = svg("text", { x: gx, y: gy - r - 34, class: "glabel", "text-anchor": "middle" });
    t.textContent = label;
    parts.push(t);
  });
  const w = Math.max(400, maxX - minX), h = Math.max(300, maxY - minY);
  root.setAttribute("viewBox", `${(minX + maxX - w) / 2} ${(minY + maxY - h) / 2} ${w} ${h}`);
  topoEdges = {};
  const edges = v.edges.map((e) => {
    const [x1, y1] = pos[e.a] || [cx, cy];
    const [x2, y2] = pos[e.b] || [cx, cy];
    const line = svg("line", { x1, y1, x2, y2, class: "edge e-" + e.state + " p-" + e.path });
    const title = svg("title");
    title.textContent = edgeTitle(e);
    line.append(title);
    topoEdges[e.a + "|" + e.b] = line;
    return line;
  });
  topoNodes = {};
  const nodes = Object.entries(pos).map(([name, [x, y]]) => {
    const g = svg("g", { transform: `translate(${x},${y})` });
    g.append(svg("circle", { r: 9 }), svg("text", { y: 22, "text-anchor": "middle" }), svg("title"));
    styleNode(g, name, byName[name] || {});
    topoNodes[name] = g;
    return g;
  });
  root.replaceChildren(...parts, svg("g", { class: "edges" }, ...edges), svg("g", { class: "nodes" }, ...nodes));
}

// -- detail panel ---------------------------------------------------------------------------------

function select(r, c) {
  selected = [r, c];
  for (const td of document.querySelectorAll("#matrix td[aria-selected='true']")) td.setAttribute("aria-selected", "false");
  const td = findCell(r, c);
  if (td) td.setAttribute("aria-selected", "true");
  updateDetail(view);
}

function direction(v, a, b) {
  const c = (v.matrix[a] || {})[b] || { state: "nodata" };
  const dl = el("dl");
  const add = (k, val) => { dl.append(el("dt", { text: k }), el("dd", { text: val })); };
  add("state", c.state + (c.stale ? " (stale: last known)" : ""));
  if (HAS_STATUS[c.state]) {
    add("path", pathText(c) || "none");
    add("why not direct", c.whyNotDirect || (c.path === "lan" || c.path === "direct" ? "it is direct" : "–"));
    add("endpoint", c.endpoint || "–");
    add("last used endpoint", c.lastUsedEndpoint || "–");
    add("endpoint changed", c.lastEndpointChange ? age(c.lastEndpointChange) + " ago" : "–");
    add("handshake", c.handshake ? age(c.handshake) + " ago" : "never");
    add("RTT", rtt(c.rtt));
    add("connect time", c.connectTime === null || c.connectTime === undefined ? "–" : c.connectTime.toFixed(2) + " s");
    add("received / sent", bytes(c.rx) + " / " + bytes(c.tx));
    add("peer's NAT class", c.natClass || "–");
  }
  const hist = v.history[a + "|" + b] || [];
  const table = el("table", { class: "history" },
    el("caption", { text: "Endpoint history (" + a + " → " + b + ")" }),
    el("thead", {}, el("tr", {}, ...["when", "state", "path", "endpoint", "why not direct"].map((h) => el("th", { scope: "col", text: h })))));
  const tb = el("tbody");
  for (const h of hist.slice().reverse()) {
    tb.append(el("tr", {}, el("td", { text: age(h.t) + " ago" }), el("td", { text: h.state }),
      el("td", { text: h.path === "relay" ? "relay via " + h.relayVia : h.path || "–" }),
      el("td", { text: h.endpoint || "–" }), el("td", { text: h.whyNotDirect || "–" })));
  }
  if (!hist.length) tb.append(el("tr", {}, el("td", { colspan: 5, text: "no changes seen since the dashboard started" })));
  table.append(tb);
  return el("section", { class: "dir" }, el("h3", { text: a + " → " + b }), dl, table);
}

function closeDetail() {
  selected = null;
  for (const td of document.querySelectorAll("#matrix td[aria-selected='true']")) td.setAttribute("aria-selected", "false");
  document.getElementById("detail").replaceChildren(
    el("p", { class: "hint", text: "Select a matrix cell to see the pair's details." }));
  const td = focusKey && findCell(...focusKey);
  if (td) td.focus();
}

function updateDetail(v) {
  const box = document.getElementById("detail");
  if (!v || !selected) return;
  // the body is redrawn on every update; the close button stays the same element, so a keyboard user
  // holding focus on it keeps it while the data changes
  let body = document.getElementById("detail-body");
  if (!body) {
    body = el("div", { id: "detail-body" });
    const close = el("button", { type: "button", class: "close", text: "Close details" });
    close.addEventListener("click", closeDetail);
    box.replaceChildren(body, close);
  }
  const [a, b] = selected;
  if (a === b) {
    body.replaceChildren(el("p", { text: a + ": a node has no link to itself; pick a cell off the diagonal." }));
    return;
  }
  body.replaceChildren(el("h3", { class: "pair", text: a + " ↔ " + b }), direction(v, a, b), direction(v, b, a));
}

// -- live updates ---------------------------------------------------------------------------------

function banner() {
  const b = document.getElementById("banner");
  let text = "";
  if (lostSince !== null) {
    text = "Lost the connection to the dashboard server " + age(lostSince) + " ago: reconnecting; the data shown is stale.";
  } else if (view && !view.link.ok) {
    text = "No connection to apid" + (view.link.error ? " (" + view.link.error + ")" : "") + " for " +
      age(view.link.since) + ": reconnecting; the data shown is stale.";
  }
  b.hidden = !text;
  b.textContent = text;
  document.body.classList.toggle("is-stale", Boolean(text));
}

function summary(v) {
  const s = v.summary;
  document.getElementById("summary").textContent =
    s.nodes + " nodes, " + s.reachable + " reachable; " + s.pairsUp + "/" + s.pairs + " directions up";
}

function render(v, changed) {
  const t0 = performance.now();
  view = v;
  offset = v.now - Date.now() / 1000;
  summary(v);
  updateMatrix(v, changed);
  if (!changed || v._nodesChanged) updateNodes(v);
  updateTopology(v);
  updateDetail(v);
  banner();
  document.body.dataset.version = String((Number(document.body.dataset.version) || 0) + 1);
  document.body.dataset.renderMs = (performance.now() - t0).toFixed(1);
}

function tick() {
  if (!view) return;
  for (const s of document.querySelectorAll("#matrix .hs")) {
    const ts = s.dataset.ts;
    s.textContent = ts ? "hs " + age(Number(ts)) : "no hs";
  }
  updateNodes(view); // "unreachable for ..." ages
  banner();
}

function connect() {
  source = new EventSource("/events");
  source.addEventListener("view", (ev) => {
    lostSince = null;
    render(JSON.parse(ev.data));
  });
  source.addEventListener("patch", (ev) => {
    if (!view) return; // a patch applies to the view this page holds (the stream starts with one)
    lostSince = null;
    const p = JSON.parse(ev.data);
    Object.assign(view, p.set);
    view._nodesChanged = "nodes" in p.set;
    for (const [r, c, cell] of p.cells) (view.matrix[r] || (view.matrix[r] = {}))[c] = cell;
    Object.assign(view.history, p.history);
    render(view, p.cells);
  });
  source.addEventListener("open", () => { lostSince = null; banner(); });
  source.addEventListener("error", () => {
    if (lostSince === null) lostSince = now();
    banner();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  setInterval(tick, 1000);
});
