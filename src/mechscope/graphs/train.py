"""Training and evaluating a transcoder for every layer from one streaming pass over real text
(``mechscope transcoders train``).

One pass of the model over the corpus feeds every layer's transcoder at once (the trainer trains several
dictionaries from one activation source; activations stream through a shuffle buffer, nothing is written to
disk). The run folder is the transcoder set: ``L00/ ... L{n-1}/``, ``transcoders.json``, the trainer's
``metrics.jsonl``, ``run.json`` and ``training_curves.html``, and ``eval.json`` when evaluated.

Evaluation on held-out text: per layer (FVU, L0, dead latents, CE loss recovered with that layer's transcoder
spliced in alone) and for the whole set spliced in at once (CE loss recovered against zero-ablating every MLP).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mechscope.core.errors import InputError
from mechscope.core.io import jsonable, write_json_atomic
from mechscope.evals.dictionary_eval import _ce
from mechscope.graphs.transcoders import (TranscoderSet, layer_folder, load_transcoders, transcoder_configs,
                                          write_manifest)

log = logging.getLogger(__name__)


@dataclass
class SetEval:
    """The whole set spliced in at once, on held-out text.

    Attributes:
        n_tokens: predicted tokens evaluated.
        ce_clean / ce_spliced / ce_zero: next-token cross-entropy (nats/token) of the model, with every MLP replaced
            by its transcoder, and with every MLP output zeroed.
        ce_loss_recovered: ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``.
    """

    n_tokens: int
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_loss_recovered: float


def evaluate_set(model, ts: TranscoderSet, contexts: torch.Tensor, *, batch_contexts: int = 8,
                 skip_positions: int = 1, progress: bool = True) -> SetEval:
    """CE loss recovered with every layer's transcoder spliced in at once (no error terms).

    Args:
        contexts: held-out token ids ``[n, context_len]`` (any device; the set must be on the model's).
        skip_positions: leading positions neither spliced nor counted (1: BOS).

    Raises:
        InputError: a set of another model, or on another device than the model.
    """
    from tqdm.auto import tqdm

    from mechscope.dictionaries.splice import Splice
    from mechscope.hooks.interventions import Ablate

    ts.check_model(model)
    ts.check_device(model)
    pos = slice(skip_positions, None)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n = 0
    for s in tqdm(range(0, contexts.shape[0], batch_contexts), desc="set eval", unit="batch", disable=not progress):
        toks = contexts[s:s + batch_contexts].to(model.device)
        with torch.no_grad():
            clean = model.run(toks).logits
            spliced = model.run(toks, saes=[Splice(t, positions=pos) for t in ts.transcoders]).logits
            zero = model.run(toks, interventions=[Ablate(f"blocks.{L}.hook_mlp_out", positions=pos)
                                                  for L in range(ts.n_layers)]).logits
        for key, lg in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            sums[key] += float(_ce(lg, toks, skip_positions).sum())
        n += int(toks[:, skip_positions + 1:].numel())
    c, sp, z = (sums[k] / n for k in ("clean", "spliced", "zero"))
    return SetEval(n, c, sp, z, (z - sp) / (z - c) if z != c else float("nan"))


def train_transcoders(model, out_dir: str | Path, *, d_sae: int = 4608, k: int = 32, skip: bool = True,
                      n_tokens: int = 1_048_576, batch_tokens: int = 2048, lr: float | None = 8e-4,
                      compute_dtype: str = "bfloat16", context_len: int = 128, corpus=None, seed: int = 0,
                      buffer_tokens: int = 16_384, checkpoint_every: int = 100, resume: bool = False,
                      eval_tokens: int = 4096, progress: bool = True, device: str | None = None) -> TranscoderSet:
    """Train a TopK transcoder (MLP input -> MLP output) for every layer from one streaming pass, write the
    manifest, and evaluate them.

    Args:
        d_sae / k / skip: each transcoder's width, latents per token and skip connection.
        n_tokens: training tokens (rounded down to whole steps of ``batch_tokens``); every layer sees them all.
        lr: Adam learning rate (None: ``2e-4 / sqrt(d_sae / 2^14)``).
        corpus: a :class:`~mechscope.training.pipeline.CorpusConfig` (default: the built-in corpora).
        buffer_tokens: rows in the shuffle buffer (memory: rows x 2 x layers x d_model x 2 bytes in bf16).
        eval_tokens: held-out tokens per evaluation (0: none).
        device: where the transcoders train (default: the model's device); the returned set is on the model's
            device, ready for graphs.

    Returns:
        the trained set (also on disk in ``out_dir``).

    Raises:
        InputError: bad sizes; an existing run without ``resume``.
    """
    from mechscope.training import DictionarySpec, TrainConfig
    from mechscope.training.pipeline import CorpusConfig, train_on_corpus

    if eval_tokens < 0:
        raise InputError(f"eval_tokens must be >= 0, got {eval_tokens}.")
    corpus = corpus or CorpusConfig(context_len=context_len, seed=seed)
    cfgs = transcoder_configs(model, d_sae=d_sae, k=k, skip=skip)
    specs = [DictionarySpec(layer_folder(L), c, lr=lr) for L, c in enumerate(cfgs)]
    tcfg = TrainConfig(n_tokens=n_tokens, batch_tokens=batch_tokens, dtype=compute_dtype, seed=seed,
                       checkpoint_every_steps=checkpoint_every)
    out = Path(out_dir)
    train_on_corpus(model, specs, tcfg, out, corpus=corpus, stream=True, buffer_tokens=buffer_tokens,
                    resume=resume, progress=progress, device=device)
    meta = {"tokens": tcfg.n_tokens_trained, "d_sae": d_sae, "k": k, "skip": skip, "corpus": list(corpus.sources),
            "context_len": corpus.context_len, "seed": seed}
    write_manifest(out, model.cfg.name, {L: layer_folder(L) for L in range(len(cfgs))}, metadata=meta)
    ts = load_transcoders(out, device=model.device)
    if eval_tokens:
        evaluation = jsonable(evaluate_transcoders(model, ts, corpus=corpus, n_tokens=eval_tokens, progress=progress))
        write_json_atomic(evaluation, out / "eval.json")
        write_manifest(out, model.cfg.name, {L: layer_folder(L) for L in range(len(cfgs))},
                       metadata={**meta, "eval": evaluation["set"]})
        ts.metadata = {**meta, "eval": evaluation["set"]}
    return ts


def evaluate_transcoders(model, ts: TranscoderSet, *, corpus=None, n_tokens: int = 4096,
                         progress: bool = True) -> dict:
    """Per-layer metrics and the whole set's CE loss recovered on held-out text, as a JSON-ready dict
    ``{"layers": [{layer, fvu, fvu_without_outliers, l0, dead_fraction, ce_loss_recovered, ...}], "set": {...}}``."""
    from mechscope.training.pipeline import CorpusConfig, contexts_for, evaluate_on_corpus

    ts.check_device(model)
    corpus = corpus or CorpusConfig()
    layers = []
    for L in range(ts.n_layers):
        e = evaluate_on_corpus(model, ts[L], corpus=corpus, n_tokens=n_tokens, progress=False)
        row = {"layer": L, **{k: v for k, v in e.summary().items()}}
        layers.append(row)
        if progress:
            log.info("layer %d: FVU %.3f, CE recovered %.3f", L, e.fvu, e.ce_loss_recovered)
    packed, n_ctx = contexts_for(model, corpus, "eval", n_tokens)
    s = evaluate_set(model, ts, packed.tokens[:n_ctx], progress=progress)
    return {"layers": layers, "set": asdict(s), "n_tokens": n_tokens,
            "mean_fvu": float(sum(r["fvu"] for r in layers) / len(layers)) if layers else math.nan}
