"""What the latents of a feature-statistics pass are, and their logit effects.

A :class:`FeatureSource` is a sparse dictionary's latents (activations ``encode(hook_in)``, output
directions the decoder rows ``W_dec [d_sae, d_out]``) or the neurons of an MLP hook
``blocks.L.mlp.hook_post`` (activations the hidden units, output directions the rows of the down
projection ``[d_mlp, d_model]``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from mechscope.core.errors import InputError


def weights_digest(dictionary) -> str:
    """First 16 hex digits of the SHA-256 of the decoder ``W_dec`` as float32: what a feature database records
    (``meta["source"]["weights_sha256"]``) of the dictionary it was built from."""
    w = dictionary.W_dec.detach().float().cpu().contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def check_database_matches(db, dictionary) -> None:
    """Refuse to pair a feature database with a dictionary it was not built from.

    Its latent ids would point at other features: labels, top contexts and steering would describe different
    latents. Compares what the database records of its source (``db.meta["source"]``: kind, hook, number of
    latents, decoder hash) with ``dictionary``.

    Args:
        db: a :class:`~mechscope.features.db.FeatureDB` (``path``, ``meta``, ``n_latents``).
        dictionary: a loaded dictionary (``source`` names its folder in the message).

    Raises:
        InputError: a database of neurons, or of a dictionary with another number of latents, another hook or
            other weights; names both files and the fix.
    """
    src = db.meta.get("source") or {}
    here = getattr(dictionary, "source", None) or "the dictionary"
    c = dictionary.cfg
    fix = (f"Fix: pass the database built from {here} (`mechscope features build {here} --out FILE.duckdb`)"
           + (f", or the dictionary the database was built from (-d {src['path']})." if src.get("path") else "."))
    if src.get("kind") == "neurons":
        raise InputError(f"{db.path} describes the neurons of {src.get('hook')} (built with --neurons), not the "
                         f"latents of {here}. {fix}")
    origin = f" ({src['path']})" if src.get("path") else ""
    if db.n_latents != c.d_sae:
        raise InputError(f"{here} has {c.d_sae} latents but the database has {db.n_latents}: {db.path} was built "
                         f"from another dictionary{origin}, so its latent ids would name other features. {fix}")
    if src.get("hook_in", c.hook_in) != c.hook_in:
        raise InputError(f"{here} reads {c.hook_in} but the database {db.path} was built from a dictionary of "
                         f"{src['hook_in']}{origin}, so its latent ids would name other features. {fix}")
    recorded = src.get("weights_sha256")
    if recorded and recorded != weights_digest(dictionary):
        raise InputError(f"{here} has other weights than the dictionary {db.path} was built from{origin} (decoder "
                         f"hash {weights_digest(dictionary)}, recorded {recorded}): was it retrained since? {fix}")


class FeatureSource:
    """What the latents are: a dictionary's latents or the neurons of an MLP hook.

    Args:
        model: the HookedModel. dictionary: a SparseDictionary, or neurons: an MLP hook
            ``blocks.L.mlp.hook_post`` (exactly one). dictionary_path: recorded in the database.
        encode_dtype: ``float32`` (the dictionary's own encode, exact) or ``bfloat16`` (TopK dictionaries:
            the encoder matmul in bf16; see :meth:`_encode_pre`).

    Attributes:
        hook: the hook to cache. kind: ``"dictionary"`` or ``"neurons"``. n_latents: number of latents.
        identity: JSON-able description (part of the resume fingerprint and of the database's meta).
    """

    def __init__(self, model, *, dictionary=None, neurons: str | None = None, dictionary_path: str | None = None,
                 encode_dtype: str = "float32"):
        if encode_dtype not in ("float32", "bfloat16"):
            raise InputError(f"encode_dtype must be float32 or bfloat16, got {encode_dtype!r}.")
        self.encode_dtype = encode_dtype
        self._bf16 = None
        from mechscope.core.names import parse

        if (dictionary is None) == (neurons is None):
            raise InputError("give exactly one of a dictionary or a neuron hook (e.g. blocks.3.mlp.hook_post).")
        self.model, self.dictionary = model, dictionary
        if dictionary is not None:
            from mechscope.dictionaries.splice import check_fits

            self.kind, self.hook = "dictionary", dictionary.cfg.hook_in
            check_fits(model, dictionary)  # the hook exists and has the dictionary's width (names its cfg.json)
            self.n_latents = dictionary.cfg.d_sae
            self.identity = {"kind": "dictionary", "path": dictionary_path, "hook_in": self.hook,
                             "hook_out": dictionary.cfg.hook_out, "d_sae": self.n_latents,
                             "architecture": dictionary.cfg.architecture,
                             "weights_sha256": weights_digest(dictionary)}
        else:
            template, layer = parse(neurons)
            if template != "blocks.{L}.mlp.hook_post" or neurons not in model.hook_names():
                raise InputError(f"--neurons takes an MLP hidden hook like 'blocks.3.mlp.hook_post' of this model "
                                 f"(layers 0..{model.cfg.n_layers - 1}), got {neurons!r}.")
            self.kind, self.hook, self.layer = "neurons", neurons, layer
            self.n_latents = model.cfg.d_mlp
            self.identity = {"kind": "neurons", "hook": neurons, "d_mlp": self.n_latents}
        self.identity["model"] = model.cfg.name
        if dictionary is not None and encode_dtype != "float32":
            self.identity["encode_dtype"] = encode_dtype
        _, layer = parse(self.hook)
        self.stop_at_layer = None if layer is None else layer + 1

    @torch.no_grad()
    def activations(self, tokens_BP: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Latent activations of a batch of contexts (one forward pass), position 0 (BOS) set to 0.

        Returns:
            (acts ``[B, P, n_latents]`` float32, firing entries ``(b, pos, latent, value)``: every entry with
            value > 0, in (b, pos) order). TopK dictionaries produce the entries straight from their top-k
            (no scan of the dense tensor).
        """
        res = self.model.run(tokens_BP.to(self.model.device), cache=[self.hook], stop_at_layer=self.stop_at_layer)
        return self.from_hook(res.cache[self.hook], tokens_BP.shape)

    @torch.no_grad()
    def from_hook(self, x: Tensor, shape: torch.Size) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`activations` from the cached value ``x`` of :attr:`hook` for contexts of ``shape`` ``[B, P]``
        (one forward can then serve several sources: :func:`mechscope.features.multi.compute_many_feature_stats`)."""
        x = x.reshape(*shape, -1)
        d = self.dictionary
        if d is not None and d.cfg.architecture == "topk":
            pre = self._encode_pre(x.to(d.W_enc.device)).float().cpu()
            vals, idx = pre.topk(d.cfg.k, dim=-1, sorted=False)
            vals = vals.relu()
            vals[:, 0] = 0.0
            acts = torch.zeros_like(pre).scatter_(-1, idx, vals)
            b, p, j = (vals > 0).nonzero(as_tuple=True)
            lat = idx[b, p, j]
            order = torch.argsort(b * (idx.shape[1] * pre.shape[-1]) + p * pre.shape[-1] + lat)
            b, p, lat = b[order], p[order], lat[order]
            return acts, (b, p, lat, acts[b, p, lat])
        acts = x.float() if d is None else d.encode(x.to(d.W_enc.device)).float().cpu()
        acts[:, 0] = 0.0
        b, p, lat = (acts > 0).nonzero(as_tuple=True)
        return acts, (b, p, lat, acts[b, p, lat])

    def _encode_pre(self, x: Tensor) -> Tensor:
        """The dictionary's pre-activations; with ``encode_dtype="bfloat16"`` the matmul runs in bf16 (8x
        faster on CPUs with bf16 units; pre-activations then carry bf16 rounding, ~3 significant digits,
        as in bf16-autocast training)."""
        d = self.dictionary
        if self.encode_dtype == "float32":
            return d.encode_pre(x)
        if self._bf16 is None:
            self._bf16 = d.W_enc.detach().to(torch.bfloat16)
        x = x.float()
        if d.cfg.subtracts_b_dec:
            x = x - d.b_dec.detach().float()
        return (x.to(torch.bfloat16) @ self._bf16).float() + d.b_enc.detach().float()

    @torch.no_grad()
    def directions(self) -> Tensor | None:
        """Output directions ``[n_latents, d_model]`` float32 in the residual stream, or None when the
        latents do not write to it (a dictionary whose ``d_out`` is not ``d_model``)."""
        m = self.model
        if self.dictionary is not None:
            w = self.dictionary.W_dec.detach().float().cpu()
            return w if w.shape[1] == m.cfg.d_model else None
        from mechscope.models.hooked import _weight_in_out

        proj = m.layer_module(self.layer, m.adapter.mlp_out_proj)
        return _weight_in_out(proj, m.adapter.conv1d).detach().float().cpu()  # [d_mlp, d_model]


def final_norm_gain(model) -> Tensor:
    """The final norm's elementwise gain ``[d_model]`` float32: ``w`` (``1 + w`` for Gemma's rms1p), ones if none."""
    mod = model.module(model.adapter.final_norm)
    w = getattr(mod, "weight", None)
    if w is None:
        return torch.ones(model.cfg.d_model)
    w = w.detach().float().cpu()
    return 1.0 + w if model.adapter.norm == "rms1p" else w


@torch.no_grad()
def logit_effects(directions_ND: Tensor, gain_D: Tensor, W_U: Tensor, n: int = 10,
                  chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens most promoted and suppressed by each direction through the unembedding.

    Args:
        directions_ND: ``[n_latents, d_model]`` output directions (units of the residual stream per unit act).
        gain_D: ``[d_model]`` final-norm gain applied elementwise before ``W_U``.
        W_U: ``[d_model, d_vocab]``.
        n: tokens kept each way.

    Returns:
        (up_values, up_ids, down_values, down_ids), each ``[n_latents, n]``; values in logit units per
        unit of activation (before the final norm's scale); down values are the most negative first.
    """
    W = W_U.detach().float().cpu()
    out = [], [], [], []
    for s in range(0, directions_ND.shape[0], chunk):
        logits = (directions_ND[s:s + chunk].float() * gain_D) @ W
        up = logits.topk(n, dim=-1)
        down = logits.topk(n, dim=-1, largest=False)
        for lst, t in zip(out, (up.values, up.indices, down.values, down.indices)):
            lst.append(t)
    return tuple(torch.cat(x) for x in out)


