"""Induction heads from scratch (Olsson et al. 2022) at small settings: the attention-only model is a hooked
transformers GPT-2 whose MLPs write exactly zero; trained briefly on repeated sequences it forms a
previous-token head and an induction head (score > 0.5) in a phase change, and ablating either breaks
copying; the pipeline is seeded and renders; the ICL score, the vocabulary map and the phase-change
locator equal hand computations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mechscope
from mechscope.toys.induction import (
    SYNTHETIC, InductionConfig, build_model, icl_score, phase_change, probe_tokens, remap_vocab, repeated_tokens,
    rerun_command, run_induction, text_data, train_bpe,
)

torch.set_num_threads(1)
TINY = InductionConfig(synthetic=True, vocab=32, context_len=33, repeat_len=6, d_model=32, n_heads=2, steps=20,
                       batch=8, warmup=5, eval_every=10, repeat_batch=4)


SMALL = SYNTHETIC


def test_brief_training_on_repeated_sequences_forms_an_induction_circuit():
    """A repeated trigram-language sequence after a filler (lengths drawn per batch, so positions cannot
    find the copy): a previous-token head forms in layer 0 and an induction head in layer 1, in a phase
    change; ablating either role breaks copying."""
    r = run_induction(SMALL, progress=False)
    m = r["metrics"]
    hist, pc, abl = m["history"], m["phase_change"], m["ablation"]
    assert m["peak_induction_score"] > 0.5, pc["induction_curve"]
    assert max(hist["induction"][-1][0]) < 0.1  # layer 0 cannot match prefixes: no induction head there
    assert max(hist["previous_token"][-1][0]) > 0.3  # ... it holds the previous-token heads instead
    assert abl["top_induction_head"][0] == 1 and abl["previous_token_heads"]
    # the phase change: the induction score and the repeated-token loss move in the same window
    i = hist["step"].index(pc["induction"] + SMALL.eval_every / 2)
    assert hist["repeat_loss"][i] < hist["repeat_loss"][i - 1] - 0.5
    none, prev, ind = (abl["cases"][k] for k in ("none", "previous-token heads", "induction heads"))
    assert prev["induction_score"] < 0.5 * none["induction_score"]  # K-composition needs the previous token
    assert ind["repeat_loss"] > none["repeat_loss"] + 1.0 and prev["repeat_loss"] > none["repeat_loss"] + 1.0


def test_shortformer_positions_form_the_same_circuit():
    """With sinusoidal positions in the queries and keys only, the synthetic run still grows the pair:
    a previous-token head in layer 0 whose ablation breaks the layer-1 induction head (measured here:
    peak induction 0.43, previous-token 0.48; ablation 0.43 -> 0.07, repeated-token loss 1.47 -> 4.14)."""
    r = run_induction(dataclasses.replace(SMALL, positions="shortformer"), progress=False)
    m = r["metrics"]
    hist, abl = m["history"], m["ablation"]
    assert m["peak_induction_score"] > 0.35, m["phase_change"]["induction_curve"]
    assert max(hist["induction"][-1][0]) < 0.1 and max(hist["previous_token"][-1][0]) > 0.3
    none, prev, ind = (abl["cases"][k] for k in ("none", "previous-token heads", "induction heads"))
    assert prev["induction_score"] < 0.5 * none["induction_score"]
    assert ind["repeat_loss"] > none["repeat_loss"] + 1.0 and prev["repeat_loss"] > none["repeat_loss"] + 1.0
    assert "shortformer" in r["notes"][0] and "--positions shortformer" in r["command"]


def test_pipeline_runs_end_to_end_and_renders(tmp_path):
    """Train briefly, score checkpoints, locate the phase change, ablate and render. Twenty steps form no
    induction head; this checks the plumbing and that every number is where the page expects it."""
    from mechscope.report.toys import write_toy_report

    r = run_induction(TINY, progress=False)
    m = r["metrics"]
    assert m["history"]["step"] == [0, 10, 20] and len(m["history"]["train_loss"]) == 20
    assert len(m["history"]["induction"][-1]) == 2 and len(m["history"]["induction"][-1][0]) == 2
    abl = m["ablation"]
    assert abl["top_induction_head"][0] == 1 and {"none", "previous-token heads", "induction heads"} <= set(abl["cases"])
    html, _ = write_toy_report(r, tmp_path)
    assert "Induction heads and the phase change" in html.read_text()
    assert {f["id"] for f in r["figures"]} >= {"loss", "heads", "ablation", "pattern"}
    r2 = run_induction(TINY, progress=False)  # seeded: the same numbers again
    assert r2["metrics"]["history"] == m["history"]
    rot = run_induction(dataclasses.replace(TINY, positions="rotary"), progress=False)  # the Llama stack runs too
    assert rot["metrics"]["history"]["step"] == [0, 10, 20] and "--positions rotary" in rot["command"]
    assert "Llama (rotary positions)" in rot["notes"][0]


def test_text_runs_use_a_bpe_trained_on_the_train_split():
    """The tokenizer is a byte-level BPE of ``vocab`` ids trained on the training documents: it encodes any
    text losslessly (no "other" id), id 0 starts every row and separates documents, and the head-score
    probe draws only ids the training rows hold. A brief text run goes end to end and records the command
    that reruns it."""
    from mechscope.data.packing import split_documents
    from mechscope.data.sources import load_documents

    tok = train_bpe(("pydoc",), 300)
    assert len(tok) == 300 and tok.bos_token_id == tok.eos_token_id == 0
    assert all(len(t) == 1 for t in tok.convert_ids_to_tokens(list(range(1, 257))))  # ids 1..256: the bytes
    assert train_bpe(("pydoc",), 300).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # deterministic
    held_out = split_documents(load_documents("pydoc"), "eval")[0] + " naïve ✓ \x07"
    ids = tok(held_out, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == held_out and 0 not in ids  # lossless on unseen text, bytes as fallback
    assert len(ids) < 0.8 * len(held_out.encode())  # merges compress
    cfg = InductionConfig(corpus=("pydoc",), vocab=300, context_len=64, d_model=32, n_heads=4, steps=6, batch=4,
                          eval_every=3, eval_contexts=8, icl_early=10, repeat_len=8, repeat_batch=4, positions="rotary")
    tr, ev, kept = text_data(cfg)
    assert kept == 1.0 and tr.shape[1] == 64 and (tr[:, 0] == 0).all() and ev.shape == (8, 64)
    assert int(tr.max()) < 300
    probe = probe_tokens(cfg, tr)
    seen = set(tr.unique().tolist()) - {0}
    assert (probe[:, 0] == 0).all() and set(probe[:, 1:].unique().tolist()) <= seen
    assert torch.equal(probe[:, 1:9], probe[:, 9:])
    r = run_induction(cfg, progress=False, data=(tr, ev))
    hist = r["metrics"]["history"]
    assert hist["step"] == [0, 3, 6] and all(isinstance(v, float) for v in hist["icl"])
    assert "byte-level BPE trained on the training split of pydoc" in r["notes"][0]
    assert r["comparisons"][0]["note"] == "loss@500 - loss@10 on 8 held-out rows, each averaged over +-5 tokens"
    cases = r["metrics"]["ablation"]["cases"]
    assert r["comparisons"][-1]["quantity"] == "ablating the induction heads: ICL score (nats)"
    assert r["comparisons"][-1]["ours"] == cases["induction heads"]["icl"]
    figs = {f["id"]: f for f in r["figures"]}
    eval_trace = [t for t in figs["loss"]["fig"]["data"] if t["name"] == "held-out loss"]
    assert len(eval_trace) == 1 and eval_trace[0]["y"] == hist["eval_loss"]
    bars = {t["name"]: t for t in figs["ablation"]["fig"]["data"]}
    assert bars["ICL score"]["y"] == [c["icl"] for c in cases.values()]
    assert bars["repeated-token loss (nats)"]["yaxis"] == "y2" and bars["ICL score"]["yaxis"] == "y"
    assert r["command"] == ("mechscope toy induction --seed 0 --steps 6 --batch 4 --lr 0.003 --eval-every 3 "
                            "--context-len 64 --vocab 300 --d-model 32 --heads 4 --positions rotary --corpus pydoc")
    assert rerun_command(SYNTHETIC) == "mechscope toy induction --seed 0 --synthetic --steps 2000 --batch 32 --lr 0.003 --eval-every 250"


@pytest.mark.parametrize("positions, family", [("learned", "gpt2"), ("shortformer", "gpt2"), ("rotary", "llama")])
def test_attention_only_model_is_a_hooked_transformer_with_zero_mlp(positions, family):
    cfg = InductionConfig(vocab=50, context_len=32, d_model=32, n_heads=2, repeat_len=5, positions=positions)
    model = build_model(cfg)
    assert model.hf.config.model_type == family
    x = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run(x, cache=["blocks.*.hook_mlp_out", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post"])
    assert torch.equal(logits, model.hf(x).logits)  # hooks change nothing
    for L in range(2):
        assert float(cache[f"blocks.{L}.hook_mlp_out"].abs().max()) == 0.0
        assert torch.equal(cache[f"blocks.{L}.hook_resid_post"], cache[f"blocks.{L}.hook_resid_mid"])
    assert all(not p.requires_grad for n, p in model.hf.named_parameters() if ".mlp." in n)


def test_shortformer_positions_enter_queries_and_keys_only():
    """Against a naive recomputation from the weights: q = (x + p) W_Q + b_Q, k = (x + p) W_K + b_K and
    v = x W_V + b_V for the layer-normalised residual x and the sinusoidal code p (written out here by
    hand); the residual stream itself holds no position (hook_pos_embed is zero, so resid_pre of layer 0
    is the token embedding), and no position parameter trains."""
    cfg = InductionConfig(vocab=50, context_len=16, d_model=32, n_heads=2, repeat_len=5, positions="shortformer")
    model = build_model(cfg)
    hf = model.hf
    with torch.no_grad():  # trained tables are not GPT-2's zero-bias start: make every term matter
        for prm in hf.parameters():
            if prm.requires_grad:
                prm.add_(0.1 * torch.randn_like(prm))
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    names = ["hook_pos_embed", "hook_embed", "blocks.0.hook_resid_pre"] + [
        f"blocks.{L}.{s}" for L in range(2) for s in ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v")]
    logits, cache = model.run(x, cache=names)
    assert torch.equal(logits, hf(x).logits)
    assert float(cache["hook_pos_embed"].abs().max()) == 0.0
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    table = torch.tensor([[math.sin(t / 10000 ** (i / 32)) if i % 2 == 0 else math.cos(t / 10000 ** ((i - 1) / 32))
                           for i in range(32)] for t in range(12)])
    assert not any(p.requires_grad for n, p in hf.named_parameters() if "wpe" in n or "pos" in n)
    d, dh = cfg.d_model, cfg.d_model // cfg.n_heads
    for L in range(2):
        conv = hf.transformer.h[L].attn.c_attn.proj
        w, b = conv.weight, conv.bias
        xn = cache[f"blocks.{L}.ln1.hook_normalized"]
        want = {"q": (xn + table) @ w[:, :d] + b[:d], "k": (xn + table) @ w[:, d:2 * d] + b[d:2 * d],
                "v": xn @ w[:, 2 * d:] + b[2 * d:]}
        for nm, t in want.items():
            got = cache[f"blocks.{L}.attn.hook_{nm}"]  # [batch, pos, head, d_head]
            torch.testing.assert_close(got, t.reshape(2, 12, cfg.n_heads, dh), rtol=1e-5, atol=1e-5)


def test_icl_score_and_vocabulary_map():
    loss = torch.arange(600, dtype=torch.float32)  # token t's loss sits at index t - 1
    assert icl_score(loss, 50, 500) == pytest.approx(499 - 49)
    assert icl_score(loss[:100], 50, 500) == pytest.approx(99 - 49)  # short rows: the last token
    assert icl_score(loss, 50, 500, window=5) == pytest.approx(499 - 49)  # a linear curve: window means = centres
    assert icl_score(loss[:100], 50, 500, window=5) == pytest.approx((94 + 99) / 2 - 49)  # clipped at the row's end
    bumpy = torch.zeros(600)
    bumpy[499] = 11.0
    assert icl_score(bumpy, 50, 500, window=5) == pytest.approx(1.0)  # one spike among 11 tokens
    train = torch.tensor([[7, 7, 7, 3, 3, 9, 1000]])
    table = remap_vocab(train, 3)
    assert table[7] == 1 and table[3] == 2 and table[9] == 0 and table[1000] == 0  # rare ids -> "other"
    rows = repeated_tokens(50, 20, 10, torch.Generator().manual_seed(0), bos=4)
    assert (rows[:, 0] == 4).all() and torch.equal(rows[:, 1:21], rows[:, 21:])
    assert set(rows[:, 1:].unique().tolist()) == {1, 2, 3, 5, 6, 7, 8, 9}  # never 0 ("other") nor the BOS


def test_phase_change_finds_the_planted_step():
    steps = list(range(0, 1100, 100))
    hist = {"step": steps, "induction": [], "icl": [], "train_loss": []}
    for s in steps:
        late = 0.9 if s >= 600 else 0.05  # layer 1's head jumps between 500 and 600
        hist["induction"].append([[0.05, 0.05], [late, 0.05]])
        hist["icl"].append(-0.4 if s >= 600 else -0.05)
    for t in range(1000):  # a slow decay with a drop at 500-600
        hist["train_loss"].append(5.0 - 0.0005 * t - (0.8 if t >= 550 else 0.0))
    pc = phase_change(hist, InductionConfig())
    assert pc["induction"] == 550 and pc["icl"] == 550 and pc["loss"] in (500, 600) and pc["span"] <= 50
    assert pc["induction_curve"][-1] == 0.9  # layer 1's best head; layer 0 cannot hold an induction head


@pytest.mark.parametrize("bad, match", [(dict(d_model=30, n_heads=4), "multiple"), (dict(steps=0), "steps"),
                                        (dict(context_len=40, repeat_len=25, icl_early=10), "does not fit"),
                                        (dict(context_len=40, repeat_len=8, icl_early=50), "icl_early"),
                                        (dict(device="tpu"), "not a torch device"),
                                        (dict(device="meta"), "runs on 'cpu' or a GPU"),
                                        (dict(positions="alibi"), "positions must be"),
                                        (dict(tokenizer="wordpiece"), "tokenizer must be"),
                                        (dict(vocab=200), "needs >= 258 ids")])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(mechscope.InputError, match=match):
        run_induction(InductionConfig(**bad), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_where_there_is_none_is_refused_before_any_work():
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(mechscope.InputError, match="sees no CUDA GPU"):
            InductionConfig(device=dev).check()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_an_apple_gpu_asked_for_where_there_is_none_is_refused_before_any_work():
    with pytest.raises(mechscope.InputError, match="cannot use it here"):
        InductionConfig(device="mps").check()


def test_the_result_names_the_machine_the_run_used(monkeypatch):
    """On a machine with a GPU, a CPU run names the CPU (it used to name the GPU whenever one existed)."""
    from mechscope.toys.common import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Fake GPU {i}")
    assert "Fake GPU" not in machine("cpu") and "cores" in machine("cpu")
    assert machine("cuda") == "Fake GPU 0" and machine("cuda:1") == "Fake GPU 1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_the_gpu_follows_the_cpu_run():
    """Same seed, same data and initial weights (drawn on the CPU): the GPU run's training losses and head
    scores follow the CPU run's to float32 kernel differences over 40 steps."""
    cfg = dataclasses.replace(TINY, steps=40)
    cpu = run_induction(cfg, progress=False)["metrics"]["history"]
    gpu = run_induction(dataclasses.replace(cfg, device="cuda"), progress=False)["metrics"]["history"]
    assert torch.allclose(torch.tensor(gpu["train_loss"]), torch.tensor(cpu["train_loss"]), atol=1e-3)
    assert torch.allclose(torch.tensor(gpu["induction"]), torch.tensor(cpu["induction"]), atol=1e-3)
