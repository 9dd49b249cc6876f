"""Exporting features: Neuronpedia's upload format, and a static HTML dashboard that opens offline.

Neuronpedia imports dashboards in one documented way: SAEDashboard's ``neuronpedia-runner`` writes
``batch-<n>.json`` files, and Neuronpedia's ``convert-saedashboard-to-neuronpedia-export.py`` (in the
neuronpedia repository, ``utils/neuronpedia-utils``) turns them into the export it loads. mechscope writes
those batch files directly, with every key that converter reads:

- top level: ``model_id``, ``layer`` (int), ``sae_set``, ``sae_id_suffix``, ``features``;
- per feature: ``feature_index``, ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (logit
  effects), ``frac_nonzero`` (density), ``freq_hist_data_bar_values``/``_heights`` (activation
  histogram: bin centres in activation units, counts), ``activations`` (each ``tokens``, ``values``,
  ``bin_min``, ``bin_max``, ``bin_contains``, ``qualifying_token_index``; top examples have
  ``bin_min = -1`` and ``bin_contains = -1`` as in SAEDashboard), ``n_prompts_total``,
  ``n_tokens_in_prompt``, ``dataset``, and optionally ``vector`` (the decoder direction, which lets
  Neuronpedia steer with the feature);
- what mechscope does not compute is present and empty: neuron alignment, correlated neurons, the
  Pearson/L1 correlated-feature lists (mechscope's co-activation is a Jaccard ranking, kept under its
  own keys ``coactivation_indices``/``coactivation_jaccard`` rather than mislabelled), the logit
  histogram and ``decoder_weights_dist``.

Labels go to ``explanations.json`` with the field names of Neuronpedia's ``Explanation`` record
(``modelId``, ``layer`` = the source id ``<layer>-<sae_set>``, ``index``, ``description``, ``typeName``,
``explanationModelName``, ``createdAt``), plus the score and the prompt: a label never travels without
its score and provenance.

The dashboard is one HTML file: the selected features as JSON in a ``<script type="application/json">``
element (escaped so no string can close it), plotly.js and the app's stylesheet inlined, and rendering
that puts every string into the page with ``textContent``. A Content-Security-Policy forbids every fetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable, write_json_atomic, write_text_atomic


def _activation(ex: dict, bin_min: float | int, bin_max: float, bin_contains: float | int) -> dict:
    vals = [float(v) for v in ex["acts"]]
    return {"tokens": list(ex["tokens"]), "values": vals, "bin_min": bin_min, "bin_max": bin_max,
            "bin_contains": bin_contains,
            "qualifying_token_index": max(range(len(vals)), key=vals.__getitem__) if vals else 0}


def neuronpedia_feature(f: dict, *, n_prompts_total: int = 0, n_tokens_in_prompt: int = 0, dataset: str = "",
                        vector=None) -> dict:
    """One latent of ``FeatureDB.feature(i)`` as a feature of a SAEDashboard/Neuronpedia batch file.

    Args:
        f: ``FeatureDB.feature(i)``. n_prompts_total / n_tokens_in_prompt / dataset: the corpus the
            statistics were computed on. vector: the latent's decoder direction ``[d_model]`` (a tensor or
            a sequence of floats), or None.
    """
    hist = f.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    centers = [10 ** ((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]  # activation units, parallel to counts
    qedges = f.get("quantile_edges") or []
    n_bins = max(len(qedges) - 1, 1)
    acts = [_activation(ex, -1, f["max_act"], -1) for ex in f.get("top") or []]
    for ex in f.get("quantiles") or []:
        b = ex["bin"]
        lo, hi = (qedges[b], qedges[b + 1]) if b + 1 < len(qedges) else (0.0, f["max_act"])
        acts.append(_activation(ex, lo, hi, 1.0 / n_bins))  # equal-count bins: each holds 1/n of the sample
    logits = f.get("logits") or {}
    up, down = logits.get("up", []), logits.get("down", [])
    co = f.get("coactivation", [])
    rec = {
        "feature_index": int(f["id"]),
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "coactivation_indices": [c["id"] for c in co], "coactivation_jaccard": [c["jaccard"] for c in co],
        "neg_str": [r["token"] for r in down], "neg_values": [r["value"] for r in down],
        "pos_str": [r["token"] for r in up], "pos_values": [r["value"] for r in up],
        "frac_nonzero": f["density"],
        "freq_hist_data_bar_values": centers, "freq_hist_data_bar_heights": list(counts[:len(centers)]),
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": int(n_prompts_total), "n_tokens_in_prompt": int(n_tokens_in_prompt), "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": acts,
    }
    if vector is not None:
        rec["vector"] = [float(v) for v in (vector.tolist() if hasattr(vector, "tolist") else vector)]
    return jsonable(rec)


def _explanation(lab: dict, model_id: str, source_id: str, i: int) -> dict:
    score = (f"{lab['score_kind'] or 'score'} {lab['score']:.3f} on {lab['n_scored']} held-out contexts"
             if lab["score"] is not None else "not scored")
    return {"modelId": model_id, "layer": source_id, "index": str(i), "description": lab["label"],
            "typeName": "mechscope-detection", "explanationModelName": lab["explainer"], "createdAt": lab["date"],
            "notes": score, "score": lab["score"], "scoreKind": lab["score_kind"], "nScored": lab["n_scored"],
            "prompt": lab["prompt"]}


def export_neuronpedia(db, latents: Sequence[int], out_dir: str | Path, *, model_id: str, sae_set: str,
                       layer: int | None = None, vectors=None, batch_size: int = 128) -> Path:
    """Write Neuronpedia's upload format for ``latents`` into ``out_dir`` (see the module docstring).

    Files (each written atomically): ``batch-0.json``, ``batch-1.json``, ... with ``batch_size`` features
    each, and ``explanations.json`` with every label and its score. Upload them with Neuronpedia's
    ``convert-saedashboard-to-neuronpedia-export.py --saedashboard-output-dir OUT_DIR``.

    Args:
        db: a FeatureDB. latents: latent ids. model_id: Neuronpedia's model id (e.g. ``smollm2-135m``).
        sae_set: the source-set id (e.g. ``res-topk-4608``); the source id is ``<layer>-<sae_set>``.
        layer: the layer number; None reads it from the database's hook name.
        vectors: the dictionary's ``W_dec`` ``[d_sae, d_model]`` (or anything indexable by latent id), to
            include each latent's decoder direction as ``vector``; None leaves it out.

    Raises:
        InputError: an unknown latent id, an empty selection, a layer that cannot be read from the hook,
            or a non-positive batch size.
    """
    from mechscope.core.names import parse

    ids = [int(i) for i in latents]
    if not ids:
        raise InputError("no latents to export; pass ids such as --latents 0-99.")
    for i in ids:
        if not 0 <= i < db.n_latents:
            raise InputError(f"latent {i} does not exist (0..{db.n_latents - 1}).")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if layer is None:
        hook = db.meta.get("hook")
        layer = parse(hook)[1] if hook else None
        if layer is None:
            raise InputError(f"cannot read a layer number from the database's hook {hook!r}; pass layer= (--layer).")
    meta = db.meta
    corpus = meta.get("corpus")
    dataset = "mechscope:" + ",".join(corpus) if isinstance(corpus, list) else str(corpus or "")
    out = Path(out_dir)
    source_id = f"{layer}-{sae_set}"
    explanations = []
    for b in range(0, len(ids), batch_size):
        feats = []
        for i in ids[b:b + batch_size]:
            f = db.feature(i)
            feats.append(neuronpedia_feature(f, n_prompts_total=meta.get("n_contexts", 0),
                                             n_tokens_in_prompt=meta.get("context_len", 0), dataset=dataset,
                                             vector=None if vectors is None else vectors[i]))
            explanations += [_explanation(lab, model_id, source_id, i) for lab in f["labels"]]
        write_json_atomic({"model_id": model_id, "layer": int(layer), "sae_set": sae_set, "sae_id_suffix": None,
                           "features": feats}, out / f"batch-{b // batch_size}.json")
    write_json_atomic(jsonable(explanations), out / "explanations.json")
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
<section><h2>Top-activating contexts</h2><p class="note">A window around each context's peak (outlined); the button shows the whole context. · marks a space, ↵ a newline, → a tab; invisible characters show their code point.</p><div id="top"></div></section>
<div class="row"><section><h2>Activation histogram</h2><div id="hist"></div></section>
<section><h2>Logit effects</h2><table id="logits"></table></section></div></main>
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
  top.replaceChildren(...(f.top || []).map(ex => ms.context(ex, f.max_act, "top-example")));
  const t = document.getElementById("logits");
  t.replaceChildren(...((f.logits || {}).up || []).map((r, i) => ms.el("tr", {}, ms.el("td", {}, ms.tok(r.token)),
    ms.el("td", {cls: "n", text: Number(r.value).toFixed(3)}))));
  const h = f.histogram || {};
  if (h.edges && h.counts) Plotly.newPlot("hist", [{type: "bar", x: h.counts.map((_, i) => (h.edges[i] + h.edges[i + 1]) / 2), y: h.counts}],
    {height: 240, margin: {l: 40, r: 10, t: 10, b: 40}, xaxis: {title: {text: "log10 activation"}}}, {displaylogo: false});
}
pick.addEventListener("change", () => show(Number(pick.value)));
if (feats.length) show(0);
</script></body></html>
"""
