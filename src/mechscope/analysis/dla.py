"""Direct logit attribution: split a logit difference into the parts each component writes directly.

Shape suffixes on locals: B batch, L n_layers, H n_heads, K d_head, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.analysis._norm import freeze_norm, softcap
from mechscope.analysis.metrics import _check_answers
from mechscope.core.errors import InputError


@dataclass(frozen=True)
class DLAResult:
    """Direct contributions to ``logit(correct) - logit(wrong)`` (natural-log units, float32, CPU).

    Attributes:
        embed: [batch] token embedding (plus the learned position embedding, GPT-2).
        attn: [batch, n_layers] whole attention branch of each layer (its heads plus the constant
            part: b_O, through the frozen post-attention norm where there is one).
        heads: [batch, n_layers, n_heads] each head's ``z_h @ W_O[h]`` (``attn - heads.sum(-1)`` is
            the constant part of the branch).
        mlp: [batch, n_layers] MLP branch of each layer.
        bias: [batch] constant terms after the residual stream: final-norm bias and unembedding bias.
        logit_diff: [batch] the real logit difference from the model's logits (pre-soft-cap logits
            for models with a final logit soft-cap, Gemma 2).
    """

    embed: Tensor
    attn: Tensor
    heads: Tensor
    mlp: Tensor
    bias: Tensor
    logit_diff: Tensor

    def total(self) -> Tensor:
        """Sum of all parts, [batch]: equals ``logit_diff`` up to float rounding."""
        return self.embed + self.attn.sum(-1) + self.mlp.sum(-1) + self.bias


def direct_logit_attribution(
    model,
    inputs: str | list[str] | Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"],
    *,
    position: int = -1,
) -> DLAResult:
    """Decompose ``logit(correct) - logit(wrong)`` at ``position`` into direct contributions.

    The final residual stream is the sum of the embedding (plus GPT-2's position embedding), every
    layer's attention and MLP branch (``hook_attn_out``, ``hook_mlp_out``). The final norm is made
    linear by freezing its scale (1 / RMS, or 1 / std for LayerNorm) at the value computed on the real
    residual stream; each part is then centred (LayerNorm), scaled, and projected on
    ``W_U[:, correct] - W_U[:, wrong]``. Its bias and the unembedding bias form ``bias``.

    Per-head parts are ``z_h @ W_O[h]`` of ``blocks.L.attn.hook_z``. Where the attention output passes
    a norm before joining the residual stream (Gemma 2/3's post-attention norm), that norm's scale is
    frozen too, at its value on the real output projection, so the heads stay additive and sum (with the
    constant part) to ``hook_attn_out``.

    For a model with a final logit soft-cap (Gemma 2) the decomposed quantity is the pre-soft-cap
    logit difference, and ``logit_diff`` reports that one.

    The frozen scales make this a *direct* attribution: it ignores how a part changes the norm's scale
    and every indirect path through later layers.

    Args:
        model: a HookedModel.
        inputs: text, equal-length texts, or token ids [batch, pos].
        answer_tokens: [batch, 2] token ids (correct, wrong); a single pair [2] for one prompt.
        position: position whose prediction is decomposed (-1: the last).

    Returns:
        DLAResult; ``result.total()`` equals ``result.logit_diff`` (float32 rounding).

    Raises:
        InputError: a position outside the prompt; bad inputs (see ``HookedModel.run``).
        ShapeError: answer_tokens not [batch, 2] integers matching the batch.
        MechscopeError: the adapter's norm flavour does not reproduce the model's norm (never silent).

    References:
        Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", section "Residual stream";
        Wang et al. 2022 (IOI), section 3.1 (direct logit attribution of heads).
    """
    tokens = model._tokens(inputs, None)
    batch, n_pos = tokens.shape
    if not -n_pos <= position < n_pos:
        raise InputError(f"position {position} is outside the prompt of {n_pos} tokens.")
    answers = _check_answers(answer_tokens, batch).to(tokens.device)
    cfg, a = model.cfg, model.adapter
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    sites = ["hook_embed", "blocks.*.attn.hook_z", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out", last,
             "ln_final.hook_normalized"]
    if a.pos_embed is not None:
        sites.append("hook_pos_embed")
    keep = n_pos - position if position >= 0 else -position
    logits, cache = model.run(tokens, cache=sites, cache_positions=position, logits_to_keep=keep)

    with torch.no_grad():
        resid_BD = cache[last]
        final = freeze_norm(model, model.module(a.final_norm), resid_BD, expected=cache["ln_final.hook_normalized"])
        W_U = model.W_U.detach().float()
        dW_BD = (W_U[:, answers[:, 0]] - W_U[:, answers[:, 1]]).T
        u_BD = final.readout(dW_BD)

        def read(x: Tensor) -> Tensor:  # x [B, ..., D] -> [B, ...]
            u = u_BD.view(batch, *[1] * (x.dim() - 2), -1)
            return (x.float() * u).sum(-1)

        embed_B = read(cache["hook_embed"])
        if a.pos_embed is not None:
            embed_B = embed_B + read(cache["hook_pos_embed"])
        attn_BL = torch.stack([read(cache[f"blocks.{L}.hook_attn_out"]) for L in range(cfg.n_layers)], 1)
        mlp_BL = torch.stack([read(cache[f"blocks.{L}.hook_mlp_out"]) for L in range(cfg.n_layers)], 1)
        heads = []
        for L in range(cfg.n_layers):
            z_BHK = cache[f"blocks.{L}.attn.hook_z"].float()
            W_O = model.W_O(L).detach().float()
            result_BHD = torch.einsum("bhk,hkd->bhd", z_BHK, W_O)
            if a.post_attn_norm:
                b_O = model.b_O(L)
                proj_BD = result_BHD.sum(1) + (b_O.detach().float() if b_O is not None else 0.0)
                post = freeze_norm(model, model.layer_module(L, a.attn_branch), proj_BD,
                                   expected=cache[f"blocks.{L}.hook_attn_out"])
                result_BHD = post.linear(result_BHD.transpose(0, 1)).transpose(0, 1)
            heads.append(read(result_BHD))
        heads_BLH = torch.stack(heads, 1)

        bias_B = torch.zeros(batch, device=u_BD.device)
        if final.bias is not None:
            bias_B = bias_B + dW_BD @ final.bias
        b_U = model.b_U
        if b_U is not None:
            b_U = b_U.detach().float()
            bias_B = bias_B + b_U[answers[:, 0]] - b_U[answers[:, 1]]

        if softcap(model):
            pre = model.module(a.unembed)(cache["ln_final.hook_normalized"].to(model.dtype)).float()
            real_B = pre.gather(1, answers)[:, 0] - pre.gather(1, answers)[:, 1]
        else:
            at = logits[:, -keep].float()
            real_B = at.gather(1, answers)[:, 0] - at.gather(1, answers)[:, 1]

    def out(t: Tensor) -> Tensor:
        return t.detach().float().cpu()

    return DLAResult(embed=out(embed_B), attn=out(attn_BL), heads=out(heads_BLH), mlp=out(mlp_BL),
                     bias=out(bias_B), logit_diff=out(real_B))

