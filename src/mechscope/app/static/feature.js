// One latent of the feature database: label (with score and provenance), top contexts, histogram, logit
// effects, co-activating latents, quantile examples. Every string is put in the page with textContent.
"use strict";
ms.nav("");
const id = Number(location.pathname.split("/").pop());
ms.api("/api/feature/" + id).then(f => {
  document.getElementById("title").textContent = "Latent #" + id;
  document.getElementById("steer-link").href = "/steer?latent=" + id;
  const lab = document.getElementById("label");
  // a label is never shown without its score and provenance
  const labels = (f.labels || []).slice().sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
  if (labels.length) for (const l of labels) {
    const score = l.score == null ? "not scored" : `${l.score_kind || "score"} ${Number(l.score).toFixed(2)} on ${l.n_scored} held-out contexts`;
    lab.append(ms.el("p", {cls: "label-row"}, ms.el("b", {text: "label: "}), ms.el("span", {cls: "feature-label", text: l.label}),
      ms.el("span", {cls: "note", text: ` · ${score} · explainer ${l.explainer || "?"} · ${l.date || "?"}`})));
  } else lab.append(ms.el("p", {cls: "note", text: "no label yet"}));
  document.getElementById("stats").textContent =
    `density ${Number(f.density).toExponential(2)} · max activation ${Number(f.max_act).toFixed(3)} · mean when active ${Number(f.mean_act).toFixed(3)} · fired on ${f.n_fired} tokens`;
  const top = document.getElementById("top");
  if (!(f.top || []).length) top.append(ms.el("p", {cls: "note", text: "this latent never fired on the corpus"}));
  for (const ex of f.top || []) top.append(ms.context(ex, f.max_act, "top-example"));
  const quant = document.getElementById("quant");
  for (const ex of f.quantiles || []) quant.append(ms.context(ex, f.max_act, "quantile-example"));
  for (const dir of ["up", "down"]) {
    const t = document.getElementById(dir);
    for (const r of (f.logits || {})[dir] || []) t.append(ms.el("tr", {}, ms.el("td", {}, ms.tok(r.token)), ms.el("td", {cls: "n", text: Number(r.value).toFixed(3)})));
  }
  const co = document.getElementById("coact");
  for (const c of f.coactivation || []) co.append(ms.el("span", {cls: "pill"}, ms.latLink(c.id), ms.el("span", {text: " " + Number(c.jaccard).toFixed(3)})));
  const h = f.histogram || {};
  if (h.edges && h.counts && window.Plotly) {
    const centers = h.counts.map((_, i) => (h.edges[i] + h.edges[i + 1]) / 2);
    Plotly.newPlot("hist", [{type: "bar", x: centers, y: h.counts, marker: {color: "#4c78a8"}}],
      {height: 260, margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "log10 activation"}}, yaxis: {title: {text: "tokens"}}},
      {displaylogo: false, responsive: true});
  }
}).catch(e => ms.fail(document.querySelector("main"), e));
