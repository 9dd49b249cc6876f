"""mechscope.diff: weight deltas, activation differences, token KL, logit-lens KL and cross-model patching
between a tiny base model and a copy perturbed in known places, each checked against a naive computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechscope
from mechscope.diff import (
    activation_diff,
    check_comparable,
    cross_model_patching,
    diff_models,
    logit_lens_diff,
    logprob_metric,
    token_kl,
    weight_deltas,
)
from tests.conftest import make_tiny, make_tokenizer

N_LAYERS = 3
TEXTS = ["w1 w2 w3 w4 w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22",
         "w30 w31 w32 w33 w34 w35"]


def _model(perturb: dict[str, float] | None = None, seed: int = 0, **overrides) -> mechscope.HookedModel:
    """A tiny 3-layer Llama with the word tokenizer; ``perturb`` adds seeded noise of that scale to named parameters."""
    hf = make_tiny("llama", num_hidden_layers=N_LAYERS, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, scale in (perturb or {}).items():
            p = hf.get_parameter(name)
            p.add_(scale * torch.randn(p.shape, generator=g))
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, make_tokenizer(), name="tuned" if perturb else "base")


V1 = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def base():
    return _model()


@pytest.fixture(scope="module")
def tuned():
    return _model({V1: 0.05})


def _rows(model, texts):
    return [torch.tensor(model.tokenizer(t)["input_ids"]) for t in texts]


# -- compat --------------------------------------------------------------------------------------------------
def test_compat_accepts_same_and_refuses_other_architecture(base, tuned):
    check_comparable(base, tuned)
    other = mechscope.HookedModel(make_tiny("llama", num_hidden_layers=2), make_tokenizer())
    with pytest.raises(mechscope.InputError, match="n_layers 3 != 2"):
        check_comparable(base, other)
    wide = mechscope.HookedModel(make_tiny("llama", num_hidden_layers=3, num_key_value_heads=4), make_tokenizer())
    with pytest.raises(mechscope.InputError, match="n_kv_heads"):
        check_comparable(base, wide)
    gpt2 = mechscope.HookedModel(make_tiny("gpt2", n_layer=3), make_tokenizer())
    with pytest.raises(mechscope.InputError, match="model_type llama != gpt2"):
        check_comparable(base, gpt2)


def test_compat_refuses_different_tokenizer(base):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(124)]
    words[10], words[11] = words[11], words[10]  # two words swapped
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    other = mechscope.HookedModel(base.hf, tok)
    with pytest.raises(mechscope.InputError, match="tokenizers differ.*2 vocabulary entries differ"):
        check_comparable(base, other)
    tok2 = make_tokenizer()
    tok2.pad_token = "<eos>"
    with pytest.raises(mechscope.InputError, match="pad: 0 != 2"):
        check_comparable(base, mechscope.HookedModel(base.hf, tok2))


# -- weights -------------------------------------------------------------------------------------------------
def test_weight_deltas_match_naive_loop_and_are_zero_except_planted(base, tuned):
    wd = weight_deltas(base, tuned)
    sb, st = base.hf.state_dict(), tuned.hf.state_dict()
    names = [n for n, _ in base.hf.named_parameters()]
    assert [p.name for p in wd.params] == names
    for p in wd.params:
        d = float((st[p.name].double() - sb[p.name].double()).norm())
        b = float(sb[p.name].double().norm())
        assert p.delta == d and p.base == b and p.relative == d / b
        assert (p.delta > 0) == (p.name == V1)
    assert [p.kind for p in wd.params if p.layer == 1] == ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate",
                                                          "mlp_up", "mlp_down", "ln1", "ln2"]
    v = next(p for p in wd.params if p.name == V1)
    assert wd.by_layer[1]["delta"] == pytest.approx(v.delta, rel=1e-12)
    assert wd.by_layer[0]["delta"] == 0 and wd.by_layer[2]["delta"] == 0
    layer1 = [sb[n].double() for n in names if n.startswith("model.layers.1.")]
    assert wd.by_layer[1]["base"] == pytest.approx(math.sqrt(sum(float(t.norm()) ** 2 for t in layer1)), rel=1e-12)
    assert wd.by_kind["attn_v"]["delta"] == pytest.approx(v.delta, rel=1e-12)
    assert wd.by_kind["mlp_up"]["delta"] == 0 and wd.by_kind["embed"]["delta"] == 0
    assert wd.by_layer_kind[1]["attn_v"]["relative"] == pytest.approx(v.relative, rel=1e-12)
    assert wd.top_layers(1) == [(1, wd.by_layer[1]["relative"])]
    assert [p.name for p in wd.changed()] == [V1]


def test_weight_deltas_count_tied_embeddings_once():
    b = _model(tie_word_embeddings=True)
    t = _model({"model.embed_tokens.weight": 0.01}, tie_word_embeddings=True)
    wd = weight_deltas(b, t)
    names = [p.name for p in wd.params]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    emb = wd.params[names.index("model.embed_tokens.weight")]
    assert emb.tied == ("lm_head.weight",) and emb.kind == "embed" and emb.delta > 0
    assert wd.total["delta"] == pytest.approx(emb.delta, rel=1e-12)


# -- activations ---------------------------------------------------------------------------------------------
def _naive_acts(model, ids):
    """resid_post per layer [L, pos, d] from plain HF hidden states (last layer: the decoder layer's own output,
    since HF's last hidden state is after the final norm) and hook_z [L, pos, H, dh] from o_proj's input."""
    hf = model.hf
    z, last = [], []
    hs = [hf.model.layers[L].self_attn.o_proj.register_forward_pre_hook(lambda m, a: z.append(a[0][0]))
          for L in range(N_LAYERS)]
    hs.append(hf.model.layers[-1].register_forward_hook(lambda m, a, o: last.append((o[0] if isinstance(o, tuple)
                                                                                     else o)[0])))
    try:
        with torch.no_grad():
            out = hf(ids[None], output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    resid = [out.hidden_states[L + 1][0] for L in range(N_LAYERS - 1)] + [last[0]]
    H, dh = model.cfg.n_heads, model.cfg.d_head
    return torch.stack(resid), torch.stack([t.reshape(t.shape[0], H, dh) for t in z])


@pytest.mark.parametrize("skip_first", [True, False])
def test_activation_diff_matches_naive_hf_forward(base, tuned, skip_first):
    k = 3
    res = activation_diff(base, tuned, TEXTS, first_k=k, skip_first=skip_first, batch_size=3, mean_diff=True,
                          progress=False)
    per = {w: {m: {"resid": [], "z": []} for m in ("norm_ratio", "cosine", "rel_diff")} for w in ("first_k", "all")}
    diffs = []
    for ids in _rows(base, TEXTS):  # one text at a time: no padding at all
        rb, zb = _naive_acts(base, ids)
        rt, zt = _naive_acts(tuned, ids)
        s = 1 if skip_first else 0
        for w, sl in (("first_k", slice(s, s + k)), ("all", slice(s, None))):
            for name, (ab, at) in (("resid", (rb[:, sl].double(), rt[:, sl].double())),
                                   ("z", (zb[:, sl].double(), zt[:, sl].double()))):
                nb, nt = ab.norm(dim=-1), at.norm(dim=-1)
                per[w]["norm_ratio"][name].append(nt / nb)
                per[w]["cosine"][name].append(torch.nn.functional.cosine_similarity(ab, at, dim=-1))
                per[w]["rel_diff"][name].append((at - ab).norm(dim=-1) / nb)
        diffs.append((rt[:, s:] - rb[:, s:]).double())
    for w in ("first_k", "all"):
        for m in ("norm_ratio", "cosine", "rel_diff"):
            resid = torch.cat(per[w][m]["resid"], dim=1).mean(1)  # [L]
            z = torch.cat(per[w][m]["z"], dim=1).mean(1)  # [L, H]
            torch.testing.assert_close(res.per_layer(m, w), resid, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res.per_head(m, w), z, rtol=1e-5, atol=1e-6)
    n_all = sum(len(r) - (1 if skip_first else 0) for r in _rows(base, TEXTS))
    assert res.n_tokens["all"] == n_all
    assert res.n_tokens["first_k"] == sum(min(k, len(r) - (1 if skip_first else 0)) for r in _rows(base, TEXTS))
    # layer 0 is untouched; the change starts at layer 1's values (only its v_proj was perturbed)
    assert float(res.per_layer("rel_diff")[0]) == 0 and float(res.per_layer("cosine")[0]) == pytest.approx(1)
    assert float(res.per_layer("rel_diff")[1]) > 0
    assert (res.per_head("rel_diff")[0] == 0).all() and (res.per_head("rel_diff")[1] > 0).all()
    md = torch.cat(diffs, dim=1).mean(1)
    torch.testing.assert_close(res.mean_diff["blocks.1.hook_resid_post"].double(), md[1], rtol=1e-4, atol=1e-6)
    assert res.top_layers(1)[0][0] in (1, 2)
    json.dumps(res.to_dict(), allow_nan=False)


def test_activation_diff_identical_models_is_exactly_zero(base):
    twin = _model()
    res = activation_diff(base, twin, TEXTS, progress=False)
    for w in ("first_k", "all"):
        assert (res.per_layer("rel_diff", w) == 0).all() and (res.per_head("rel_diff", w) == 0).all()
        assert (res.per_layer("norm_ratio", w) == 1).all()


def test_activation_diff_accepts_token_tensor_and_refuses_bad_sites(base, tuned):
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    res = activation_diff(base, tuned, ids, sites="blocks.*.hook_attn_out", progress=False)
    assert res.sites == [f"blocks.{L}.hook_attn_out" for L in range(N_LAYERS)]
    assert res.n_tokens["all"] == 10
    with pytest.raises(mechscope.InputError, match="kv_pos"):
        activation_diff(base, tuned, ids, sites="blocks.0.attn.hook_pattern", progress=False)
    with pytest.raises(mechscope.InputError, match="too short"):
        activation_diff(base, tuned, [[5], [6]], progress=False)


# -- KL ------------------------------------------------------------------------------------------------------
def test_token_kl_matches_naive_torch(base, tuned):
    res = token_kl(base, tuned, TEXTS, top_n=5, batch_size=3, n_boot=200, progress=False)
    per_token, per_text = [], []
    for i, ids in enumerate(_rows(base, TEXTS)):
        with torch.no_grad():
            lb = base.hf(ids[None]).logits[0].double()
            lt = tuned.hf(ids[None]).logits[0].double()
        pt = torch.softmax(lt, -1)
        kl = (pt * (torch.log_softmax(lt, -1) - torch.log_softmax(lb, -1))).sum(-1)
        per_text.append(kl.mean())
        per_token += [(float(kl[p]), i, p) for p in range(len(ids))]
    all_kl = torch.tensor([v for v, _, _ in per_token], dtype=torch.float64)
    assert res.mean == pytest.approx(float(all_kl.mean()), rel=1e-4)
    torch.testing.assert_close(res.per_text, torch.stack(per_text), rtol=1e-4, atol=1e-7)
    assert res.ci is not None and res.ci.low <= res.mean <= res.ci.high and res.ci.n == len(TEXTS)
    best = sorted(per_token, reverse=True)[:5]
    assert [(t["text"], t["position"]) for t in res.top] == [(i, p) for _, i, p in best]
    for t, (v, i, p) in zip(res.top, best):
        assert t["kl"] == pytest.approx(v, rel=1e-4)
        words = TEXTS[i].split()
        assert t["context"].split()[-1] == words[p]
        assert t["next"] == (words[p + 1] if p + 1 < len(words) else None)
        assert len(t["base_top"]) == 3 and t["tuned_top"][0]["prob"] >= t["tuned_top"][1]["prob"]
    json.dumps(res.to_dict(), allow_nan=False)


def test_logit_lens_diff_matches_naive_and_final_layer_equals_token_kl(base, tuned):
    from mechscope.analysis import logit_lens

    res = logit_lens_diff(base, tuned, TEXTS, batch_size=3, top_n=4, progress=False)
    kls = []
    for ids in _rows(base, TEXTS):
        for p in range(len(ids)):
            lb = logit_lens(base, ids[None], position=p).logprobs.double()
            lt = logit_lens(tuned, ids[None], position=p).logprobs.double()
            kls.append((lt.exp() * (lt - lb)).sum(-1))
    torch.testing.assert_close(res.kl, torch.stack(kls).mean(0), rtol=1e-4, atol=1e-7)
    assert float(res.kl[0]) == 0 and float(res.kl[1]) > 0
    kl = token_kl(base, tuned, TEXTS, n_boot=50, progress=False)
    assert float(res.kl[-1]) == pytest.approx(kl.mean, rel=1e-4)
    assert len(res.top_increased) == 4 and res.top_increased[0]["delta_prob"] >= res.top_increased[1]["delta_prob"]
    assert res.top_decreased[0]["delta_prob"] <= 0


def test_identical_models_have_zero_kl(base):
    twin = _model()
    assert token_kl(base, twin, TEXTS, n_boot=50, progress=False).mean == 0
    assert (logit_lens_diff(base, twin, TEXTS, progress=False).kl == 0).all()


# -- cross-model patching ------------------------------------------------------------------------------------
PROMPTS = ["w1 w2 w3 w4 w5", "w7 w8 w9 w10 w11", "w20 w21 w22 w23 w24"]


def test_logprob_metric_matches_log_softmax():
    logits = torch.randn(2, 4, 10)
    m = logprob_metric([3, 7])
    lp = torch.log_softmax(logits[:, -1], -1)
    assert float(m(logits)) == pytest.approx(float((lp[0, 3] + lp[1, 7]) / 2))
    c = logprob_metric(continuation=[[1, 2], [3, 4]])
    lp = torch.log_softmax(logits, -1)
    want = (lp[0, 1, 1] + lp[0, 2, 2] + lp[1, 1, 3] + lp[1, 2, 4]) / 4
    assert float(c(logits)) == pytest.approx(float(want)) and c.position == -3
    p = logprob_metric(continuation=[[1, 2], [3, 4]], prob=True)
    want = (lp[0, 1, 1].exp() + lp[0, 2, 2].exp() + lp[1, 1, 3].exp() + lp[1, 2, 4].exp()) / 4
    assert float(p(logits)) == pytest.approx(float(want)) and "probability" in p.name
    lp = torch.log_softmax(logits[:, -1], -1)
    assert float(logprob_metric([3, 7], prob=True)(logits)) == pytest.approx(float((lp[0, 3].exp() + lp[1, 7].exp()) / 2))
    with pytest.raises(mechscope.InputError):
        logprob_metric()


def test_cross_patching_identical_models_changes_nothing(base):
    twin = _model()
    metric = logprob_metric(5)
    for per, kinds in (("layer", ["resid_pre", "resid_post", "attn_out", "mlp_out", "z"]), ("head", ["z"])):
        res = cross_model_patching(base, twin, PROMPTS, metric, per=per, kinds=kinds, progress=False)
        assert res.gap == 0
        for k in kinds:
            assert (res.effect(k) == 0).all()
            assert res.recovered(k).isnan().all()
        json.dumps(mechscope.core.io.jsonable(res.to_dict()), allow_nan=False)


def test_cross_patching_localises_the_change():
    # layers 1 and 2 changed, layer 0 and everything outside the layers untouched
    b = _model()
    t = _model({V1: 0.3, "model.layers.2.mlp.down_proj.weight": 0.3})
    metric = logprob_metric([9, 10, 11])
    res = cross_model_patching(b, t, PROMPTS, metric, kinds=["resid_pre", "resid_post", "attn_out", "mlp_out"],
                               progress=False)
    assert res.gap != 0
    rec = {k: res.recovered(k) for k in res.patched}
    # nothing before layer 1 differs: patching there is a no-op
    assert float(rec["resid_pre"][0]) == 0 and float(rec["resid_pre"][1]) == 0 and float(rec["resid_post"][0]) == 0
    assert float(rec["attn_out"][0]) == 0 and float(rec["mlp_out"][0]) == 0
    # the final residual stream carries the whole change
    assert float(rec["resid_post"][-1]) == pytest.approx(1.0, abs=1e-5)
    # the residual entering layer 2 carries layer 1's change but not layer 2's: a partial recovery
    r = float(rec["resid_pre"][2])
    assert 0 < abs(r) and abs(r - 1) > 1e-3
    # naive check of one variant: patch base's layer-2 resid_pre into the tuned model with a plain hook
    ids = b.to_tokens(PROMPTS)
    with torch.no_grad():
        src = b.hf(ids, output_hidden_states=True).hidden_states[2]
        h = t.hf.model.layers[2].register_forward_pre_hook(lambda m, a, kw: ((src, *a[1:]), kw) if a else
                                                           (a, {**kw, "hidden_states": src}), with_kwargs=True)
        try:
            logits = t.hf(ids).logits
        finally:
            h.remove()
    assert float(res.patched["resid_pre"][2]) == pytest.approx(float(metric(logits)), abs=1e-5)
    assert float(res.effect("resid_pre")[2]) == pytest.approx(res.tuned_value - float(metric(logits)), abs=1e-5)
    heads = cross_model_patching(b, t, PROMPTS, metric, per="head", progress=False)
    assert heads.patched["z"].shape == (N_LAYERS, 4)
    assert (heads.effect("z")[0] == 0).all() and (heads.effect("z")[1] != 0).all()  # v_proj of layer 1 feeds z_1


def test_cross_patching_refuses_bad_arguments(base, tuned):
    with pytest.raises(mechscope.InputError, match="per='head'"):
        cross_model_patching(base, tuned, PROMPTS, logprob_metric(5), per="head", kinds=["mlp_out"])
    with pytest.raises(mechscope.InputError, match="unknown kind"):
        cross_model_patching(base, tuned, PROMPTS, logprob_metric(5), kinds=["resid"])
    with pytest.raises(mechscope.InputError, match="different lengths"):
        cross_model_patching(base, tuned, ["w1 w2", "w3"], logprob_metric(5))


# -- diff_models and the CLI ---------------------------------------------------------------------------------
def test_diff_models_runs_all_parts_and_saves_json(base, tuned, tmp_path):
    res = diff_models(base, tuned, TEXTS, prompts=PROMPTS, metric=logprob_metric(5), n_boot=50, progress=False)
    assert res.weights.top_layers(1)[0][0] == 1
    assert res.patching is not None and set(res.patching.patched) == {"resid_pre", "attn_out", "mlp_out"}
    path = res.save(tmp_path)
    d = json.loads(path.read_text())
    assert path.name == "diff.json" and d["base"] == "base" and d["tuned"] == "tuned"
    assert set(d) >= {"weights", "activations", "kl", "logit_lens", "patching", "seconds", "settings"}
    assert d["kl"]["mean"] > 0 and len(d["logit_lens"]["kl"]) == N_LAYERS
    assert json.loads(res.to_json()) == d
    with pytest.raises(mechscope.InputError, match="both prompts= and metric="):
        diff_models(base, tuned, TEXTS, prompts=PROMPTS)
    other = mechscope.HookedModel(make_tiny("llama", num_hidden_layers=2), make_tokenizer())
    with pytest.raises(mechscope.InputError, match="architecture"):
        diff_models(base, other, TEXTS)


def saved_pair(tmp_path):
    """Two saved tiny model folders (base, tuned) that differ only in layer 1's up_proj (+0.05)."""
    from transformers import AutoModelForCausalLM

    from tests.unit.test_cli import _save_tiny_llama

    b = _save_tiny_llama(tmp_path / "base", make_tokenizer())
    t = _save_tiny_llama(tmp_path / "tuned", make_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(t)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight.add_(0.05)
    hf.save_pretrained(t)
    return b, t


def test_cli_diff_writes_json(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app

    b, t = saved_pair(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 2) + "\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["diff", str(b), str(t), "--texts", str(texts), "--split-lines", "--n", "6",
                                 "--out", str(out), "--threads", "1", "--n-boot", "50"], terminal_width=200)
    assert r.exit_code == 0, r.output
    d = json.loads((out / "diff.json").read_text())
    assert d["n_texts"] == 6
    assert [p["name"] for p in d["weights"]["params"] if p["delta"]] == ["model.layers.1.mlp.up_proj.weight"]
    assert "layer 1" in r.output or "L1" in r.output
    assert "mean KL" in r.output
    r = CliRunner().invoke(app, ["diff", str(b), str(tmp_path / "missing"), "--texts", str(texts), "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
