// Circuit page: the view of a `mechscope circuit evaluate` run (GET /api/circuit), every string as text.
"use strict";
ms.nav("/circuit");
const TABLES = {robustness: "Robustness: every ablation and level", roles: "Head roles (IOI)",
  edges: "Strongest edges", settings: "Settings"};

function table(columns, rows) {
  const t = ms.el("table", {}, ms.el("tr", {}, ...columns.map(c => ms.el("th", {text: c}))));
  for (const r of rows) {
    t.append(ms.el("tr", {}, ...r.map(c => ms.el("td", {text: c === null ? "n/a" : typeof c === "number" ? c.toFixed(4) : String(c)}))));
  }
  return t;
}

function showNode(view, name) {
  const d = view.nodes[name];
  if (!d) return;
  const box = document.getElementById("node-info");
  box.replaceChildren(ms.el("h2", {text: d.name}), table(["quantity", "value"], d.rows));
  for (const [key, label] of [["edges_out", "edges out"], ["edges_in", "edges in"]]) {
    if (d[key].length) box.append(ms.el("h2", {text: label}), table(["edge", "type", "score"], d[key]));
  }
}

ms.api("/api/circuit").then(r => {
  const v = r.view;
  document.getElementById("title").textContent = v.title;
  document.getElementById("summary").replaceChildren(...v.summary.map(([k, val, s]) =>
    ms.el("div", {cls: "card"}, ms.el("div", {cls: "k", text: k}), ms.el("div", {cls: "v", text: val}), ms.el("div", {cls: "s", text: s}))));
  document.getElementById("notes").replaceChildren(...v.notes.map(n => ms.el("p", {cls: "note", text: "note: " + n})));
  const config = {displaylogo: false, responsive: true};
  Plotly.newPlot("graph", v.figures.graph.data, v.figures.graph.layout, config);
  document.getElementById("graph").on("plotly_click", e => {
    const p = e.points && e.points[0];
    if (p && p.customdata !== undefined) showNode(v, p.customdata);
  });
  if (v.figures.curve) Plotly.newPlot("curve", v.figures.curve.data, v.figures.curve.layout, config);
  else document.getElementById("curve").append(ms.el("p", {cls: "note", text: "Not computed: run mechscope circuit evaluate with --curve."}));
  const tables = document.getElementById("tables");
  for (const [key, title] of Object.entries(TABLES)) {
    const t = v.tables[key];
    if (t) tables.append(ms.el("section", {id: "table-" + key}, ms.el("h2", {text: title}), ms.el("div", {cls: "plot-scroll"}, table(t.columns, t.rows))));
  }
}).catch(e => ms.fail(document.querySelector("main"), e));
