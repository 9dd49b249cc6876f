"""Agreement with the peer libraries on the default real model (SmolLM2-135M-Instruct, fp32).

The same weights are wrapped three ways and fed identical token ids (BOS id 1 written into the ids by
hand, so nobody adds or drops one):

- mechscope: ``mechscope.load()`` as a user gets it (sdpa attention, through mechscope's pass-through);
- TransformerLens 3.9 (SAELens 6.54 needs TL < 4; 3.9 has the same bridge) ``TransformerBridge.boot_transformers(..., hf_model=copy)`` on a separate copy
  (the bridge switches the model it is given to eager attention, and its compatibility mode would
  edit the weights in place, so it never sees mechscope's model);
- nnsight 0.8.1 ``TransformersModel(copy, tokenizer=tok)`` (``LanguageModel`` is its deprecated
  alias) on another copy in eager attention, saving inputs and outputs of the HF modules.

Tolerance. A value agrees when ``max|ours - theirs| <= 1e-4 * max(1, max|theirs|)``: 1e-4 absolute
for sites of order one, 1e-4 of the largest magnitude elsewhere. A flat 1e-4 cannot hold across
different kernels: SmolLM2's residual stream reaches ~2.5e4 on BOS, where fp32 spacing is 2e-3.
Measured worst cases (2 x 14 tokens, 30 layers): TransformerLens 6e-6 of scale (it computes attention
itself, eager vs our sdpa); nnsight 1e-3 absolute on resid_post (~2 ulp at 4.4e3), 0 where mechscope
wraps the very model nnsight traces (``test_bit_identical_to_nnsight_on_the_same_model``).

Where definitions differ, and how each site is compared:

============================  =====================================  =======================================
mechscope                     TransformerLens bridge                 nnsight (HF module values)
============================  =====================================  =======================================
hook_embed                    hook_embed                             model.embed_tokens.output
blocks.L.hook_resid_pre       blocks.L.hook_resid_pre                model.layers[L].input
blocks.L.ln1.hook_normalized  blocks.L.ln1.hook_out (1)              layers[L].input_layernorm.output
blocks.L.attn.hook_q          blocks.L.attn.hook_rot_q (2)           RoPE(q_proj.output) (3)
blocks.L.attn.hook_k          blocks.L.attn.hook_rot_k (2)           RoPE(k_proj.output) (3)
blocks.L.attn.hook_v          blocks.L.attn.hook_v (4)               v_proj.output, split into kv heads
blocks.L.attn.hook_attn_scores blocks.L.attn.hook_attn_scores (5)    -- (eager returns only the pattern)
blocks.L.attn.hook_pattern    blocks.L.attn.hook_pattern             self_attn.output[1]
blocks.L.attn.hook_z          blocks.L.attn.hook_z                   o_proj.input, split into heads
blocks.L.attn.hook_result     blocks.L.attn.hook_result (6)          --
blocks.L.hook_attn_out        blocks.L.hook_attn_out                 self_attn.output[0]
blocks.L.hook_resid_mid       blocks.L.hook_resid_mid                post_attention_layernorm.input
blocks.L.ln2.hook_normalized  blocks.L.ln2.hook_out (1)              post_attention_layernorm.output
blocks.L.mlp.hook_pre         blocks.L.mlp.hook_pre                  mlp.gate_proj.output
blocks.L.mlp.hook_pre_linear  blocks.L.mlp.hook_pre_linear           mlp.up_proj.output
blocks.L.mlp.hook_post        blocks.L.mlp.hook_post                 mlp.down_proj.input
blocks.L.hook_mlp_out         blocks.L.hook_mlp_out                  mlp.output
blocks.L.hook_resid_post      blocks.L.hook_resid_post               model.layers[L].output
ln_final.hook_normalized      ln_final.hook_out (1)                  model.norm.output
logits                        run_with_cache output                  output.logits
============================  =====================================  =======================================

(1) TransformerLens's ``hook_normalized`` is the RMS-normalised input *before* the norm's weight
    (HookedTransformer folds that weight into the next matrices); ours is the norm module's output,
    weight applied, which the bridge calls ``hook_out``. ``test_transformer_lens_normalized_is_before_the_weight``
    checks the relation ``ours == theirs * weight``.
(2) Our ``hook_q``/``hook_k`` are after RoPE (what attention uses); TransformerLens's ``hook_q``/``hook_k``
    are before it and ``hook_rot_q``/``hook_rot_k`` after.
(3) nnsight sees projections only; RoPE is applied with transformers' own ``apply_rotary_pos_emb`` and the
    cos/sin that ``model.rotary_emb`` produced in the same trace.
(4) GQA: ours keeps the 3 native kv heads; the bridge does too on this model. ``_match_heads`` repeats our
    kv heads should a peer expand them to 9 query heads.
(5) Masked entries: ours are -inf, the bridge's are the dtype's most negative finite number; unmasked
    entries are compared, and both must mask the same set.
(6) The bridge computes ``hook_result`` only after ``set_use_attn_result(True)``.
"""

from __future__ import annotations

import pytest
import torch

tl_bridge = pytest.importorskip("transformer_lens.model_bridge", reason="peers extra not installed")
nnsight = pytest.importorskip("nnsight", reason="peers extra not installed")

import mechscope  # noqa: E402
from mechscope.models.loading import DEFAULT_MODEL, cache_dir  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.peers]

TOL = 1e-4
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "When Mary and John went to the store, John gave a drink to",
]

#: per-layer templates compared with each peer (see the module docstring's table)
TL_SITES = {
    "hook_resid_pre": "hook_resid_pre",
    "ln1.hook_normalized": "ln1.hook_out",
    "attn.hook_q": "attn.hook_rot_q",
    "attn.hook_k": "attn.hook_rot_k",
    "attn.hook_v": "attn.hook_v",
    "attn.hook_attn_scores": "attn.hook_attn_scores",
    "attn.hook_pattern": "attn.hook_pattern",
    "attn.hook_z": "attn.hook_z",
    "attn.hook_result": "attn.hook_result",
    "hook_attn_out": "hook_attn_out",
    "hook_resid_mid": "hook_resid_mid",
    "ln2.hook_normalized": "ln2.hook_out",
    "mlp.hook_pre": "mlp.hook_pre",
    "mlp.hook_pre_linear": "mlp.hook_pre_linear",
    "mlp.hook_post": "mlp.hook_post",
    "hook_mlp_out": "hook_mlp_out",
    "hook_resid_post": "hook_resid_post",
}
TL_GLOBAL = {"hook_embed": "hook_embed", "ln_final.hook_normalized": "ln_final.hook_out"}
GLOBAL_SITES = list(TL_GLOBAL)
NN_SITES = [
    "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
    "attn.hook_pattern", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre",
    "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]
#: sites nnsight reads straight off a module (no arithmetic on our side or theirs)
NN_MODULE_SITES = [s for s in NN_SITES if s not in ("attn.hook_q", "attn.hook_k")]


def _fresh_copy(folder):
    """A separate HF copy of the same weights, in eager attention (what the peers need for patterns)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf.eval()


def _nnsight_model(hf, tok):
    try:
        from nnsight import TransformersModel
    except ImportError:  # older nnsight
        from nnsight import LanguageModel

        return LanguageModel(hf, tokenizer=tok)
    return TransformersModel(hf, tokenizer=tok, task="text-generation")


def _nnsight_values(lm, tokens: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """Save the HF module values behind each canonical site, in forward order (nnsight requires it)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, P = tokens.shape
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    raw: dict[str, object] = {}
    with torch.no_grad(), lm.trace(tokens):
        raw["hook_embed"] = lm.model.embed_tokens.output.save()
        raw["rope"] = lm.model.rotary_emb.output.save()
        for L in range(cfg.n_layers):
            layer, b = lm.model.layers[L], f"blocks.{L}."
            attn, mlp = layer.self_attn, layer.mlp
            raw[b + "hook_resid_pre"] = layer.input.save()
            raw[b + "ln1.hook_normalized"] = layer.input_layernorm.output.save()
            raw[b + "q"] = attn.q_proj.output.save()
            raw[b + "k"] = attn.k_proj.output.save()
            raw[b + "attn.hook_v"] = attn.v_proj.output.save()
            raw[b + "attn.hook_z"] = attn.o_proj.input.save()
            raw[b + "attn"] = attn.output.save()
            raw[b + "hook_resid_mid"] = layer.post_attention_layernorm.input.save()
            raw[b + "ln2.hook_normalized"] = layer.post_attention_layernorm.output.save()
            raw[b + "mlp.hook_pre"] = mlp.gate_proj.output.save()
            raw[b + "mlp.hook_pre_linear"] = mlp.up_proj.output.save()
            raw[b + "mlp.hook_post"] = mlp.down_proj.input.save()
            raw[b + "hook_mlp_out"] = mlp.output.save()
            raw[b + "hook_resid_post"] = layer.output.save()
        raw["ln_final.hook_normalized"] = lm.model.norm.output.save()
        raw["logits"] = lm.output.save()
    out = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    out["logits"] = raw["logits"].logits
    cos, sin = raw["rope"]
    for L in range(cfg.n_layers):
        b = f"blocks.{L}."
        q = out.pop(b + "q").view(B, P, H, D).transpose(1, 2)
        k = out.pop(b + "k").view(B, P, KV, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[b + "attn.hook_q"], out[b + "attn.hook_k"] = q.transpose(1, 2), k.transpose(1, 2)
        out[b + "attn.hook_v"] = out[b + "attn.hook_v"].view(B, P, KV, D)
        out[b + "attn.hook_z"] = out[b + "attn.hook_z"].view(B, P, H, D)
        attn_out, pattern = raw[b + "attn"]
        out[b + "hook_attn_out"], out[b + "attn.hook_pattern"] = attn_out, pattern
    return out


@pytest.fixture(scope="module")
def peers(real_model):
    """Everything the tests compare: one run of each library on the same token ids."""
    from transformer_lens.model_bridge import TransformerBridge

    m = real_model
    folder = cache_dir() / "models" / DEFAULT_MODEL
    tok = m.tokenizer
    ids = [[1] + tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    n = min(map(len, ids))
    tokens = torch.tensor([r[:n] for r in ids])

    logits, cache = m.run(tokens, cache="*")

    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=_fresh_copy(folder), tokenizer=tok, device="cpu")
    bridge.set_use_attn_result(True)
    wanted = {f"blocks.{L}.{t}" for L in range(m.cfg.n_layers) for t in TL_SITES.values()} | set(TL_GLOBAL.values())
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    tl = {name: tl_cache[name] for name in wanted}
    tl["logits"] = tl_logits
    ln_w = {L: bridge.blocks[L].ln1.original_component.weight.detach().clone() for L in (0, m.cfg.n_layers - 1)}
    with torch.no_grad():
        _, tl_norm = bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("ln1.hook_normalized"))
    tl_normalized = {L: tl_norm[f"blocks.{L}.ln1.hook_normalized"] for L in ln_w}
    del bridge, tl_cache, tl_norm

    nn_hf = _fresh_copy(folder)
    lm = _nnsight_model(nn_hf, tok)
    nn = _nnsight_values(lm, tokens, m.cfg)
    # mechscope on the very model nnsight traces: same modules, same kernels
    same = mechscope.HookedModel(nn_hf, tok)
    same_logits, same_cache = same.run(tokens, cache="*")
    return dict(tokens=tokens, logits=logits, cache=cache, tl=tl, nn=nn, ln_w=ln_w, tl_normalized=tl_normalized,
                same_logits=same_logits, same_cache=same_cache, n_layers=m.cfg.n_layers, cfg=m.cfg)


def _match_heads(ours: torch.Tensor, theirs: torch.Tensor, head_axis: int) -> torch.Tensor:
    """Repeat our native kv heads when a peer expands GQA keys/values to one per query head."""
    if ours.shape != theirs.shape and ours.dim() == theirs.dim():
        groups = theirs.shape[head_axis] // ours.shape[head_axis]
        if groups > 1 and groups * ours.shape[head_axis] == theirs.shape[head_axis]:
            return ours.repeat_interleave(groups, dim=head_axis)
    return ours


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= TOL * scale, f"{what}: max abs diff {err:.3g} exceeds {TOL} x max(1, {scale:.3g})"


def _compare(name: str, ours: torch.Tensor, theirs: torch.Tensor, peer: str) -> None:
    if name.endswith(("attn.hook_k", "attn.hook_v")):
        ours = _match_heads(ours, theirs, head_axis=2)
    if name.endswith("hook_attn_scores"):
        masked = torch.isneginf(ours)
        assert (theirs[masked] < -1e30).all(), f"{name}: {peer} does not mask where mechscope does"
        assert torch.isfinite(ours[theirs > -1e30]).all(), f"{name}: mechscope masks where {peer} does not"
        ours, theirs = ours[~masked], theirs[~masked]
    _assert_close(ours, theirs.to(ours.dtype), f"{name} vs {peer}")


def test_identical_token_ids_reach_every_model(peers):
    tokens = peers["tokens"]
    assert tokens[:, 0].eq(1).all()
    for peer in ("tl", "nn"):
        assert peers[peer]["logits"].shape[:2] == tokens.shape, f"{peer} added or dropped tokens"


def test_logits_agree(peers):
    _compare("logits", peers["logits"], peers["tl"]["logits"], "TransformerLens")
    _compare("logits", peers["logits"], peers["nn"]["logits"], "nnsight")


@pytest.mark.parametrize("template", list(TL_SITES) + list(TL_GLOBAL))
def test_sites_agree_with_transformer_lens(peers, template):
    if template in TL_GLOBAL:
        pairs = [(template, TL_GLOBAL[template])]
    else:
        pairs = [(f"blocks.{L}.{template}", f"blocks.{L}.{TL_SITES[template]}") for L in range(peers["n_layers"])]
    for ours, theirs in pairs:
        _compare(ours, peers["cache"][ours], peers["tl"][theirs], "TransformerLens")


@pytest.mark.parametrize("template", NN_SITES + GLOBAL_SITES)
def test_sites_agree_with_nnsight(peers, template):
    names = [template] if template in GLOBAL_SITES else [f"blocks.{L}.{template}" for L in range(peers["n_layers"])]
    for name in names:
        _compare(name, peers["cache"][name], peers["nn"][name], "nnsight")


def test_bit_identical_to_nnsight_on_the_same_model(peers):
    """Same HF modules, same kernels: mechscope records exactly what nnsight reads off the modules."""
    cache, nn = peers["same_cache"], peers["nn"]
    assert torch.equal(peers["same_logits"], nn["logits"])
    names = ["hook_embed", "ln_final.hook_normalized"] + [
        f"blocks.{L}.{t}" for L in range(peers["n_layers"]) for t in NN_MODULE_SITES]
    unequal = [n for n in names if not torch.equal(cache[n], nn[n])]
    assert not unequal, f"not bit-identical: {unequal[:5]}"
    for L in range(peers["n_layers"]):  # q, k went through RoPE on our side of the comparison
        for t in ("attn.hook_q", "attn.hook_k"):
            _compare(f"blocks.{L}.{t}", cache[f"blocks.{L}.{t}"], nn[f"blocks.{L}.{t}"], "nnsight")


def test_transformer_lens_normalized_is_before_the_weight(peers):
    """Footnote (1): TL's ln1.hook_normalized times the norm weight is our ln1.hook_normalized."""
    for L, w in peers["ln_w"].items():
        name = f"blocks.{L}.ln1.hook_normalized"
        _assert_close(peers["cache"][name], peers["tl_normalized"][L] * w, f"{name} vs TL hook_normalized * w")
