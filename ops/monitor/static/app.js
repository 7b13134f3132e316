// trustpay monitor, in the browser: observations arrive by server-sent events and are drawn as
// one sequence diagram per flow of each device. Every string from the wire is set as text
// (textContent, createElementNS), never parsed as HTML: a rejected frame's fields are anyone's.
"use strict";

const LANES = ["client", "chip", "trust-module", "trust-server", "payment-server"];
const LANE_NAMES = ["client (13)", "chip (100)", "trust module (11)", "trust server (21)", "payment server (22)"];
const FLOWS_KEPT = 4;        // per device: the current flow and the ones before it
const ROWS_KEPT = 400;       // per flow; a flow longer than this keeps its latest rows
const PAYMENTS_KEPT = 6;
const REJECTS_KEPT = 20;
const SESSIONS_KEPT = 2000;  // session -> device, for the platform's frames; the oldest are forgotten
// a flow ends with start-up done (A), the client closing the chip (B4) or payment disabled (B5)
const FLOW_ENDS = new Set(["A", "B4", "B5"]);
const RED_OUTCOMES = new Set(["refused", "failed", "disabled", "deleted", "untrusted"]);
const RED_TYPES = new Set(["error", "refusal"]);
const FLOW_NAMES = { A: "start-up (A)", B: "client (B)", C: "payment (C)" };
const SVG = "http://www.w3.org/2000/svg";
const LANE_W = 175, LEFT = 80, TOP = 30, ROW_H = 20;

let devices = new Map();     // device id -> {flows, verdict, payments, section}
let sessions = new Map();    // session hex -> device id (platform frames name no device)
let counts = { frames: 0, rejected: 0, dropped: 0 };
let rejects = [];
let nodes = new Map();

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function isRed(obs) {
  const outcome = obs.event ? obs.event.outcome : "";
  return obs.verdict !== "ok" || RED_TYPES.has(obs.type) || RED_OUTCOMES.has(outcome);
}

// -- state -------------------------------------------------------------------------------------
function deviceOf(obs) {
  const session = sessionOf(obs);
  const device = obs.device || (obs.event && obs.event.device) || sessions.get(session) || null;
  if (device && session && !sessions.has(session)) {
    sessions.set(session, device);
    if (sessions.size > SESSIONS_KEPT) sessions.delete(sessions.keys().next().value);
  }
  return device;
}

function device(id) {
  let d = devices.get(id);
  if (!d) {
    d = { id, flows: [], verdict: null, payments: new Map(), counter: 0 };
    devices.set(id, d);
  }
  return d;
}

function sessionOf(obs) {
  return obs.session || (obs.event && obs.event.session) || "";
}

function flowFor(d, obs) {
  // an answer joins the flow of its request, a payment's frame the flow of its session,
  // even when it arrives after that flow ended
  const session = sessionOf(obs);
  const known = d.flows.find((f) => (session && f.session === session)
    || (obs.reply_to && f.rows.some((row) => row.message_id === obs.reply_to)));
  if (known) return known;
  let flow = d.flows[d.flows.length - 1];
  // a flow holds one payment at most: the next one in the same client run starts a new flow
  if (!flow || flow.ended || (session && flow.session && flow.session !== session)) {
    flow = { n: ++d.counter, rows: [], letters: new Set(), orders: new Set(), ended: false, session: "" };
    d.flows.push(flow);
    if (d.flows.length > FLOWS_KEPT) d.flows.shift();
  }
  if (session && !flow.session) flow.session = session;
  return flow;
}

// returns the device whose flows changed, if any
function onFrame(obs) {
  counts.frames += 1;
  if (obs.verdict !== "ok") {
    counts.rejected += 1;
    rejects.unshift(obs);
    rejects.length = Math.min(rejects.length, REJECTS_KEPT);
  }
  if (obs.status && obs.verdict === "ok") {
    nodes.set(obs.status.node, obs.status);
    return null;
  }
  // a node's periodic counters are not a step of any flow (Prometheus shows them: --metrics-port)
  if (obs.dst === "metrics" && obs.verdict === "ok") return null;
  const id = deviceOf(obs);
  if (!id) return null;
  const d = device(id);
  const flow = flowFor(d, obs);
  flow.rows.push(obs);
  if (flow.rows.length > ROWS_KEPT) flow.rows.shift();
  const ev = obs.verdict === "ok" ? obs.event : null;
  if (!ev) return id;
  flow.letters.add(ev.flow);
  if (ev.order_id) flow.orders.add(ev.order_id);  // one payment's, or a few in a flow without a session
  if (FLOW_ENDS.has(ev.step)) flow.ended = true;
  if (ev.step === "C4" && ev.node === "trust-server") d.verdict = { ...ev, at_ms: obs.at_ms };
  if (ev.order_id) notePayment(d, ev);
  return id;
}

function notePayment(d, ev) {
  // the monitor reads no amounts (sealed): a payment is its order id and how it ended
  const known = d.payments.get(ev.order_id);
  d.payments.delete(ev.order_id);  // re-inserted: the map keeps the latest order last
  let shown = known || { order_id: ev.order_id, outcome: "in progress", reason: "" };
  if (RED_OUTCOMES.has(ev.outcome)) shown = { order_id: ev.order_id, outcome: ev.outcome, reason: ev.reason };
  else if (ev.step === "C5" && !RED_OUTCOMES.has(shown.outcome))
    shown = { order_id: ev.order_id, outcome: ev.outcome === "ok" ? "confirmed" : ev.outcome, reason: ev.reason };
  d.payments.set(ev.order_id, shown);
  while (d.payments.size > PAYMENTS_KEPT) d.payments.delete(d.payments.keys().next().value);
}

// -- drawing -----------------------------------------------------------------------------------
function laneX(role) {
  const i = LANES.indexOf(role);
  return i < 0 ? null : LEFT + i * LANE_W;
}

function drawFlow(flow) {
  const height = TOP + flow.rows.length * ROW_H + 10;
  const width = LEFT + (LANES.length - 1) * LANE_W + 360;  // room for a note beside the last lane
  const svg = el("svg:svg", { width, height, viewBox: `0 0 ${width} ${height}` });
  const defs = el("svg:defs");
  for (const kind of ["ok", "bad"]) {
    const marker = el("svg:marker", {
      id: `head-${kind}-${flow.key}`, class: kind, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
    });
    marker.append(el("svg:path", { d: "M0,0 L10,5 L0,10 z" }));
    defs.append(marker);
  }
  svg.append(defs);
  LANES.forEach((role, i) => {
    const x = laneX(role);
    svg.append(el("svg:text", { x, y: 14, "text-anchor": "middle", class: "lane-name" }, LANE_NAMES[i]));
    svg.append(el("svg:line", { x1: x, y1: 20, x2: x, y2: height, class: "lane" }));
  });
  flow.rows.forEach((obs, i) => svg.append(drawRow(obs, TOP + i * ROW_H + 10, flow.key)));
  return svg;
}

function drawRow(obs, y, key) {
  const red = isRed(obs);
  const from = laneX(obs.src), to = laneX(obs.dst);
  const common = {
    class: "", "data-type": obs.type || "", "data-verdict": obs.verdict, "data-src": obs.src, "data-dst": obs.dst,
  };
  const title = el("svg:title", {}, `${clock(obs.at_ms)} ${obs.topic} ${obs.sender || "?"} -> ${obs.recipient || "*"}`
    + ` ${obs.size} B${obs.sealed ? " sealed" : ""}${obs.reason ? ": " + obs.reason : ""}`);
  if (from !== null && to !== null && from !== to) {
    const g = el("svg:g", { ...common, class: red ? "msg bad" : "msg" });
    g.append(title);
    g.append(el("svg:line", {
      x1: from, y1: y, x2: to, y2: y, "marker-end": `url(#head-${red ? "bad" : "ok"}-${key})`,
    }));
    const verdict = obs.verdict === "ok" ? "ok" : `${obs.verdict}: ${obs.reason}`;
    // a rejection's reason is long: it starts at the arrow's left end instead of centring on it
    const at = red ? { x: Math.min(from, to) + 6, "text-anchor": "start" } : { x: (from + to) / 2, "text-anchor": "middle" };
    g.append(el("svg:text", { ...at, y: y - 3, class: "label" }, `${obs.type || "?"} · ${verdict}`));
    return g;
  }
  // an event, an operator reply or a frame off the lanes: a note beside its sender's lane
  const ev = obs.event;
  const x = from === null ? 8 : from;
  const g = el("svg:g", {
    ...common, class: red ? "event bad" : "event", "data-step": ev ? ev.step : "", "data-outcome": ev ? ev.outcome : "",
  });
  g.append(title);
  g.append(el("svg:circle", { cx: x, cy: y - 4, r: 3.5 }));
  const text = obs.verdict !== "ok" ? `${obs.type || "?"} on ${obs.topic} · ${obs.verdict}: ${obs.reason}`
    : ev ? `${ev.step} ${ev.outcome}: ${ev.reason}${ev.order_id ? " [" + ev.order_id + "]" : ""}`
    : `${obs.type || "?"} -> ${obs.dst}`;
  g.append(el("svg:text", { x: x + 7, y, class: "note" }, text));
  return g;
}

function caption(d, flow) {
  // a payment refused at the door (pay.start, refusal) has a session but no C step events
  const seen = new Set(flow.letters);
  if (flow.session) seen.add("C");
  const letters = [...seen].sort().map((l) => FLOW_NAMES[l] || l).join(" + ") || "frames";
  const orders = [...flow.orders].join(", ");
  const cap = el("figcaption", {}, `#${flow.n} ${letters}${orders ? " · order " + orders : ""} `);
  cap.append(el("span", { class: "state" }, flow.ended ? "(ended)" : "(in progress)"));
  return cap;
}

function renderDevice(d) {
  const section = el("section", { class: "device", "data-device": d.id });
  const head = el("div", { class: "device-head" });
  head.append(el("h2", {}, d.id));
  const v = d.verdict;
  const verdict = el("div", { class: "verdict" + (v && RED_OUTCOMES.has(v.outcome) ? " bad" : "") },
    v ? `trust verdict: ${v.outcome} (${v.reason}) at ${clock(v.at_ms)}` : "trust verdict: none yet");
  if (v) verdict.setAttribute("data-outcome", v.outcome);
  head.append(verdict);
  const payments = el("ul", { class: "payments" });
  for (const p of [...d.payments.values()].reverse()) {
    payments.append(el("li", {
      class: RED_OUTCOMES.has(p.outcome) ? "bad" : "", "data-order": p.order_id, "data-outcome": p.outcome,
    }, `${p.order_id} ${p.outcome}${p.reason && p.outcome !== "confirmed" ? ": " + p.reason : ""}`));
  }
  const last = el("div", {}, "last payments:");
  last.append(payments.childElementCount ? payments : el("span", { class: "empty" }, " none"));
  head.append(last);
  section.append(head);
  for (const flow of [...d.flows].reverse()) {
    flow.key = `${d.id}-${flow.n}`;
    const fig = el("figure", { class: "flow", "data-flow": flow.n, "data-letters": [...flow.letters].sort().join("") });
    fig.append(caption(d, flow), drawFlow(flow));
    section.append(fig);
  }
  return section;
}

function money(minor) {
  return (minor / 100).toFixed(2);
}

function renderLedger(ledger) {
  const panel = document.getElementById("ledger");
  panel.replaceChildren(el("h2", {}, "Ledger"));
  if (ledger.error) {
    panel.append(el("p", { class: "bad" }, ledger.error));
    return;
  }
  const totals = el("table", { class: "totals" });
  for (const [name, key, value] of [
    ["payers", "payers", money(ledger.payers)], ["merchants", "merchants", money(ledger.merchants)],
    ["total", "total", money(ledger.total)], ["payments confirmed", "confirmed", `${ledger.confirmed} of ${ledger.payments}`],
    ["paid", "paid", money(ledger.paid)],
  ]) {
    const row = el("tr", { "data-total": key });
    row.append(el("td", {}, name), el("td", { class: "num" }, `${value}`));
    totals.append(row);
  }
  const accounts = el("table", { class: "accounts" });
  for (const a of ledger.accounts) {
    const row = el("tr", { "data-account": a.account });
    row.append(el("td", {}, a.account), el("td", { class: "num" }, money(a.balance)));
    accounts.append(row);
  }
  panel.append(el("div", { class: "empty" }, ledger.currency), totals, el("h2", {}, "Accounts"), accounts);
}

function renderSide() {
  document.getElementById("counts").textContent =
    `${counts.frames} frames · ${counts.rejected} rejected · ${counts.dropped} dropped by the monitor`;
  const list = document.querySelector("#nodes ul");
  list.replaceChildren(...[...nodes.values()].sort((a, b) => a.node.localeCompare(b.node)).map((s) =>
    // a client is offline between runs by design (B4); any other node offline is news
    el("li", { class: s.state === "online" ? "" : s.role === "client" ? "empty" : "bad", "data-node": s.node },
      `${s.node}: ${s.state}`)));
  document.querySelector("#rejects ul").replaceChildren(...rejects.map((r) =>
    el("li", { class: "bad", "data-verdict": r.verdict }, `${clock(r.at_ms)} ${r.topic}: ${r.verdict} (${r.reason})`)));
}

// redraw at most once per animation frame, whatever the rate of observations
const dirty = new Set();
let scheduled = false;
function redraw() {
  scheduled = false;
  const box = document.getElementById("devices");
  if (devices.size && box.querySelector(".empty")) box.replaceChildren();
  for (const id of [...dirty].sort()) {
    const fresh = renderDevice(devices.get(id));
    const old = box.querySelector(`section.device[data-device="${CSS.escape(id)}"]`);
    if (old) old.replaceWith(fresh);
    else {
      const after = [...box.children].find((s) => s.dataset.device > id);
      box.insertBefore(fresh, after || null);
    }
  }
  dirty.clear();
  renderSide();
}

function schedule(id) {
  if (id) dirty.add(id);
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(redraw);
  }
}

function onMessage(message) {
  const obs = JSON.parse(message.data);
  if (obs.kind === "frame") {
    schedule(onFrame(obs));
  } else if (obs.kind === "dropped") {
    counts.dropped += obs.count;
    schedule(null);
  } else if (obs.kind === "ledger") {
    renderLedger(obs);
  }
}

function connect() {
  const link = document.getElementById("link");
  const source = new EventSource("/events");
  source.onopen = () => {
    // every connection starts again from the server's history: forget what the last one built
    devices = new Map(); sessions = new Map(); nodes = new Map(); rejects = [];
    counts = { frames: 0, rejected: 0, dropped: 0 };
    document.getElementById("devices").replaceChildren(el("p", { class: "empty" }, "no device has been seen yet"));
    link.dataset.state = "live";
    link.textContent = "live";
  };
  source.onerror = () => {
    link.dataset.state = "connecting";
    link.textContent = "reconnecting";  // EventSource retries by itself
  };
  source.onmessage = onMessage;
}

connect();
