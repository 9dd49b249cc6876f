"""The induction toy's model: a two-layer attention-only transformer built from a real ``transformers``
architecture (GPT-2, GPT-2 with shortformer positions, or a rotary Llama) and wrapped as a HookedModel."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.toys.common import seed_everything
from mechscope.toys.induction_config import _check_device

if TYPE_CHECKING:
    from mechscope.toys.induction_config import InductionConfig


def sinusoidal_positions(n: int, d: int) -> Float[Tensor, "n d"]:
    """The fixed position code of Vaswani et al. 2017: row t holds sin(t / 10000^(2i/d)) in column 2i and
    cos(t / 10000^(2i/d)) in column 2i + 1 (float32; ``d`` even)."""
    t = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    out = torch.empty(n, d, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(t * freq), torch.cos(t * freq)
    return out.float()


class PositionalQK(nn.Module):
    """GPT-2's fused q/k/v projection (``attn.c_attn``, a Conv1D) with position-infused attention (Press et al.
    2021, "Shortformer"): fixed sinusoidal positions are added to the attention's input for the queries and
    keys only, so q = (x + p) W_Q + b_Q, k = (x + p) W_K + b_K and v = x W_V + b_V for the layer-normalised
    residual x; the residual stream carries no position. Positions are 0..pos-1 of each row (no padding,
    no KV cache).

    Args:
        proj: the block's Conv1D, weight [d_model, 3 d_model]. n_positions: rows of the position table.
    """

    def __init__(self, proj: nn.Module, n_positions: int):
        super().__init__()
        self.proj = proj
        d = proj.weight.shape[0]
        self.register_buffer("pos", sinusoidal_positions(n_positions, d).to(proj.weight.device), persistent=False)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos three_d_model"]:
        n, d = x.shape[-2], self.pos.shape[1]
        qk = self.pos[:n].to(x.dtype) @ self.proj.weight[:, :2 * d]
        return self.proj(x) + F.pad(qk, (0, d))


def build_model(cfg: InductionConfig):
    """A ``cfg.n_layers``-layer attention-only transformer as a HookedModel (seeded by ``cfg.seed``): a GPT-2
    (``positions="learned"``), a GPT-2 with shortformer positions (``"shortformer"``: GPT-2's position table
    is fixed at zero, so the residual stream carries tokens only, and each block's q/k projection adds
    fixed sinusoidal positions, :class:`PositionalQK`) or a Llama (``"rotary"``), whose MLPs write exactly
    zero and are frozen."""
    import mechscope

    seed_everything(cfg.seed)
    if cfg.positions == "rotary":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=1, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.context_len,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None))
        blocks = hf.model.layers
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab, n_positions=cfg.context_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0))
        blocks = hf.transformer.h
        if cfg.positions == "shortformer":
            wpe = hf.transformer.wpe
            wpe.weight.data.zero_()
            wpe.weight.requires_grad_(False)
            for block in blocks:
                block.attn.c_attn = PositionalQK(block.attn.c_attn, cfg.context_len)
    for block in blocks:  # attention only: the MLP writes exactly zero
        for prm in block.mlp.parameters():
            prm.data.zero_()
            prm.requires_grad_(False)
    name = f"attn-only-{cfg.n_layers}L" + ("" if cfg.positions == "learned" else f"-{cfg.positions}")
    return mechscope.HookedModel(hf.to(_check_device(cfg.device)), name=name)
