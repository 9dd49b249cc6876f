"""What a model and a dictionary cost, counted from their dimensions alone (no weights loaded).

:class:`ModelDims` holds a causal LM's dimensions, from a loaded :class:`~mechscope.models.HookedModel`, a
transformers config (``AutoConfig``: a local folder, or the hub cache), or the built-in table :data:`KNOWN_CONFIGS`
(so a plan for a model that is not downloaded works offline). The FLOP counts follow Kaplan et al. 2020 (2 FLOP
per parameter per token for a forward) with the attention term of the same paper:

- LM forward, per token, through the first ``L`` blocks of a context of ``T`` tokens:
  ``2 * L * layer_params + 2 * L * T * (n_heads * d_head)``; the unembedding ``2 * d_model * d_vocab`` only for the
  positions whose logits are needed.
- dense dictionary training (relu, jumprelu, batchtopk): ``12 * d * m`` per token (encoder and decoder forward
  ``2dm + 2dm``, backward twice that).
- TopK training with mechscope's sparse decoder (:func:`mechscope.training.losses.compute_loss`):
  ``4 * d * m + 8 * d * k`` per token: the encoder forward ``2dm`` and its weight gradient ``2dm`` (dense: the
  top-k gradient is scattered into ``[B, m]``), the gathered decoder ``2dk`` forward and ``4dk`` backward, and
  the selection, a memory-bound pass over ``[B, m]`` counted in bytes, not FLOP.

References:
    Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1 (forward FLOP per token);
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", appendix D (sparse TopK kernels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mechscope.core.errors import InputError
from mechscope.core.names import axes as site_axes
from mechscope.core.names import parse

#: Configs of models a plan may name without having them on disk (the transformers ``config.json`` keys).
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True),
}
_UNGATED = ("gpt2", "gpt_neox")  # two-matrix MLPs; every other supported family has a gated (3-matrix) MLP


@dataclass(frozen=True)
class ModelDims:
    """A causal LM's dimensions (counts of elements, no units beyond that).

    Attributes:
        name: the model's name as given. n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab.
        gated_mlp: three MLP matrices (gate, up, down) instead of two.
        tied_embeddings: the unembedding shares the embedding's matrix.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelDims":
        """From a transformers config object or a ``config.json`` dict (text config of multimodal models).

        Raises:
            InputError: a config without the keys of a decoder-only LM (names the missing key).
        """
        c = config if isinstance(config, dict) else config.get_text_config().to_dict()
        pick = lambda *keys, default=None: next((c[k] for k in keys if c.get(k) is not None), default)  # noqa: E731
        d = pick("hidden_size", "n_embd", "d_model")
        L = pick("num_hidden_layers", "n_layer", "num_layers")
        h = pick("num_attention_heads", "n_head")
        V = pick("vocab_size")
        for key, v in (("hidden_size", d), ("num_hidden_layers", L), ("num_attention_heads", h), ("vocab_size", V)):
            if v is None:
                raise InputError(f"the config of {name or 'this model'} has no {key}; pass the config of a "
                                 "decoder-only causal LM (its config.json).")
        mt = c.get("model_type", "")
        return cls(name=name or c.get("_name_or_path", "") or mt, n_layers=L, d_model=d, n_heads=h,
                   n_kv_heads=pick("num_key_value_heads", default=h), d_head=pick("head_dim", default=d // h),
                   d_mlp=pick("intermediate_size", "n_inner", default=4 * d), d_vocab=V,
                   gated_mlp=mt not in _UNGATED, tied_embeddings=bool(c.get("tie_word_embeddings", mt == "gpt2")))

    @classmethod
    def from_model(cls, model) -> "ModelDims":
        """From a loaded :class:`~mechscope.models.HookedModel`."""
        c = model.cfg
        return cls(name=c.name, n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                   d_head=c.d_head, d_mlp=c.d_mlp, d_vocab=c.d_vocab, gated_mlp=c.family not in _UNGATED,
                   tied_embeddings=bool(getattr(model.text_config, "tie_word_embeddings", False)))

    # -- parameters ---------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        """Weights of one block (attention Q, K, V, O and the MLP matrices; norms and biases left out)."""
        attn = 2 * self.d_model * self.n_heads * self.d_head + 2 * self.d_model * self.n_kv_heads * self.d_head
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def n_params(self) -> int:
        """Every weight: blocks, embedding, and the unembedding unless tied (norms and biases left out)."""
        emb = self.d_model * self.d_vocab
        return self.n_layers * self.layer_params + emb * (1 if self.tied_embeddings else 2)

    def forward_flop_per_token(self, n_layers: int, context_len: int, logit_positions: float = 0.0) -> int | float:
        """FLOP of one token's forward through the first ``n_layers`` blocks of a ``context_len`` context.

        ``logit_positions``: the fraction of positions whose logits are computed (1: all, ``1 / context_len``:
        one per context, 0: none).
        """
        return (2 * n_layers * self.layer_params + 2 * n_layers * context_len * self.n_heads * self.d_head
                + 2 * self.d_model * self.d_vocab * logit_positions)

    # -- hooks ----------------------------------------------------------------------------------
    def hook_width(self, hook: str) -> int:
        """Values per token at a hook (axes after ``pos`` multiplied out).

        Raises:
            HookNameError: not a hook name; InputError: a layer past the model, or not one row per token.
        """
        _, layer = parse(hook)
        if layer is not None and not 0 <= layer < self.n_layers:
            raise InputError(f"{hook}: layer {layer} does not exist; {self.name} has layers 0..{self.n_layers - 1}.")
        ax = site_axes(hook)
        if ax[:2] not in (("batch", "pos"), ("batch", "kv_pos")):
            raise InputError(f"{hook} has axes [{' '.join(ax)}], not one row per token; plan a per-token site "
                             "such as hook_resid_post, hook_mlp_out, mlp.hook_post or attn.hook_z.")
        sizes = dict(d_model=self.d_model, d_vocab=self.d_vocab, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                     d_head=self.d_head, d_mlp=self.d_mlp)
        return math.prod(sizes[a] for a in ax[2:])

    def layers_run(self, hooks) -> int:
        """Blocks a harvest of ``hooks`` runs (as :func:`mechscope.data.store.stop_layer`)."""
        from mechscope.data.store import stop_layer

        stop = stop_layer(list(hooks), self.n_layers)
        return self.n_layers if stop is None else stop

    def to_dict(self) -> dict:
        return asdict(self)


def model_dims(model) -> ModelDims:
    """Dimensions of ``model``: a HookedModel, a :class:`ModelDims`, a name in :data:`KNOWN_CONFIGS` or the
    built-in aliases, a local folder with ``config.json``, or a hub id whose config is in the local hub cache
    (read with ``AutoConfig``: no weights are loaded).

    Raises:
        ModelLoadError: a name none of those resolve (says how to give the config).
    """
    if isinstance(model, ModelDims):
        return model
    if hasattr(model, "cfg") and hasattr(model, "hf"):
        return ModelDims.from_model(model)
    name = str(model)
    if name in KNOWN_CONFIGS:
        return ModelDims.from_config(KNOWN_CONFIGS[name], name)
    from pathlib import Path

    from mechscope.core.errors import ModelLoadError

    p = Path(name)
    if p.is_file() and p.suffix == ".json":
        import json

        return ModelDims.from_config(json.loads(p.read_text()), name)
    from mechscope.models.loading import hub_offline

    try:
        from transformers import AutoConfig

        try:  # the local folder or hub cache first: a plan should not need the network
            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001
            if p.is_dir() or hub_offline():
                raise
            cfg = AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for a missing config
        raise ModelLoadError(
            f"no config for {name!r}: it is not in the planner's table ({', '.join(KNOWN_CONFIGS)}), not a folder "
            f"with config.json, and not in the local hub cache ({type(e).__name__}). Fix: pass a folder or a "
            "config.json file, or download the config (huggingface-cli download <id> config.json).") from e
    return ModelDims.from_config(cfg, name)


def dictionary_params(d_in: int, d_sae: int, d_out: int | None = None, *, skip: bool = False,
                      threshold: bool = False) -> int:
    """Parameters of a dictionary: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` (+ ``W_skip``, + a threshold
    parameter: JumpReLU's; BatchTopK's threshold is a buffer, see :func:`shard_state`)."""
    d_out = d_in if d_out is None else d_out
    return d_in * d_sae + d_sae * d_out + d_sae + d_out + (d_in * d_out if skip else 0) + (d_sae if threshold else 0)


@dataclass(frozen=True)
class ShardState:
    """One rank's share of a dictionary under latent sharding over ``tp`` ranks (:mod:`mechscope.training.
    tensor_parallel`): ``W_enc``, ``b_enc``, ``W_dec`` and JumpReLU's threshold split on the latent axis, ``b_dec``
    and ``W_skip`` replicated.

    Attributes:
        params: parameters this rank holds (each with a gradient and two Adam moments).
        buffer_bytes: fp32 buffers without gradient or Adam state (BatchTopK's inference threshold).
        d_sae: latents on this rank.
    """

    params: int
    buffer_bytes: int
    d_sae: int

    @property
    def state_bytes(self) -> int:
        """fp32 parameters, gradients and two Adam moments (16 B per parameter) plus the buffers."""
        return 16 * self.params + self.buffer_bytes

    @property
    def checkpoint_bytes(self) -> int:
        """A checkpoint's tensors: parameters and Adam moments (12 B per parameter), buffers, and the int64
        dead-latent counters (8 B per latent); safetensors headers left out."""
        return 12 * self.params + self.buffer_bytes + 8 * self.d_sae


def shard_state(d_in: int, d_sae: int, architecture: str, d_out: int | None = None, *, skip: bool = False,
                tp: int = 1) -> ShardState:
    """What one of ``tp`` latent shards of a dictionary holds (``tp=1``: the whole dictionary).

    Raises:
        InputError: ``tp`` does not divide ``d_sae``.
    """
    if d_sae % tp:
        raise InputError(f"tp={tp} must divide every width (latents split evenly), not {d_sae}.")
    d_out = d_in if d_out is None else d_out
    m = d_sae // tp
    params = d_in * m + m + m * d_out + (m if architecture == "jumprelu" else 0) + d_out + (d_in * d_out if skip else 0)
    return ShardState(params, 4 * m if architecture == "batchtopk" else 0, m)


#: fp32 ``[rows, d_sae]`` tensors alive at the peak of one training step, by architecture (pre-activations,
#: activations, masks and their gradients; TopK's sparse decoder needs fewer), counted on CPU with torch 2.x and a
#: fixed mmap threshold at 512 and 2048 rows (``bench/planner.py`` checks the whole prediction). A step also
#: holds one parameter-sized temporary (Adam's denominator).
STEP_BATCH_TENSORS = {"topk": 2.3, "relu": 5.0, "jumprelu": 6.7, "batchtopk": 6.4}


def train_flop_per_token(d_in: int, d_sae: int, architecture: str, k: int | None = None) -> int | float:
    """FLOP per training token of one dictionary (module docstring: dense ``12dm``, TopK ``4dm + 8dk``)."""
    if architecture == "topk":
        return 4 * d_in * d_sae + 8 * d_in * (k or 0)
    return 12 * d_in * d_sae


def selection_bytes_per_token(d_sae: int, architecture: str, value_bytes: int) -> int | float:
    """Memory traffic per token of TopK's selection that no matmul does: read ``[B, m]`` pre-activations for
    ``topk``, zero-fill and scatter the gradient back into ``[B, m]`` (3 passes; 0 for dense architectures,
    whose elementwise passes ride along with their matmuls in the 12dm count)."""
    return 3 * d_sae * value_bytes if architecture == "topk" else 0.0
