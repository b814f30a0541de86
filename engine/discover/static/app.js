// nightsift label: the page. The token comes from the URL it was opened with; the API calls send
// it in the X-Nightsift-Token header, the images in their query string.
"use strict";
const token = new URLSearchParams(window.location.search).get("token") || "";
let items = [];
let idx = 0;
let pending = Promise.resolve();  // labels are sent one after the other, in key order

function api(path, options = {}) {
  const headers = { "X-Nightsift-Token": token };
  if (options.body) headers["Content-Type"] = "application/json";
  return fetch(path, { ...options, headers }).then((r) => {
    if (!r.ok) return r.json().then((j) => { throw new Error(j.error || r.status); });
    return r.json();
  });
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  return String(v);
}

function setStatus(text) { document.getElementById("status").textContent = text; }

function renderProgress(p) {
  document.getElementById("progress").textContent = `${p.labeled} / ${p.total} labeled`;
  document.getElementById("bar-fill").style.width = `${p.total ? (100 * p.labeled) / p.total : 0}%`;
  document.getElementById("counts").textContent =
    Object.entries(p.by_label).map(([k, v]) => `${k} ${v}`).join(" · ");
}

function render() {
  const it = items[idx];
  const card = document.getElementById("card");
  if (!it) { card.dataset.candid = ""; return; }
  card.dataset.candid = it.candid;
  card.dataset.index = String(idx);
  document.getElementById("title").textContent =
    `#${idx + 1} of ${items.length} · candid ${it.candid} · ${it.source}` + (it.label ? ` · labeled ${it.label}` : "");
  for (const kind of ["science", "template", "difference"]) {
    const img = document.getElementById(`img-${kind}`);
    img.src = `/api/cutout/${it.candid}/${kind}.png?token=${encodeURIComponent(token)}`;
  }
  const rows = [["rb", it.rb], ["anomaly", it.anomaly], ["priority", it.priority],
                ["uncertainty", it.uncertainty], ["anomaly rank", it.anomaly_rank],
                ...Object.entries(it.features)];
  const table = document.getElementById("features");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    const a = document.createElement("td"); a.textContent = k;
    const b = document.createElement("td"); b.textContent = fmt(v);
    tr.append(a, b);
    return tr;
  }));
  const ol = document.getElementById("queue");
  ol.querySelectorAll("li").forEach((li, n) => {
    li.className = (n === idx ? "current " : "") + (items[n].label || "");
  });
  const cur = ol.children[idx];
  if (cur) cur.scrollIntoView({ block: "nearest" });
}

function renderQueue() {
  const ol = document.getElementById("queue");
  ol.replaceChildren(...items.map((it, n) => {
    const li = document.createElement("li");
    li.textContent = `${it.candid} p=${fmt(it.priority)} rb=${fmt(it.rb)}`;
    li.addEventListener("click", () => { idx = n; render(); });
    return li;
  }));
}

function nextUnlabeled(from) {
  for (let k = 1; k <= items.length; k++) {
    const n = (from + k) % items.length;
    if (!items[n].label) return n;
  }
  return Math.min(from + 1, items.length - 1);
}

function label(lab) {
  pending = pending.then(() => sendLabel(lab));
  return pending;
}

async function sendLabel(lab) {
  const it = items[idx];
  if (!it) return;
  try {
    const r = await api("/api/label", { method: "POST", body: JSON.stringify({ candid: it.candid, label: lab }) });
    it.label = lab;
    renderProgress(r.progress);
    setStatus(`${it.candid}: ${lab} (${r.row.user}, ${r.row.time})`);
    idx = nextUnlabeled(idx);
    render();
  } catch (e) {
    setStatus(`error: ${e.message}`);
  }
}

function move(step) {
  idx = Math.max(0, Math.min(items.length - 1, idx + step));
  render();
}

async function load() {
  try {
    const q = await api("/api/queue");
    items = q.items;
    document.getElementById("user").textContent = `user: ${q.user} · threshold ${fmt(q.threshold)}`;
    renderQueue();
    renderProgress(q.progress);
    const first = items.findIndex((it) => !it.label);
    idx = first >= 0 ? first : 0;
    render();
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(`cannot load the queue: ${e.message}`);
    document.body.dataset.ready = "error";
  }
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const keys = { r: () => label("real"), b: () => label("bogus"), i: () => label("interesting"),
                 n: () => move(1), ArrowRight: () => move(1), p: () => move(-1), ArrowLeft: () => move(-1) };
  const f = keys[ev.key];
  if (f) { ev.preventDefault(); f(); }
});

document.querySelectorAll("button[data-label]").forEach((b) =>
  b.addEventListener("click", () => label(b.dataset.label)));
document.getElementById("btn-prev").addEventListener("click", () => move(-1));
document.getElementById("btn-next").addEventListener("click", () => move(1));
load();
