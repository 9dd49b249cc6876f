"""Figures of the induction-head toy's result page, split from :mod:`mechscope.toys.induction`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mechscope.toys.common import figure

if TYPE_CHECKING:
    from mechscope.toys.induction_config import InductionConfig


def _vline(x) -> list[dict]:
    return [] if x is None else [{"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                                  "line": {"dash": "dot", "color": "#c0392b"}}]


def induction_figures(model, hist: dict, pc: dict, abl: dict, probe: Tensor, by_pos_last: list[float] | None,
                      cfg: InductionConfig) -> list[dict]:
    """The result page's figures (plotly specs, :func:`mechscope.toys.common.figure`): training, held-out and
    repeated-token loss; the ICL score; every head's scores over training; the final loss by token index;
    the ablations; the top induction head's attention on one probe prompt (the one forward pass here).

    Args:
        model: the trained HookedModel. hist: :func:`~mechscope.toys.induction.train`'s history. pc:
            :func:`~mechscope.toys.induction.phase_change`'s result. abl:
            :func:`~mechscope.toys.induction.ablate_circuit`'s result. probe: the head-score prompts
            ``[batch, pos]``. by_pos_last: the final model's held-out loss per position (None: synthetic).
    """
    steps = hist["step"]
    tl = hist["train_loss"]
    every = max(1, len(tl) // 2000)
    shapes = _vline(pc.get("induction"))
    losses = [
        {"type": "scatter", "mode": "lines", "name": "train loss", "x": list(range(0, len(tl), every)), "y": tl[::every]},
        {"type": "scatter", "mode": "lines", "name": "repeated-token loss (2nd half)", "x": steps, "y": hist["repeat_loss"]},
    ]
    if hist.get("eval_loss") and hist["eval_loss"][0] is not None:
        losses.append({"type": "scatter", "mode": "lines+markers", "name": "held-out loss", "x": steps,
                       "y": hist["eval_loss"]})
    figs = [figure("loss", "Training loss", losses,
                   {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "nats"}}, "shapes": shapes,
                    "height": 380},
                   caption="Dotted line: where the induction score rises fastest.")]
    if hist["icl"] and hist["icl"][0] is not None:
        figs.append(figure("icl", "In-context learning score", [
            {"type": "scatter", "mode": "lines+markers", "x": steps, "y": hist["icl"]}],
            {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": f"loss@{cfg.icl_late} - loss@{cfg.icl_early}"}},
             "shapes": shapes, "height": 340}))
    traces = []
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            traces.append({"type": "scatter", "mode": "lines", "name": f"{layer}.{h} induction", "x": steps,
                           "y": [c[layer][h] for c in hist["induction"]]})
            if layer == 0:
                traces.append({"type": "scatter", "mode": "lines", "name": f"{layer}.{h} prev-token", "x": steps,
                               "y": [c[layer][h] for c in hist["previous_token"]], "line": {"dash": "dash"}})
    figs.append(figure("heads", "Head scores over training", traces,
                       {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "mean attention"}, "range": [0, 1]},
                        "shapes": shapes, "height": 420},
                       caption="Induction (prefix-matching) score of every head, previous-token score of layer-0 heads."))
    if by_pos_last is not None:
        figs.append(figure("by_position", "Loss by token index (held-out text, final model)", [
            {"type": "scatter", "mode": "lines", "x": list(range(1, len(by_pos_last) + 1)), "y": by_pos_last}],
            {"xaxis": {"title": {"text": "token index"}, "type": "log"}, "yaxis": {"title": {"text": "nats"}}, "height": 340}))
    names = list(abl["cases"])
    bars = [("induction score", "induction_score", "x", "y"), ("ICL score", "icl", "x", "y"),
            ("repeated-token loss (nats)", "repeat_loss", "x2", "y2")]
    figs.append(figure("ablation", "Ablating the circuit (zero-ablation of each role's heads at hook_z)", [
        {"type": "bar", "name": label, "x": names, "y": [abl["cases"][n][key] for n in names], "xaxis": xa, "yaxis": ya}
        for label, key, xa, ya in bars if key in abl["cases"]["none"]],
        {"barmode": "group", "height": 420, "margin": {"l": 60, "r": 20, "t": 48, "b": 100},
         "xaxis": {"domain": [0, 0.58]}, "yaxis": {"title": {"text": "score"}},
         "xaxis2": {"domain": [0.68, 1], "anchor": "y2"},
         "yaxis2": {"title": {"text": "nats"}, "anchor": "x2", "rangemode": "tozero"}},
        caption="Left: the top induction head's score and the ICL score (nats); right: the loss on the second copy "
                "of the repeated random tokens."))
    L, h = abl["top_induction_head"]
    _, cache = model.run(probe[:1], cache=[f"blocks.{L}.attn.hook_pattern"])
    pat = cache[f"blocks.{L}.attn.hook_pattern"][0, h].float()
    figs.append(figure("pattern", f"Attention of induction head {L}.{h} on a repeated sequence", [
        {"type": "heatmap", "z": pat.tolist(), "colorscale": "Viridis"}],
        {"xaxis": {"title": {"text": "key position"}}, "yaxis": {"title": {"text": "query position"}, "autorange": "reversed"},
         "height": 440, "width": 500},
        caption="The off-diagonal stripe: each token of the second copy attends to the token after its earlier copy."))
    return figs
