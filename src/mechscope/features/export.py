"""Exporting features: Neuronpedia-style JSON per latent, and a static HTML dashboard that opens offline.

The JSON uses the field names of Neuronpedia's feature records (``modelId``, ``layer``, ``index``,
``maxActApprox``, ``frac_nonzero``, ``pos_str``/``pos_values``, ``neg_str``/``neg_values``,
``freq_hist_data_bar_heights``/``freq_hist_data_bar_values`` as *parallel* lists of equal length,
``correlated_features_indices``, ``activations`` with ``tokens``/``values``/``maxValue``/
``maxValueTokenIndex``, ``explanations`` with ``description``/``explanationModelName``/``typeName``/
``scores``). Every label carries its score and provenance.

The dashboard is one HTML file: the selected features as JSON in a ``<script type="application/json">``
element (escaped so no string can close it), plotly.js and the app's stylesheet inlined, and rendering
that puts every string into the page with ``textContent``. A Content-Security-Policy forbids every fetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable, write_json_atomic, write_text_atomic


def neuronpedia_feature(f: dict, *, model_id: str, layer: str) -> dict:
    """One latent of ``FeatureDB.feature(i)`` as a Neuronpedia-style feature record.

    Args:
        model_id: Neuronpedia's model id (e.g. ``smollm2-135m``). layer: the source id (e.g. ``15-res-topk``).
    """
    hist = f.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    centers = [10 ** ((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]  # activation units, parallel to counts
    acts = []
    for ex in (f.get("top") or []) + (f.get("quantiles") or []):
        vals = list(ex["acts"])
        i = max(range(len(vals)), key=lambda j: vals[j]) if vals else 0
        acts.append({"tokens": list(ex["tokens"]), "values": vals, "maxValue": vals[i] if vals else 0.0,
                     "maxValueTokenIndex": i, "bin_min": ex.get("bin_min"), "bin_max": ex.get("bin_max")})
    logits = f.get("logits") or {}
    return jsonable({
        "modelId": model_id, "layer": layer, "index": str(f["id"]), "maxActApprox": f["max_act"],
        "frac_nonzero": f["density"],
        "pos_str": [r["token"] for r in logits.get("up", [])], "pos_values": [r["value"] for r in logits.get("up", [])],
        "neg_str": [r["token"] for r in logits.get("down", [])],
        "neg_values": [r["value"] for r in logits.get("down", [])],
        "freq_hist_data_bar_heights": list(counts[:len(centers)]), "freq_hist_data_bar_values": centers,
        "correlated_features_indices": [c["id"] for c in f.get("coactivation", [])],
        "correlated_features_jaccard": [c["jaccard"] for c in f.get("coactivation", [])],
        "activations": acts,
        "explanations": [{"description": lab["label"], "explanationModelName": lab["explainer"],
                          "typeName": "mechscope-detection", "scores": [{"value": lab["score"],
                          "kind": lab["score_kind"], "n_scored": lab["n_scored"]}], "createdAt": lab["date"]}
                         for lab in f.get("labels", [])],
    })


def export_neuronpedia(db, latents: Sequence[int], out_dir: str | Path, *, model_id: str, layer: str) -> Path:
    """Write ``<out_dir>/<index>.json`` for each latent and ``<out_dir>/batch.json`` with all of them (atomically).

    Raises:
        InputError: an unknown latent id.
    """
    out = Path(out_dir)
    records = []
    for i in latents:
        if not 0 <= int(i) < db.n_latents:
            raise InputError(f"latent {i} does not exist (0..{db.n_latents - 1}).")
        rec = neuronpedia_feature(db.feature(int(i)), model_id=model_id, layer=layer)
        write_json_atomic(rec, out / f"{int(i)}.json")
        records.append(rec)
    write_json_atomic(records, out / "batch.json")
    return out


def export_dashboard(db, latents: Sequence[int], path: str | Path, *, title: str = "mechscope features") -> Path:
    """Write a self-contained HTML dashboard of ``latents`` that opens offline (see the module docstring)."""
    from mechscope.report.render import plotly_js, script_json

    static = Path(__file__).resolve().parent.parent / "app" / "static"
    feats = []
    for i in latents:
        if not 0 <= int(i) < db.n_latents:
            raise InputError(f"latent {i} does not exist (0..{db.n_latents - 1}).")
        feats.append(jsonable(db.feature(int(i))))
    import html
    import re

    values = {"%TITLE%": html.escape(title), "%CSS%": (static / "app.css").read_text(encoding="utf-8"),
              "%APPJS%": (static / "app.js").read_text(encoding="utf-8").replace("</script", "<\\/script"),
              "%PLOTLY%": plotly_js(), "%DATA%": str(script_json(feats))}
    # fill the template's own placeholders only: inserted text is never searched for placeholders again
    page = "".join(values.get(part, part) for part in re.split(r"(%[A-Z]+%)", DASHBOARD))
    write_text_atomic(page, Path(path))
    return Path(path)


DASHBOARD = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<style>%CSS%</style></head>
<body><header><span class="brand">%TITLE%</span></header>
<main><section><h1>Features</h1><select id="pick" aria-label="feature"></select><p class="note" id="stats"></p><div id="label"></div></section>
<div class="row"><section><h2>Activation histogram</h2><div id="hist"></div></section>
<section><h2>Logit effects</h2><table id="logits"></table></section></div>
<section><h2>Top-activating contexts</h2><div id="top"></div></section></main>
<script>%PLOTLY%</script>
<script>%APPJS%</script>
<script type="application/json" id="features">%DATA%</script>
<script>
"use strict";
const feats = JSON.parse(document.getElementById("features").textContent);
const pick = document.getElementById("pick");
feats.forEach((f, j) => pick.append(ms.el("option", {value: String(j), text: "latent #" + f.id})));
function show(j) {
  const f = feats[j];
  document.getElementById("stats").textContent = `density ${Number(f.density).toExponential(2)} · max activation ${Number(f.max_act).toFixed(3)}`;
  const lab = document.getElementById("label");
  lab.replaceChildren(...(f.labels || []).map(l => ms.el("p", {}, ms.el("b", {text: "label: "}), ms.el("span", {text: l.label}),
    ms.el("span", {cls: "note", text: ` · ${l.score == null ? "not scored" : (l.score_kind || "score") + " " + Number(l.score).toFixed(2)} · ${l.explainer} · ${l.date}`}))));
  const top = document.getElementById("top");
  top.replaceChildren(...(f.top || []).map(ex => ms.context(ex.tokens, ex.acts, f.max_act, "top-example")));
  const t = document.getElementById("logits");
  t.replaceChildren(...((f.logits || {}).up || []).map((r, i) => ms.el("tr", {}, ms.el("td", {}, ms.el("span", {cls: "tok", text: ms.vis(r.token)})),
    ms.el("td", {cls: "n", text: Number(r.value).toFixed(3)}))));
  const h = f.histogram || {};
  if (h.edges && h.counts) Plotly.newPlot("hist", [{type: "bar", x: h.counts.map((_, i) => (h.edges[i] + h.edges[i + 1]) / 2), y: h.counts}],
    {height: 240, margin: {l: 40, r: 10, t: 10, b: 40}, xaxis: {title: {text: "log10 activation"}}}, {displaylogo: false});
}
pick.addEventListener("change", () => show(Number(pick.value)));
if (feats.length) show(0);
</script></body></html>
"""
