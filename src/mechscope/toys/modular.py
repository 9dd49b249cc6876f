"""Modular addition and grokking (Nanda, Chan, Lieberum, Smith, Steinhardt 2023, "Progress measures for
grokking via mechanistic interpretability", arXiv:2301.05217).

The model is a real ``transformers`` GPT-2 (one layer, d_model 128, 4 heads, d_mlp 512, ReLU, learned
positions, untied unembedding) with its LayerNorms removed (``nn.Identity``) and its biases fixed at
zero, as in the paper, wrapped in a :class:`~mechscope.HookedModel`: every canonical hook name, the cache
and the interventions work on it. Inputs are ``a b =`` (``=`` is token ``p``); the answer ``(a + b) mod p``
is read from the last position's first ``p`` logits.

Analyses, all on the final model and on checkpoints over training:

- the Fourier basis of Z_p (constant, then cos/sin of frequency k = 1..(p-1)/2, unit norm);
- the embedding's Fourier spectrum: ``||F W_E||`` per frequency (sparse after grokking);
- each MLP neuron's frequency: the share of its activation variance over all (a, b) explained by the
  2D Fourier terms of one frequency (linear and quadratic); key frequencies are those that explain most
  of many neurons;
- **excluded loss** (train set): the loss after removing from the logits their components along
  ``cos(w(a+b))`` and ``sin(w(a+b))`` (as functions of (a, b), for every output) for each key frequency w;
- **restricted loss** (all pairs): the loss of logits that keep only those components (and the mean);
- key-frequency ablation with mechscope's own ``Replace`` intervention: the MLP activations
  (``blocks.0.mlp.hook_post`` at the last position) projected onto the key frequencies' Fourier terms.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.core.errors import InputError
from mechscope.toys.common import figure, finish, seed_everything

PAPER = {"cite": "Nanda, Chan, Lieberum, Smith & Steinhardt 2023, Progress measures for grokking via "
                 "mechanistic interpretability (ICLR 2023)", "url": "https://arxiv.org/abs/2301.05217"}
PAPER_KEY_FREQS = [14, 35, 41, 42, 52]
HOOK_POST = "blocks.0.mlp.hook_post"


@dataclass(frozen=True)
class ModularConfig:
    """Settings of the modular-addition run; the defaults are the paper's (REFERENCE.md), with 15k epochs.

    Attributes:
        p: the modulus (a prime). train_fraction: share of the p^2 pairs used for training.
        d_model / n_heads / d_mlp: model widths (d_head = d_model / n_heads).
        lr / weight_decay / betas / warmup: AdamW with a linear warm-up over ``warmup`` epochs.
        epochs: full-batch steps. checkpoint_every: epochs between stored checkpoints.
        init_std: normal initialisation std (TransformerLens's 0.8/sqrt(d_model) when None).
        key_freq_share: a neuron belongs to a frequency when that frequency's terms explain at least this
            share of its variance. min_neurons: a key frequency has at least this many such neurons.
        seed: seeds the split and the initialisation.
    """

    p: int = 113
    train_fraction: float = 0.3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 10
    epochs: int = 15_000
    checkpoint_every: int = 100
    init_std: float | None = None
    key_freq_share: float = 0.85
    min_neurons: int = 3
    seed: int = 0

    def check(self) -> None:
        """Raises InputError naming the bad field."""
        if self.p < 5 or any(self.p % d == 0 for d in range(2, int(self.p ** 0.5) + 1)):
            raise InputError(f"p must be a prime >= 5 (the paper uses 113), got {self.p}.")
        if not 0 < self.train_fraction < 1:
            raise InputError(f"train_fraction must be in (0, 1) (the paper uses 0.3), got {self.train_fraction}.")
        if self.d_model % self.n_heads:
            raise InputError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}.")
        for name in ("epochs", "checkpoint_every", "d_mlp", "min_neurons"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}.")


def build_model(cfg: ModularConfig):
    """The paper's one-layer transformer as a HookedModel over a transformers GPT-2 (seeded by ``cfg.seed``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import mechscope

    hf_cfg = GPT2Config(vocab_size=cfg.p + 1, n_positions=3, n_embd=cfg.d_model, n_layer=1, n_head=cfg.n_heads,
                        n_inner=cfg.d_mlp, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=cfg.p, eos_token_id=cfg.p,
                        initializer_range=cfg.init_std or 0.8 / math.sqrt(cfg.d_model))
    seed_everything(cfg.seed)
    hf = GPT2LMHeadModel(hf_cfg)
    for block in hf.transformer.h:  # no LayerNorm (the paper's model has none)
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    hf.transformer.ln_f = nn.Identity()
    for name, prm in hf.named_parameters():  # no biases: fixed at zero
        if name.endswith("bias"):
            prm.data.zero_()
            prm.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"modular-addition-p{cfg.p}")


def dataset(p: int, train_fraction: float, seed: int) -> tuple[Int[Tensor, "pairs 3"], Int[Tensor, " pairs"], Tensor, Tensor]:
    """All p^2 inputs ``a b =`` in row-major (a, b) order, labels, and a seeded train/test split of row ids."""
    a = torch.arange(p)
    pairs = torch.cartesian_prod(a, a)
    tokens = torch.cat([pairs, torch.full((p * p, 1), p)], 1)
    labels = (pairs[:, 0] + pairs[:, 1]) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * p * p))
    return tokens, labels, perm[:n_train].sort().values, perm[n_train:].sort().values


def fourier_basis(p: int) -> Float[Tensor, "p p"]:
    """Rows: the constant, then cos and sin of frequency k = 1..(p-1)/2 over x = 0..p-1, each of unit norm."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    b = torch.stack(rows)
    return (b / b.norm(dim=1, keepdim=True)).float()


def embedding_spectrum(model, p: int) -> Float[Tensor, " n_freq"]:
    """``||F W_E||^2`` per frequency 1..(p-1)/2 (cos and sin rows summed), as a share of the total."""
    w_e = model.hf.transformer.wte.weight.detach().float()[:p]  # [p, d_model]
    coef = fourier_basis(p) @ w_e  # [p, d_model]
    power = coef.pow(2).sum(-1)
    per_freq = power[1::2] + power[2::2]
    return per_freq / power.sum()


@torch.no_grad()
def neuron_acts(model, tokens: Tensor) -> Float[Tensor, "pairs d_mlp"]:
    """MLP activations (``blocks.0.mlp.hook_post``) at the last position over ``tokens``, via mechscope's cache."""
    _, cache = model.run(tokens, cache=[HOOK_POST], cache_positions=slice(-1, None))
    return cache[HOOK_POST][:, -1].float()


def neuron_frequency_shares(acts: Float[Tensor, "pairs d_mlp"], p: int) -> Float[Tensor, "d_mlp n_freq"]:
    """Share of each neuron's variance (over all (a, b)) explained by the 2D Fourier terms of frequency k.

    The terms of frequency k are the products of basis rows ``{1, cos k, sin k}`` in a and in b other than
    the constant: linear (cos ka, sin ka, cos kb, sin kb) and quadratic (cos ka cos kb, ...).
    """
    fb = fourier_basis(p)
    grid = acts.T.reshape(-1, p, p)  # [d_mlp, a, b]
    coef = torch.einsum("ia,nab,jb->nij", fb, grid, fb)  # 2D Fourier coefficients
    power = coef.pow(2)
    total = power.sum((1, 2)) - power[:, 0, 0]  # variance: everything but the constant term
    n_freq = (p - 1) // 2
    shares = torch.empty(acts.shape[1], n_freq)
    for k in range(1, n_freq + 1):
        idx = [0, 2 * k - 1, 2 * k]
        shares[:, k - 1] = power[:, idx][:, :, idx].sum((1, 2)) - power[:, 0, 0]
    return shares / total.clamp_min(1e-12)[:, None]


def key_frequencies(shares: Float[Tensor, "d_mlp n_freq"], share: float, min_neurons: int) -> list[int]:
    """Frequencies (1-based) that explain at least ``share`` of the variance of at least ``min_neurons`` neurons."""
    best, which = shares.max(-1)
    counts = torch.bincount(which[best >= share], minlength=shares.shape[1])
    return [k + 1 for k in range(shares.shape[1]) if counts[k] >= min_neurons]


def _xpy_directions(p: int, freqs: list[int]) -> Float[Tensor, "dirs pairs"]:
    """Unit vectors over the p^2 (a, b) grid: cos(w(a+b)) and sin(w(a+b)) for each frequency."""
    a = torch.arange(p, dtype=torch.float64)
    s = (a[:, None] + a[None, :]).reshape(-1)
    rows = []
    for k in freqs:
        for fn in (torch.cos, torch.sin):
            v = fn(2 * math.pi * k * s / p)
            rows.append(v / v.norm())
    return torch.stack(rows).float() if rows else torch.zeros(0, p * p)


def excluded_and_restricted_logits(logits: Float[Tensor, "pairs p"], p: int, freqs: list[int]) -> tuple[Tensor, Tensor]:
    """(excluded, restricted) logits: without / with only the key-frequency components cos/sin(w(a+b)).

    Logits are viewed, for every output c, as a function over the (a, b) grid; the components along the
    key frequencies' ``cos(w(a+b))`` and ``sin(w(a+b))`` are removed (excluded) or kept alone, with each
    output's mean over the grid (restricted).
    """
    d = _xpy_directions(p, freqs)  # the directions are orthonormal (distinct frequencies)
    comp = d.T @ (d @ logits)
    mean = logits.mean(0, keepdim=True)
    return logits - comp, mean + comp


def _loss_acc(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    return float(F.cross_entropy(logits.double(), labels)), float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def all_logits(model, tokens: Tensor, p: int) -> Float[Tensor, "pairs p"]:
    """The answer logits (last position, first p outputs) for every input."""
    return model.hf(tokens, logits_to_keep=1).logits[:, -1, :p].float()


@torch.no_grad()
def key_frequency_ablation(model, tokens: Tensor, labels: Tensor, p: int, freqs: list[int]) -> dict[str, float]:
    """Loss and accuracy over all pairs when the MLP activations keep only the key frequencies' 2D Fourier
    terms (the constant included), applied with mechscope's ``Replace`` at ``blocks.0.mlp.hook_post``."""
    from mechscope.hooks.interventions import Replace

    acts = neuron_acts(model, tokens)  # [pairs, d_mlp]
    fb = fourier_basis(p)
    keep = [0] + [i for k in freqs for i in (2 * k - 1, 2 * k)]
    basis = fb[keep]  # [r, p] orthonormal rows
    grid = acts.T.reshape(-1, p, p)
    proj = torch.einsum("ia,nab,jb->nij", basis, grid, basis)
    recon = torch.einsum("ia,nij,jb->nab", basis, proj, basis).reshape(acts.shape[1], -1).T  # [pairs, d_mlp]

    def replace_last(v):
        out = v.clone()
        out[:, -1] = recon.to(v.dtype)
        return out

    logits, _ = model.run(tokens, interventions=[Replace(HOOK_POST, value=replace_last)])
    loss, acc = _loss_acc(logits[:, -1, :p].float(), labels)
    return {"loss": loss, "accuracy": acc, "kept_terms": len(keep) ** 2}


def train(cfg: ModularConfig, *, progress: bool = True) -> tuple[object, dict, list[dict]]:
    """Full-batch AdamW on the training pairs.

    Returns:
        (model, history, checkpoints): history has per-epoch ``train_loss``, and every
        ``checkpoint_every`` epochs ``epoch``, ``test_loss``, ``train_acc``, ``test_acc``; checkpoints are
        the trainable weights (float32 copies) at those epochs.
    """
    from tqdm.auto import tqdm

    cfg.check()
    model = build_model(cfg)
    tokens, labels, train_ids, test_ids = dataset(cfg.p, cfg.train_fraction, cfg.seed)
    hf = model.hf
    params = [q for q in hf.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min((e + 1) / cfg.warmup, 1.0))
    x_tr, y_tr = tokens[train_ids], labels[train_ids]
    hist = {"train_loss": [], "epoch": [], "test_loss": [], "train_acc": [], "test_acc": []}
    ckpts = []
    hf.train()
    bar = tqdm(range(cfg.epochs + 1), desc="modular addition", unit="epoch", disable=not progress)
    for epoch in bar:
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            hf.eval()
            logits = all_logits(model, tokens, cfg.p)
            hist["epoch"].append(epoch)
            for split, ids in (("train", train_ids), ("test", test_ids)):
                loss, acc = _loss_acc(logits[ids], labels[ids])
                hist[f"{split}_acc"].append(acc)
                if split == "test":
                    hist["test_loss"].append(loss)
            ckpts.append({k: v.detach().clone() for k, v in hf.named_parameters() if v.requires_grad})
            bar.set_postfix(test_loss=f"{hist['test_loss'][-1]:.3g}", test_acc=f"{hist['test_acc'][-1]:.3f}")
            hf.train()
        if epoch == cfg.epochs:
            break
        loss = F.cross_entropy(hf(x_tr, logits_to_keep=1).logits[:, -1, :cfg.p].float(), y_tr)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        hist["train_loss"].append(float(loss.detach()))
    hf.eval()
    return model, hist, ckpts


def load_checkpoint(model, weights: dict[str, Tensor]):
    """A copy of ``model`` (a HookedModel from :func:`build_model`) with ``weights`` loaded."""
    import mechscope

    hf = copy.deepcopy(model.hf)
    hf.load_state_dict(weights, strict=False)
    return mechscope.HookedModel(hf, name=model.cfg.name)


@torch.no_grad()
def progress_measures(model, ckpts: list[dict], hist: dict, cfg: ModularConfig, freqs: list[int]) -> dict:
    """Per checkpoint: excluded loss (train), restricted loss (all pairs), the sum of squared weights, and
    the share of the embedding's Fourier power in the key frequencies."""
    tokens, labels, train_ids, _ = dataset(cfg.p, cfg.train_fraction, cfg.seed)
    out = {"epoch": hist["epoch"], "excluded_loss": [], "restricted_loss": [], "weight_norm_sq": [],
           "embedding_key_share": []}
    m = load_checkpoint(model, ckpts[0]) if ckpts else None  # one copy, its weights replaced per checkpoint
    for w in ckpts:
        m.hf.load_state_dict(w, strict=False)
        logits = all_logits(m, tokens, cfg.p)
        excl, restr = excluded_and_restricted_logits(logits, cfg.p, freqs)
        out["excluded_loss"].append(_loss_acc(excl[train_ids], labels[train_ids])[0])
        out["restricted_loss"].append(_loss_acc(restr, labels)[0])
        out["weight_norm_sq"].append(float(sum(v.float().pow(2).sum() for v in w.values())))
        spec = embedding_spectrum(m, cfg.p)
        out["embedding_key_share"].append(float(spec[[k - 1 for k in freqs]].sum()) if freqs else 0.0)
    return out


def grokking_epoch(hist: dict, threshold: float = 0.5) -> int | None:
    """First checkpoint epoch at which test accuracy reaches ``threshold`` (the grokking step), or None."""
    return next((e for e, a in zip(hist["epoch"], hist["test_acc"]) if a >= threshold), None)


def run_modular(cfg: ModularConfig = ModularConfig(), *, progress: bool = True) -> dict:
    """Train, find the key frequencies, measure progress over training, ablate, and return the result dict
    (``mechscope.toys.common``) with the paper's numbers beside ours."""
    t0 = time.perf_counter()
    cfg.check()
    model, hist, ckpts = train(cfg, progress=progress)
    tokens, labels, train_ids, test_ids = dataset(cfg.p, cfg.train_fraction, cfg.seed)
    shares = neuron_frequency_shares(neuron_acts(model, tokens), cfg.p)
    freqs = key_frequencies(shares, cfg.key_freq_share, cfg.min_neurons)
    spec = embedding_spectrum(model, cfg.p)
    pm = progress_measures(model, ckpts, hist, cfg, freqs)
    logits = all_logits(model, tokens, cfg.p)
    full_loss, full_acc = _loss_acc(logits, labels)
    test_loss, test_acc = _loss_acc(logits[test_ids], labels[test_ids])
    _, restricted = excluded_and_restricted_logits(logits, cfg.p, freqs)
    r_loss, r_acc = _loss_acc(restricted, labels)
    ablation = key_frequency_ablation(model, tokens, labels, cfg.p, freqs)
    best, which = shares.max(-1)
    clustered = best >= cfg.key_freq_share
    grok = grokking_epoch(hist)
    top_k = sorted(range(len(spec)), key=lambda i: -float(spec[i]))[:max(len(freqs), 1)]
    metrics = {
        "grokking_epoch": grok, "final_train_acc": hist["train_acc"][-1], "final_test_acc": test_acc,
        "final_test_loss": test_loss, "key_frequencies": freqs,
        "embedding_power_in_key_freqs": float(spec[[k - 1 for k in freqs]].sum()) if freqs else 0.0,
        "embedding_top_freqs": [i + 1 for i in top_k],
        "neurons_clustered": int(clustered.sum()), "neurons": int(shares.shape[0]),
        "neurons_per_key_freq": {k: int(((which == k - 1) & clustered).sum()) for k in freqs},
        "restricted": {"loss": r_loss, "accuracy": r_acc}, "all_pairs": {"loss": full_loss, "accuracy": full_acc},
        "key_frequency_ablation": ablation, "history": hist, "progress_measures": pm,
        "embedding_spectrum": spec.tolist(),
    }
    comparisons = [
        {"quantity": "test accuracy after training", "paper": 1.0, "ours": test_acc, "note": "all pairs not trained on"},
        {"quantity": "grokking epoch (test accuracy first >= 50%)", "paper": "~9.4k-13.3k (cleanup phase)",
         "ours": grok, "note": "paper: memorisation to 1.4k, circuit formation 1.4k-9.4k, cleanup 9.4k-13.3k"},
        {"quantity": "key frequencies", "paper": str(PAPER_KEY_FREQS), "ours": str(freqs),
         "note": "a new seed finds its own few; the paper's run found 5"},
        {"quantity": "number of key frequencies", "paper": len(PAPER_KEY_FREQS), "ours": len(freqs), "note": ""},
        {"quantity": "embedding Fourier power in the key frequencies", "paper": "sparse (a few frequencies)",
         "ours": metrics["embedding_power_in_key_freqs"], "note": f"of {len(spec)} frequencies"},
        {"quantity": "accuracy, MLP ablated to the key frequencies", "paper": "~unchanged (loss falls)",
         "ours": ablation["accuracy"], "note": f"loss {ablation['loss']:.3g} vs {full_loss:.3g} unablated"},
        {"quantity": "restricted loss (logits: key frequencies only)", "paper": "below the full test loss by the end",
         "ours": r_loss, "note": f"accuracy {r_acc:.3f}"},
    ]
    notes = [f"Model: transformers GPT-2, 1 layer, LayerNorms removed, biases fixed at 0, {cfg.p + 1} tokens; "
             f"{len(train_ids)} training pairs of {cfg.p ** 2}, full batch, {cfg.epochs} epochs."]
    if not freqs:
        notes.append("No key frequencies found: the model did not form the Fourier circuit in this run.")
    result = {"toy": "modular", "title": "Modular addition and grokking", "paper": PAPER, "seed": cfg.seed,
              "settings": asdict(cfg), "metrics": metrics, "comparisons": comparisons,
              "figures": _figures(hist, pm, spec, shares, which, clustered, freqs, model, tokens, cfg),
              "notes": notes, "command": f"mechscope toy modular --seed {cfg.seed} --epochs {cfg.epochs}"}
    return finish(result, t0)


def _figures(hist, pm, spec, shares, which, clustered, freqs, model, tokens, cfg) -> list[dict]:
    ev = hist["epoch"]
    log_y = {"yaxis": {"type": "log", "title": {"text": "cross-entropy (nats)"}},
             "xaxis": {"title": {"text": "epoch"}}, "height": 420}
    train_x = list(range(len(hist["train_loss"])))[::max(1, len(hist["train_loss"]) // 2000)]
    curves = figure("losses", "Loss over training, with the progress measures", [
        {"type": "scatter", "mode": "lines", "name": "train loss", "x": train_x,
         "y": [hist["train_loss"][i] for i in train_x]},
        {"type": "scatter", "mode": "lines", "name": "test loss", "x": ev, "y": hist["test_loss"]},
        {"type": "scatter", "mode": "lines", "name": "excluded loss (train)", "x": ev, "y": pm["excluded_loss"],
         "line": {"dash": "dot"}},
        {"type": "scatter", "mode": "lines", "name": "restricted loss (all)", "x": ev, "y": pm["restricted_loss"],
         "line": {"dash": "dash"}},
    ], log_y, caption="Excluded loss: the train loss once the key frequencies' cos/sin(w(a+b)) components are "
                      "removed from the logits. Restricted loss: the loss of the logits that keep only them.")
    acc = figure("accuracy", "Accuracy and weight norm", [
        {"type": "scatter", "mode": "lines", "name": "train accuracy", "x": ev, "y": hist["train_acc"]},
        {"type": "scatter", "mode": "lines", "name": "test accuracy", "x": ev, "y": hist["test_acc"]},
        {"type": "scatter", "mode": "lines", "name": "sum of squared weights", "x": ev, "y": pm["weight_norm_sq"],
         "yaxis": "y2"},
    ], {"xaxis": {"title": {"text": "epoch"}}, "yaxis": {"title": {"text": "accuracy"}, "range": [0, 1.02]},
        "yaxis2": {"title": {"text": "sum of squared weights"}, "overlaying": "y", "side": "right"}, "height": 380})
    ks = list(range(1, len(spec) + 1))
    emb = figure("embedding", "Fourier spectrum of the embedding", [
        {"type": "bar", "x": ks, "y": spec.tolist(), "marker": {"color": ["#c0392b" if k in freqs else "#4c78a8"
                                                                           for k in ks]}}],
        {"xaxis": {"title": {"text": "frequency k"}}, "yaxis": {"title": {"text": "share of ||W_E||^2"}}, "height": 340},
        caption="Red: the key frequencies found from the MLP neurons.")
    counts = torch.bincount(which[clustered], minlength=len(spec)).tolist()
    neurons = figure("neurons", "MLP neurons by frequency", [
        {"type": "bar", "x": ks, "y": counts}],
        {"xaxis": {"title": {"text": "frequency k"}},
         "yaxis": {"title": {"text": f"neurons with >= {cfg.key_freq_share:.0%} of variance in k"}}, "height": 340})
    figs = [curves, acc, emb, neurons]
    if freqs:
        acts = neuron_acts(model, tokens)
        n = int(shares[:, freqs[0] - 1].argmax())
        figs.append(figure("neuron", f"Neuron {n} over all inputs (frequency {freqs[0]})", [
            {"type": "heatmap", "z": acts[:, n].reshape(cfg.p, cfg.p).tolist(), "colorscale": "Viridis"}],
            {"xaxis": {"title": {"text": "b"}}, "yaxis": {"title": {"text": "a"}}, "height": 420, "width": 480}))
    return figs
