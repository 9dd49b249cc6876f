"""Declarative architecture adapters: where each canonical hook site lives in a `transformers` model.

An adapter is data, not code: module paths (relative to the model root, or to one decoder layer),
the weight layout of linear maps, the norm flavour, and which canonical sites the family lacks.
The hook runtime (:mod:`mechscope.hooks.runtime`) reads these fields; no family-specific branches
live anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechscope.core.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its parts. Paths use dots; per-layer paths are relative to one layer.

    Attributes:
        family: short family name shown to users.
        model_types: `config.model_type` values this adapter serves.
        layers: path of the ModuleList of decoder layers.
        embed: token-embedding module.
        pos_embed: learned positional embedding module, or None (rotary models).
        final_norm: final norm module (its output is ``ln_final.hook_normalized``).
        unembed: unembedding (lm_head) module.
        ln1 / ln2: norms whose outputs feed attention / the MLP.
        attn: attention module (its forward receives the normalised residual).
        o_proj: attention output projection; its input is ``hook_z``.
        attn_branch: module whose output is what the attention adds to the residual stream
            (``hook_attn_out``); output may be a tuple, element 0 is used.
        mlp_branch: module whose output the MLP adds to the residual stream (``hook_mlp_out``).
        mlp_in: MLP first projection (its output is ``mlp.hook_pre``).
        mlp_in_linear: up projection of gated MLPs (``mlp.hook_pre_linear``), None if not gated.
        mlp_out_proj: MLP down projection (its input is ``mlp.hook_post``).
        conv1d: True where linear maps store weights as [d_in, d_out] (GPT-2's Conv1D).
        norm: "rms", "rms1p" (RMSNorm with gain 1 + w, Gemma), or "layer" (LayerNorm).
        parallel_attn_config: config attribute that, when true, makes attention and MLP read the
            same residual (GPT-NeoX), so ``hook_resid_mid`` does not exist.
        parallel_attn_default: value used when the config lacks that attribute.
        post_attn_norm: attention output passes through a norm before joining the residual (Gemma 2/3);
            per-head results then sum to the *projection* output, not to ``hook_attn_out``.
        logit_softcap_config: config attribute of a final tanh logit soft-cap, if any.
        qkv: the projection module(s) that read the normalised residual for attention: three paths
            (query, key, value) or one fused module.
        qkv_layout: where each head's columns sit in the projections' outputs: ``"separate"`` (one
            module per q/k/v, heads in order), ``"concat"`` (one module, [q | k | v] blocks, GPT-2), or
            ``"interleaved"`` (one module, [q k v] per head, GPT-NeoX). Circuit discovery recomputes one
            head's query, key or value from its own input by these columns.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    unembed: str
    ln1: str
    ln2: str
    attn: str
    o_proj: str
    attn_branch: str
    mlp_branch: str
    mlp_in: str
    mlp_out_proj: str
    mlp_in_linear: str | None = None
    pos_embed: str | None = None
    conv1d: bool = False
    norm: str = "rms"
    parallel_attn_config: str | None = None
    parallel_attn_default: bool = False
    post_attn_norm: bool = False
    logit_softcap_config: str | None = None
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: str = "separate"
    examples: tuple[str, ...] = field(default=())

    def is_parallel(self, config) -> bool:
        if self.parallel_attn_config is None:
            return False
        return bool(getattr(config, self.parallel_attn_config, self.parallel_attn_default))

    def missing_sites(self, config) -> dict[str, str]:
        """Templates this model lacks -> why, and what to use instead."""
        out = {}
        if self.pos_embed is None:
            out["hook_pos_embed"] = (
                f"{self.family} has no learned positional embedding (positions enter through rotary "
                "embeddings inside attention); use hook_embed or blocks.0.hook_resid_pre."
            )
        if self.mlp_in_linear is None:
            out["blocks.{L}.mlp.hook_pre_linear"] = (
                f"{self.family} has an ungated MLP, so there is no separate linear branch; use mlp.hook_pre."
            )
        if self.is_parallel(config):
            out["blocks.{L}.hook_resid_mid"] = (
                f"this {self.family} model uses parallel attention and MLP ({self.parallel_attn_config}=True): "
                "both read hook_resid_pre, so no residual stream exists between them; use hook_resid_pre "
                "plus hook_attn_out."
            )
        return out


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    attn_branch="self_attn",
    mlp_branch="mlp",
    mlp_in="mlp.gate_proj",
    mlp_in_linear="mlp.up_proj",
    mlp_out_proj="mlp.down_proj",
)

_GEMMA = dict(
    _LLAMA_LIKE,
    ln2="pre_feedforward_layernorm",
    attn_branch="post_attention_layernorm",
    mlp_branch="post_feedforward_layernorm",
    norm="rms1p",
    post_attn_norm=True,
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        examples=("SmolLM2", "Llama 3", "Mistral", "Qwen2", "Qwen3"),
        **_LLAMA_LIKE,
    ),
    Adapter(
        family="gemma2",
        model_types=("gemma2",),
        examples=("Gemma 2",),
        logit_softcap_config="final_logit_softcapping",
        **_GEMMA,
    ),
    Adapter(family="gemma3", model_types=("gemma3_text",), examples=("Gemma 3 1B",),
            logit_softcap_config="final_logit_softcapping", **_GEMMA),
    Adapter(
        family="gemma3",
        model_types=("gemma3",),
        examples=("Gemma 3 4B+ (text tower of the multimodal model)",),
        **dict(_GEMMA, layers="model.language_model.layers", embed="model.language_model.embed_tokens",
               final_norm="model.language_model.norm"),
    ),
    Adapter(
        family="gpt2",
        model_types=("gpt2",),
        examples=("GPT-2",),
        layers="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        ln1="ln_1",
        ln2="ln_2",
        attn="attn",
        o_proj="attn.c_proj",
        attn_branch="attn",
        mlp_branch="mlp",
        mlp_in="mlp.c_fc",
        mlp_out_proj="mlp.c_proj",
        conv1d=True,
        norm="layer",
        qkv=("attn.c_attn",),
        qkv_layout="concat",
    ),
    Adapter(
        family="gpt_neox",
        model_types=("gpt_neox",),
        examples=("Pythia", "GPT-NeoX"),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        attn="attention",
        o_proj="attention.dense",
        attn_branch="attention",
        mlp_branch="mlp",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out_proj="mlp.dense_4h_to_h",
        norm="layer",
        parallel_attn_config="use_parallel_residual",
        parallel_attn_default=True,
        qkv=("attention.query_key_value",),
        qkv_layout="interleaved",
    ),
)


def supported() -> dict[str, tuple[str, ...]]:
    """model_type -> example model names, for error messages and the README."""
    return {t: a.examples for a in ADAPTERS for t in a.model_types}


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config.

    Raises:
        UnsupportedArchitectureError: naming the supported model types.
    """
    model_type = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    names = ", ".join(f"{t} ({', '.join(e)})" if e else t for t, e in supported().items())
    raise UnsupportedArchitectureError(
        f"mechscope has no adapter for model_type {model_type!r} "
        f"({', '.join(getattr(config, 'architectures', None) or [])}). Supported: {names}. "
        "A new family needs only a declarative Adapter in mechscope/models/adapters.py."
    )
