"""The report's sparse-dictionary section: training curves, evaluation metrics and latent density.

Built from files a training run leaves (``mechscope sae train``): each dictionary folder's ``cfg.json``
and ``eval.json``, and the run's ``metrics.jsonl`` beside the folder. A dictionary without ``eval.json``
is evaluated here on ``eval_tokens`` held-out positions of its run's corpus (``data.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable
from mechscope.training.curves import read_metrics

EVAL_KEYS = ("n_tokens", "l0", "fvu", "explained_variance", "fvu_batch_mean", "fvu_without_outliers",
             "outlier_fraction", "outlier_variance_share", "mse", "cosine_similarity", "ce_clean",
             "ce_with_dictionary", "ce_zero_ablation", "ce_loss_recovered", "delta_lm_loss", "kl_to_clean",
             "dead_fraction", "dense_fraction")


def sae_section(folders, model=None, *, eval_tokens: int = 25_000, progress: bool = True) -> dict:
    """JSON-ready facts about each dictionary folder.

    Args:
        folders: dictionary folders (mechscope, SAELens or sparsify format).
        model: the HookedModel, used only to evaluate a dictionary that has no ``eval.json``.

    Raises:
        InputError: a folder that holds no dictionary.
    """
    from mechscope.dictionaries import load_dictionary

    out = []
    for folder in folders:
        folder = Path(folder)
        d = load_dictionary(folder)
        c = d.cfg
        entry = {"name": folder.name, "architecture": c.architecture, "hook_in": c.hook_in, "hook_out": c.hook_out,
                 "d_in": c.d_in, "d_sae": c.d_sae, "k": c.k, "model_name": c.model_name,
                 "training_tokens": c.metadata.get("training_tokens"), "train_seconds": c.metadata.get("train_seconds")}
        eval_path = folder / "eval.json"
        if eval_path.is_file():
            ev = json.loads(eval_path.read_text(encoding="utf-8"))
        elif model is not None:  # on the held-out split of the run's own corpus (data.json), else the default
            from mechscope.training.pipeline import CorpusConfig, evaluate_on_corpus

            data = folder.parent / "data.json"
            corpus = CorpusConfig(**json.loads(data.read_text())["corpus"]) if data.is_file() else CorpusConfig()
            ev = jsonable(evaluate_on_corpus(model, d, corpus=corpus, n_tokens=eval_tokens, progress=progress))
        else:
            raise InputError(f"{folder} has no eval.json; run `mechscope sae eval {folder}` first.")
        entry["eval"] = {k: ev.get(k) for k in EVAL_KEYS}
        entry["density_histogram"] = ev.get("density_histogram")
        entry["histogram_edges"] = ev.get("histogram_edges")
        rows = [r for r in read_metrics(folder.parent / "metrics.jsonl") if r.get("name") == folder.name]
        entry["curves"] = {k: [[r["tokens"], r.get(k)] for r in rows] for k in ("mse", "fvu", "l0", "dead_fraction")}
        out.append(entry)
    return {"dictionaries": out}


def sae_figures(section: dict) -> dict:
    """Plotly specs: per dictionary, training curves (FVU, L0, dead fraction vs tokens) and the density histogram."""
    from mechscope.report.layout import layout as _layout

    figs = {}
    for i, e in enumerate(section["dictionaries"]):
        curves = e["curves"]
        if curves["fvu"]:
            data = []
            for key, label, axis in (("fvu", "FVU", "y"), ("dead_fraction", "dead fraction", "y"), ("l0", "L0", "y2")):
                pts = [p for p in curves[key] if p[1] is not None]
                data.append({"type": "scatter", "mode": "lines", "name": label, "yaxis": axis,
                             "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
            figs[f"fig-sae-curves-{i}"] = {"data": data, "layout": _layout(
                f"Training: {e['name']}", height=360, margin={"l": 60, "r": 60, "t": 48, "b": 50},
                xaxis={"title": {"text": "training tokens"}},
                yaxis={"title": {"text": "FVU, dead fraction"}, "rangemode": "tozero"},
                yaxis2={"title": {"text": "L0"}, "overlaying": "y", "side": "right", "rangemode": "tozero"},
                legend={"orientation": "h", "y": -0.25})}
        hist, edges = e.get("density_histogram"), e.get("histogram_edges")
        if hist:
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            figs[f"fig-sae-density-{i}"] = {"data": [{"type": "bar", "x": centers, "y": hist,
                                                      "marker": {"color": "#4c78a8"}}], "layout": _layout(
                f"Latent density (live latents; dead: {e['eval']['dead_fraction']:.1%})", height=360,
                xaxis={"title": {"text": "log10(fraction of tokens the latent fires on)"}},
                yaxis={"title": {"text": "latents"}}, bargap=0.05)}
    return figs
