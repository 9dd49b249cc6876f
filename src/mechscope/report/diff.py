"""The model-diff report: one self-contained HTML page from a :class:`~mechscope.diff.DiffResult` or its diff.json.

Sections, all drawn from ``DiffResult.to_dict()`` (so a saved diff.json re-renders the same page):

- summary: the models, texts and tokens, the mean token KL with its bootstrap interval, the layer whose weights
  and the layer whose residual stream changed most;
- weights: ``||W_t - W_b||_F / ||W_b||_F`` per (layer, module kind) and per layer, the most changed tensors;
- activations: norm ratio, cosine and relative difference per layer (first-k and all positions) and per head;
- logit lens: KL(P_tuned^L || P_base^L) per layer, and the tokens whose final probability rose or fell most;
- the most changed tokens: context, next token, each model's top predictions, KL;
- cross-model patching (when run): the share of the base-tuned metric gap recovered per layer or head, with a
  warning when the gap is too small for the shares to mean anything (:data:`TINY_GAP`);
- model-specific latents, only when the dict has a ``"latents"`` list (``diff_models(dictionary=...)``, or e.g.
  :func:`mechscope.dictionaries.crosscoder_analysis.model_specific_latents`), with the dictionary's kind, site,
  FVU and L0 when the dict has a ``"dictionary"`` entry.

Safety as in the other reports: the template autoescapes every string (tokens included), figure data reaches
the page's script as escaped JSON (:func:`~mechscope.report.render.script_json`), plotly.js is inlined once and a
Content-Security-Policy forbids every fetch, so the page opens offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from markupsafe import Markup

from mechscope.core.errors import InputError
from mechscope.core.io import write_text_atomic
from mechscope.report.diff_figures import (
    METRIC_INFO,
    activation_lines,
    head_heatmap,
    lens_kl_figure,
    patching_heads,
    patching_lines,
    split_sites,
    weight_bars,
    weight_heatmap,
    window_names,
)
from mechscope.report.render import _env, plotly_js, script_json

#: Below this |m_b - m_t| (in the metric's units) the recovered shares of cross-model patching are noise.
TINY_GAP = 1e-3
_PARTS = ("weights", "activations", "kl", "logit_lens")
_FIX = ("give a DiffResult (mechscope.diff.diff_models), its to_dict(), or the path of a diff.json written by "
        "`mechscope diff`")


def fmt_num(x, digits: int = 4) -> str:
    """A number to ``digits`` significant digits; "n/a" for None, non-numbers and non-finite values."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def fmt_pct(p) -> str:
    """A probability as a percentage: one decimal from 1% up, two significant digits below."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p):
        return "n/a"
    return f"{100 * p:.1f}%" if abs(p) >= 0.01 or p == 0 else f"{100 * p:.2g}%"


def as_diff_dict(result) -> dict:
    """The JSON-ready dict of a DiffResult, a diff dict, or a diff.json path, checked for the parts the page needs.

    Raises:
        InputError: a missing file, invalid JSON, or a dict without weights, activations, kl and logit_lens.
    """
    if hasattr(result, "to_dict") and hasattr(result, "weights"):
        result = result.to_dict()
    elif isinstance(result, (str, Path)):
        path = Path(result)
        if path.is_dir():
            path = path / "diff.json"
        if not path.is_file():
            raise InputError(f"no diff file at {path}; {_FIX}.")
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e}); rerun `mechscope diff` to rewrite it.") from e
    if not isinstance(result, dict):
        raise InputError(f"cannot draw a diff report from a {type(result).__name__}; {_FIX}.")
    missing = [k for k in _PARTS if not isinstance(result.get(k), dict)]
    if missing:
        raise InputError(f"the diff result lacks {', '.join(missing)}; {_FIX}.")
    return result


# -- sections ---------------------------------------------------------------------------------------------------
def _weights_view(w: dict, figs: dict) -> dict:
    by_layer, by_layer_kind = w.get("by_layer") or [], w.get("by_layer_kind") or []
    if by_layer:
        figs["fig-w-heat"] = weight_heatmap(by_layer_kind)
        figs["fig-w-bars"] = weight_bars(by_layer)
    rows = []
    changed_layers = [L for L, r in enumerate(by_layer) if r.get("delta")]
    for L in sorted(changed_layers, key=lambda i: -(by_layer[i].get("relative") or 0))[:10]:
        kinds = by_layer_kind[L] if L < len(by_layer_kind) else {}
        kind = max(kinds, key=lambda k: kinds[k].get("relative") or 0) if kinds else None
        rows.append([f"layer {L}", fmt_num(by_layer[L].get("relative")), fmt_num(by_layer[L].get("delta")),
                     f"{kind} ({fmt_num(kinds[kind].get('relative'))})" if kind else "n/a"])
    params = w.get("params") or []
    changed = sorted((p for p in params if p.get("delta")), key=lambda p: -(p.get("relative") or 0))
    tensors = [[p["name"], "×".join(str(s) for s in p.get("shape", [])), fmt_num(p.get("relative")), fmt_num(p.get("delta")),
                fmt_num(p.get("base"))] for p in changed[:15]]
    g = w.get("global") or {}
    return {"top": rows, "tensors": tensors, "n_changed": len(changed), "n_params": len(params),
            "n_layers_changed": len(changed_layers), "n_layers": len(by_layer),
            "global": fmt_num(g.get("relative")) if g.get("n_params") else None}


def _acts_view(a: dict, figs: dict) -> dict:
    names = window_names(int(a.get("first_k", 5)), bool(a.get("skip_first", True)))
    vector, heads = split_sites(a.get("windows") or {})
    lines = []
    for i, (suffix, per_w) in enumerate(vector.items()):
        ids = []
        for metric in METRIC_INFO:
            if any(metric in per_m for per_m in per_w.values()):
                figs[f"fig-a{i}-{metric}"] = activation_lines(suffix, metric, per_w, names)
                ids.append(f"fig-a{i}-{metric}")
        lines.append({"site": suffix, "ids": ids})
    head_ids = []
    for i, (suffix, per_w) in enumerate(heads.items()):
        for w in ("all", "first_k"):
            if "rel_diff" in per_w.get(w, {}):
                figs[f"fig-h{i}-{w}"] = head_heatmap(suffix, names[w], per_w[w]["rel_diff"])
                head_ids.append(f"fig-h{i}-{w}")
    n_tok = a.get("n_tokens") or {}
    return {"lines": lines, "heads": head_ids, "names": names, "n_all": n_tok.get("all"),
            "n_first": n_tok.get("first_k"), "skip_first": bool(a.get("skip_first", True)), "vector": vector}


def _top_activation_layer(vector: dict) -> tuple[int | None, float | None, str | None]:
    suffix = "hook_resid_post" if "hook_resid_post" in vector else next(iter(vector), None)
    vals = ((vector.get(suffix) or {}).get("all") or {}).get("rel_diff") or []
    best = [(v, L) for L, v in enumerate(vals) if isinstance(v, (int, float))]
    if not best:
        return None, None, suffix
    v, L = max(best, key=lambda t: (t[0], -t[1]))
    return L, v, suffix


def _preds(items) -> list[dict]:
    return [{"token": str(p.get("token", "")), "pct": fmt_pct(p.get("prob"))} for p in items or []]


def _tokens_view(kl: dict) -> list[dict]:
    return [{"kl": fmt_num(t.get("kl")), "where": f"{t.get('text')}:{t.get('position')}", "context": str(t.get("context", "")),
             "next": None if t.get("next") is None else str(t["next"]), "base": _preds(t.get("base_top")),
             "tuned": _preds(t.get("tuned_top"))} for t in kl.get("top") or []]


def _lens_rows(items) -> list[list]:
    return [[str(t.get("token", "")), fmt_pct(t.get("base_prob")), fmt_pct(t.get("tuned_prob")),
             fmt_num(100 * t["delta_prob"], 3) if isinstance(t.get("delta_prob"), (int, float)) else "n/a"]
            for t in items or []]


def _patching_view(p: dict | None, figs: dict) -> dict | None:
    if not p:
        return None
    kinds = p.get("kinds") or {}
    gap = p.get("gap")
    per_head = p.get("per") == "head"
    ids, best = [], []
    if per_head:
        for i, (k, v) in enumerate(kinds.items()):
            figs[f"fig-p-head{i}"] = patching_heads(k, v.get("recovered") or [])
            ids.append(f"fig-p-head{i}")
    elif kinds:
        figs["fig-p-layers"] = patching_lines(kinds)
        ids.append("fig-p-layers")
    for k, v in kinds.items():
        rec = v.get("recovered") or []
        cells = ([(x, f"L{L}H{h}") for L, row in enumerate(rec) for h, x in enumerate(row or [])] if per_head
                 else [(x, f"layer {L}") for L, x in enumerate(rec)])
        cells = [c for c in cells if isinstance(c[0], (int, float))]
        if cells:
            x, where = max(cells, key=lambda c: c[0])
            best.append([k, where, fmt_num(x, 3)])
    tiny = not isinstance(gap, (int, float)) or abs(gap) < TINY_GAP
    return {"metric": str(p.get("metric", "metric")), "per": str(p.get("per", "layer")), "ids": ids, "best": best,
            "tuned": fmt_num(p.get("tuned_value")), "base": fmt_num(p.get("base_value")), "gap": fmt_num(gap), "tiny": tiny}


def _context_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return str(c.get("text", json.dumps(c, ensure_ascii=False, default=str)))
    return str(getattr(c, "text", c))


def dictionary_line(info) -> str | None:
    """One sentence on the dictionary the latents come from (kind, site, rows, FVU, L0, class counts), or None."""
    if not isinstance(info, dict):
        return None
    st = info.get("stats") or {}
    fvu = st.get("fvu") or {}
    head = (f"{info.get('kind', 'dictionary')} at {info.get('site', '?')}, {info.get('n_rows', '?')} tokens, "
            f"{st.get('d_sae', '?')} latents, k = {st.get('k', '?')}, {st.get('n_steps', '?')} steps")
    if st.get("n_rows_all") not in (None, info.get("n_rows")):
        head += f" ({st['n_rows_all']} before repeated contexts were dropped)"
    parts = [head]
    if fvu:
        parts.append("FVU " + ", ".join(f"{m} {fmt_num(v, 3)}" for m, v in fvu.items()) + " (fraction of variance "
                     "unexplained, 0 is perfect)")
    if st.get("l0") is not None:
        parts.append(f"L0 {fmt_num(st.get('l0'), 3)} latents per token")
    cl = st.get("classes")
    if isinstance(cl, dict):
        parts.append("latents by relative norm: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in cl.items()))
    if st.get("relative_norm_max") is not None:
        parts.append(f"r ranges from {fmt_num(st.get('relative_norm_min'), 3)} to {fmt_num(st['relative_norm_max'], 3)}")
    if st.get("decoder_cosine_median") is not None:
        med = st["decoder_cosine_median"]
        parts.append(f"median cosine of a latent's two decoders {fmt_num(med, 3)}"
                     + (" (low: most latents are still near their random initialisation, so the classes say "
                        "little; train longer)" if med < 0.5 else ""))
    return "; ".join(parts) + "."


def _latents_view(latents, info=None) -> dict | None:
    """Rows of the model-specific latents table, or None when the result has no ``"latents"`` key."""
    if latents is None:
        return None
    if not isinstance(latents, list) or not all(isinstance(x, dict) for x in latents):
        raise InputError("result['latents'] must be a list of dicts (id, relative_norm, cosine, optional nu_eps / "
                         "nu_r, top_contexts: list of strings), e.g. model_specific_latents(...); drop the key "
                         "to leave the section out.")
    has_nu = any("nu_eps" in x or "nu_r" in x for x in latents)
    has_freq = any("frequency" in x for x in latents)
    has_geom = any("relative_norm" in x or "cosine" in x for x in latents)
    has_contrib = any("mean_contribution" in x for x in latents)
    rows = []
    for x in latents:
        ctx = x.get("top_contexts", x.get("contexts")) or []
        rows.append({"id": str(x.get("id", x.get("latent", "?"))), "r": fmt_num(x.get("relative_norm"), 3),
                     "cos": fmt_num(x.get("cosine"), 3), "nu_eps": fmt_num(x.get("nu_eps"), 3), "nu_r": fmt_num(x.get("nu_r"), 3),
                     "freq": fmt_pct(x.get("frequency")), "contrib": fmt_num(x.get("mean_contribution"), 3),
                     "spurious": bool(x.get("spurious")), "contexts": [_context_text(c) for c in ctx]})
    return {"rows": rows, "has_nu": has_nu, "has_freq": has_freq, "has_geom": has_geom or not has_contrib,
            "has_contrib": has_contrib, "about": dictionary_line(info),
            "kind": info.get("kind") if isinstance(info, dict) else None}


def _settings(d: dict) -> list[list[str]]:
    s = dict(d.get("settings") or {})
    out = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in s.items() if v is not None]
    secs = d.get("seconds") or {}
    if secs:
        out.append(["wall time (s)", ", ".join(f"{k} {fmt_num(v, 3)} s" for k, v in secs.items())])
    return out


def diff_page_data(d: dict) -> tuple[dict, dict]:
    """The diff page's template values and its figures (by id) from a diff dict; the scan report reuses both."""
    figs: dict = {}
    w, a, kl, lens = d["weights"], d["activations"], d["kl"], d["logit_lens"]
    wv = _weights_view(w, figs)
    av = _acts_view(a, figs)
    if lens.get("kl"):
        figs["fig-lens"] = lens_kl_figure(lens["kl"])
    by_layer = w.get("by_layer") or []
    rels = [(r.get("relative") or 0, L) for L, r in enumerate(by_layer)]
    top_w = max(rels, key=lambda t: (t[0], -t[1])) if rels else (0, None)
    a_layer, a_val, a_site = _top_activation_layer(av.pop("vector"))
    ci = kl.get("ci") or {}
    n_tokens = sum(kl.get("n_tokens") or [])
    total = w.get("total") or {}
    cards = [
        {"k": "tuned model", "v": str(d.get("tuned", "tuned")), "s": f"compared with the base {d.get('base', 'base')}",
         "small": True},
        {"k": "texts", "v": f"{d.get('n_texts', 'n/a')} texts", "s": f"{n_tokens} tokens scored for KL"},
        {"k": "mean token KL(P_tuned || P_base)", "v": f"{fmt_num(kl.get('mean'))} nats/token",
         "s": (f"95% CI [{fmt_num(ci.get('low'))}, {fmt_num(ci.get('high'))}] nats/token, bootstrap over texts"
               if ci.get("low") is not None else "no interval (fewer than 2 texts)")},
        {"k": "top layer by weight change", "v": f"layer {top_w[1]}" if top_w[0] > 0 else "none",
         "s": (f"||dW||_F / ||W||_F = {fmt_num(top_w[0])} (ratio)" if top_w[0] > 0 else "no layer's weights changed"),
         "layer": top_w[1] if top_w[0] > 0 else None},
        {"k": "top layer by activation change", "v": "n/a" if a_layer is None else f"layer {a_layer}",
         "s": (f"mean ||a_t - a_b|| / ||a_b|| = {fmt_num(a_val)} (ratio) at {a_site}, all positions"
               if a_layer is not None else "no per-layer activation site compared"), "layer": a_layer},
        {"k": "all weights", "v": f"{fmt_num(total.get('relative'))} (ratio)",
         "s": f"||dW||_F / ||W||_F over every parameter; {wv['n_changed']} of {wv['n_params']} tensors changed"},
    ]
    view = {"cards": cards, "settings": _settings(d), "weights": wv, "acts": av,
            "lens": {"has_fig": "fig-lens" in figs, "n_tokens": lens.get("n_tokens"),
                     "final": fmt_num((lens.get("kl") or [None])[-1]),
                     "up": _lens_rows(lens.get("top_increased")), "down": _lens_rows(lens.get("top_decreased"))},
            "tokens": _tokens_view(kl), "patching": _patching_view(d.get("patching"), figs),
            "latents": _latents_view(d.get("latents"), d.get("dictionary")), "base": str(d.get("base", "base")),
            "tuned": str(d.get("tuned", "tuned"))}
    return view, figs


# -- public -----------------------------------------------------------------------------------------------------
def diff_figures(result) -> dict[str, dict]:
    """Every plotly figure of the report, keyed by the id of the element it is drawn into.

    Ids: ``fig-w-heat`` / ``fig-w-bars`` (weights), ``fig-a{i}-{metric}`` (vector site i), ``fig-h{i}-{window}``
    (per-head site i), ``fig-lens``, ``fig-p-layers`` or ``fig-p-head{i}`` (patching).

    Raises:
        InputError: as :func:`as_diff_dict`.
    """
    return diff_page_data(as_diff_dict(result))[1]


def render_diff_html(result, *, title: str | None = None) -> str:
    """The report as one HTML string (plotly.js inlined: about 5 MB).

    Args:
        result: a :class:`~mechscope.diff.DiffResult`, its ``to_dict()`` (optionally with ``"latents"``), or the
            path of a diff.json.
        title: the page's heading; default "Model diff: TUNED vs BASE".

    Raises:
        InputError: as :func:`as_diff_dict`; ``"latents"`` that is not a list of dicts.
    """
    d = as_diff_dict(result)
    view, figs = diff_page_data(d)
    title = title or f"Model diff: {view['tuned']} vs {view['base']}"
    return _env().get_template("diff.html.j2").render(
        v=view, title=title, figures=figs, figures_json=script_json(figs), plotly_js=Markup(plotly_js()),
        tiny_gap=TINY_GAP)


def render_diff_report(result, out_path, *, title: str | None = None) -> Path:
    """Render the report and write it to ``out_path`` atomically (temporary file, then rename); returns the path.

    Args:
        result: as :func:`render_diff_html`.
        out_path: the HTML file to write; its folder must exist.
        title: as :func:`render_diff_html`.

    Raises:
        InputError: the folder of ``out_path`` does not exist; as :func:`render_diff_html`.
    """
    path = Path(out_path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: its folder {path.parent} does not exist; create it first "
                         f"(mkdir -p {path.parent}) or choose a path in an existing folder.")
    page = render_diff_html(result, title=title)  # no file on error
    write_text_atomic(page, path)
    return path


__all__ = ["TINY_GAP", "as_diff_dict", "dictionary_line", "diff_figures", "diff_page_data", "fmt_num", "fmt_pct", "render_diff_html",
           "render_diff_report"]
