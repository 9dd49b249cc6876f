// Attribution-graph page: the view of a graph JSON (GET /api/graph), every string as text.
"use strict";
ms.nav("/graph");
const TABLES = {supernodes: "Suggested supernodes", edges: "Strongest edges"};
let pinned = [];

function table(columns, rows) {
  const t = ms.el("table", {}, ms.el("tr", {}, ...columns.map(c => ms.el("th", {text: c}))));
  for (const r of rows) {
    t.append(ms.el("tr", {}, ...r.map(c => ms.el("td", {text: typeof c === "number" && !Number.isInteger(c) ? c.toFixed(4) : String(c)}))));
  }
  return t;
}

function drawPins(view) {
  document.getElementById("pins").replaceChildren(...pinned.map(id => {
    const b = ms.el("button", {cls: "pin", text: "unpin"});
    b.addEventListener("click", () => { pinned = pinned.filter(x => x !== id); drawPins(view); });
    return ms.el("li", {text: view.nodes[id] ? view.nodes[id].name : id}, b);
  }));
}

function showNode(view, id) {
  const d = view.nodes[id];
  if (!d) return;
  const pin = ms.el("button", {cls: "pin", text: pinned.includes(id) ? "pinned" : "pin"});
  pin.addEventListener("click", () => { if (!pinned.includes(id)) { pinned.push(id); drawPins(view); pin.textContent = "pinned"; } });
  const box = document.getElementById("node-info");
  box.replaceChildren(ms.el("h2", {text: d.name}, pin), table(["quantity", "value"], d.rows));
  if (d.edges_in.length) box.append(ms.el("h2", {text: "edges in (strongest)"}), table(["source", "weight"], d.edges_in));
  if (d.edges_out.length) box.append(ms.el("h2", {text: "edges out (strongest)"}), table(["target", "weight"], d.edges_out));
}

ms.api("/api/graph").then(r => {
  const v = r.view;
  pinned = v.pinned.slice();
  document.getElementById("title").textContent = v.title;
  document.getElementById("summary").replaceChildren(...v.summary.map(([k, val, s]) =>
    ms.el("div", {cls: "card"}, ms.el("div", {cls: "k", text: k}), ms.el("div", {cls: "v", text: String(val)}), ms.el("div", {cls: "s", text: s}))));
  document.getElementById("notes").replaceChildren(...v.notes.map(n => ms.el("p", {cls: "note", text: "note: " + n})));
  Plotly.newPlot("graph", v.figure.data, v.figure.layout, {displaylogo: false, responsive: true});
  document.getElementById("graph").on("plotly_click", e => {
    const p = e.points && e.points[0];
    if (p && p.customdata !== undefined) showNode(v, p.customdata);
  });
  window.mechscopeShowNode = id => showNode(v, id);
  drawPins(v);
  const tables = document.getElementById("tables");
  for (const [key, title] of Object.entries(TABLES)) {
    const t = v.tables[key];
    if (t && t.rows.length) tables.append(ms.el("section", {id: "table-" + key}, ms.el("h2", {text: title}), ms.el("div", {cls: "plot-scroll"}, table(t.columns, t.rows))));
  }
}).catch(e => ms.fail(document.querySelector("main"), e));
