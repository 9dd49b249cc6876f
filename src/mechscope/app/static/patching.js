// Patching page: the activation-patching heatmaps of a `mechscope report` run (its results.json).
"use strict";
ms.nav("/patching");
ms.api("/api/patching").then(r => {
  const p = r.patching;
  document.getElementById("info").textContent =
    `${r.model}: IOI on ${r.ioi.n_prompts} prompts, mean logit difference ${Number(r.ioi.mean_logit_diff).toFixed(2)}; patching on ${p.n_prompts} prompts; ${p.metric_note}`;
  const rp = p.activation.resid_pre, hd = p.activation.heads;
  const cols = rp.col_labels.map(ms.vis), idx = cols.map((_, i) => i);
  Plotly.newPlot("resid", [{type: "heatmap", z: rp.values, x: idx, colorscale: "RdBu", zmid: 0}],
    {height: 520, margin: {l: 50, r: 10, t: 10, b: 90}, xaxis: {tickvals: idx, ticktext: cols}}, {displaylogo: false, responsive: true});
  Plotly.newPlot("heads", [{type: "heatmap", z: hd.values, colorscale: "RdBu", zmid: 0}],
    {height: 520, margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "head"}}, yaxis: {title: {text: "layer"}}}, {displaylogo: false, responsive: true});
}).catch(e => ms.fail(document.querySelector("main"), e));
