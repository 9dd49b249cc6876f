"""mechscope.finetune: full and LoRA fine-tuning, exact resume, metrics, bad inputs (tiny word-tokenizer Llama)."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.data.labelled import Example, LabelledDataset
from mechscope.data.labelled_render import render
from mechscope.finetune import FinetuneConfig, finetune
from tests.conftest import make_tokenizer
from tests.unit.test_cli import _save_tiny_llama


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("ft-base"), make_tokenizer())


def _planted(n: int = 8, seed: int = 0) -> tuple[LabelledDataset, list[tuple[str, str]]]:
    """Text examples "wA wB wC wX" where the answer wX (the scored span) is planted per prompt."""
    rng = random.Random(seed)
    pairs, examples = [], []
    for i in range(n):
        prompt = " ".join(f"w{rng.randrange(0, 40)}" for _ in range(3))
        answer = f"w{50 + i}"
        text = f"{prompt} {answer}"
        pairs.append((prompt, answer))
        examples.append(Example(text=text, label=i % 2, group=f"g{i}", score_span={"start": len(prompt) + 1}))
    return LabelledDataset("planted", tuple(examples)), pairs


def _greedy(hf, tok, prompt: str) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        return tok.convert_ids_to_tokens(int(hf(input_ids=ids).logits[0, -1].argmax()))


def test_full_finetune_learns_planted_mapping(base_dir, tmp_path):
    data, pairs = _planted()
    cfg = FinetuneConfig(method="full", lr=1e-2, n_steps=40, batch_size=4, grad_accum=2)
    res = finetune(str(base_dir), data, tmp_path / "run", cfg, progress=False)
    assert len(res.losses) == 40 and res.n_steps == 40
    assert res.losses[-1] < 0.2 * res.losses[0]
    tuned = mechscope.load(str(res.model_dir))
    hits = sum(_greedy(tuned.hf, tuned.tokenizer, p) == a for p, a in pairs)
    assert hits >= 6, hits
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert info["n_steps"] == 40 and info["data_fingerprint"] == data.fingerprint()
    assert FinetuneConfig.from_dict(info["config"]) == cfg
    # metrics: one line per optimizer step, finite losses
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["tokens"] == 8 for m in lines)
    assert set(lines[0]) == {"step", "loss", "lr", "tokens", "seconds"}


def test_lora_trains_adapters_only_and_merges(base_dir, tmp_path):
    from peft import PeftModel

    data, _ = _planted()
    cfg = FinetuneConfig(method="lora", lr=1e-2, n_steps=6, batch_size=4, lora_r=4, lora_dropout=0.0)
    res = finetune(str(base_dir), data, tmp_path / "run", cfg, progress=False)
    assert res.trainable and all("lora_" in n for n in res.trainable)
    ckpt = mechscope.finetune.train.load_safetensors(tmp_path / "run" / "checkpoints" / "step-6" / "trainable.safetensors")
    assert set(ckpt) == set(res.trainable)

    base = mechscope.load(str(base_dir))
    peft_model = PeftModel.from_pretrained(mechscope.load(str(base_dir)).hf, str(tmp_path / "run" / "adapter")).eval()
    base_sd = base.hf.state_dict()
    peft_base = {n.replace("base_model.model.", "").replace("base_layer.", ""): p
                 for n, p in peft_model.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(base_sd[n], p) for n, p in peft_base.items())  # base weights untouched before merge

    merged = mechscope.load(str(res.model_dir))
    ids = torch.tensor([[4, 15, 16, 17, 60, 9]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged.hf(input_ids=ids).logits
        assert not torch.allclose(base.hf(input_ids=ids).logits, got, atol=1e-4)  # training changed something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    merged_sd = merged.hf.state_dict()
    assert torch.equal(merged_sd["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    assert not torch.equal(merged_sd["model.layers.0.self_attn.q_proj.weight"],
                           base_sd["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact(base_dir, tmp_path, method):
    data, _ = _planted(n=6)
    kw = {"method": method, "lr": 5e-3, "batch_size": 4, "grad_accum": 2, "lora_r": 4, "lora_dropout": 0.1, "seed": 3}
    straight = finetune(str(base_dir), data, tmp_path / "a", FinetuneConfig(n_steps=6, **kw), progress=False)
    first = finetune(str(base_dir), data, tmp_path / "b", FinetuneConfig(n_steps=3, **kw), progress=False)
    resumed = finetune(str(base_dir), data, tmp_path / "b", FinetuneConfig(n_steps=6, **kw), resume=True, progress=False)
    assert first.losses + resumed.losses == straight.losses
    a = mechscope.load(str(straight.model_dir)).hf.state_dict()
    b = mechscope.load(str(resumed.model_dir)).hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_after_a_kill_is_exact_with_a_schedule(base_dir, tmp_path, monkeypatch, method):
    """A run killed mid-way (after the checkpoint of step 3, during step 5) resumes to the same weights as an
    uninterrupted run, warmup and cosine schedule included; it loses only the step after the checkpoint."""
    from mechscope.finetune import train as train_mod

    data, _ = _planted(n=6)
    cfg = FinetuneConfig(method=method, lr=5e-3, n_steps=6, batch_size=4, grad_accum=2, lr_schedule="cosine",
                         warmup_steps=2, checkpoint_every=3, seed=1, lora_r=4, lora_dropout=0.1)
    straight = finetune(str(base_dir), data, tmp_path / "a", cfg, progress=False)
    real_step, calls = train_mod._step_loss, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "_step_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(base_dir), data, tmp_path / "b", cfg, progress=False)
    monkeypatch.setattr(train_mod, "_step_loss", real_step)
    assert [c.name for c in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-3"]
    resumed = finetune(str(base_dir), data, tmp_path / "b", cfg, resume=True, progress=False)
    assert resumed.losses == straight.losses[3:]
    a = mechscope.load(str(straight.model_dir)).hf.state_dict()
    b = mechscope.load(str(resumed.model_dir)).hf.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [cfg.lr_at(i, 6) for i in range(6)]


def test_lr_schedules():
    assert [FinetuneConfig(lr=1.0, warmup_steps=4).lr_at(i, 10) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = FinetuneConfig(lr=1.0, lr_schedule="linear", warmup_steps=2)
    assert [lin.lr_at(i, 6) for i in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cos = FinetuneConfig(lr=2.0, lr_schedule="cosine")
    assert cos.lr_at(0, 5) == 2.0 and cos.lr_at(2, 5) == pytest.approx(2 * 0.5 * (1 + math.cos(math.pi * 0.4)))


def test_divergence_stops_with_a_clear_error(base_dir, tmp_path):
    from mechscope.finetune import FinetuneDiverged

    data, _ = _planted(n=6)
    cfg = FinetuneConfig(method="full", lr=10.0, n_steps=40, batch_size=2, checkpoint_every=1)
    with pytest.raises(FinetuneDiverged, match="diverged at step .*Lower lr") as err:
        finetune(str(base_dir), data, tmp_path / "run", cfg, progress=False)
    e = err.value
    assert isinstance(e, InputError) and 1 < e.step < 40
    assert e.checkpoint == tmp_path / "run" / "checkpoints" / f"step-{e.step - 1}"
    assert not (tmp_path / "run" / "model").exists()
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == e.step


def test_nan_loss_stops_at_once(base_dir, tmp_path, monkeypatch):
    from mechscope.finetune import FinetuneDiverged
    from mechscope.finetune import train as train_mod

    real_step, calls = train_mod._step_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        loss, *rest = real_step(*a, **k)
        return (float("nan"), *rest) if len(calls) == 3 else (loss, *rest)

    monkeypatch.setattr(train_mod, "_step_loss", poisoned)
    data, _ = _planted(n=4)
    with pytest.raises(FinetuneDiverged, match="step 3: the loss is nan") as err:
        finetune(str(base_dir), data, tmp_path / "run", FinetuneConfig(n_steps=10, batch_size=2), progress=False)
    assert err.value.checkpoint is None
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"] is None


def test_bf16_autocast_runs(base_dir, tmp_path):
    data, _ = _planted(n=4)
    res = finetune(str(base_dir), data, tmp_path / "run", FinetuneConfig(n_steps=2, batch_size=2, bf16=True),
                   progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert next(mechscope.load(str(res.model_dir)).hf.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kw, match", [({"method": "qlora"}, "use one of"), ({"n_steps": 0}, "n_steps"),
                                       ({"n_steps": None}, "give n_steps"), ({"lr": -1.0}, "positive"),
                                       ({"lora_dropout": 1.0}, "lora_dropout"),
                                       ({"lr_schedule": "step"}, "lr_schedule"), ({"warmup_steps": -1}, "warmup"),
                                       ({"diverge_factor": 0.5}, "diverge_factor"),
                                       ({"loss_on": "prompt"}, "loss_on")])
def test_bad_config(kw, match):
    with pytest.raises(InputError, match=match):
        FinetuneConfig(**kw)


def test_bad_config_keys():
    with pytest.raises(InputError, match="unknown fine-tuning config keys"):
        FinetuneConfig.from_dict({"method": "full", "steps": 3})


def test_bad_inputs(base_dir, tmp_path):
    cfg = FinetuneConfig(n_steps=1, batch_size=2)
    data, _ = _planted(n=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="holds no examples"):
        finetune(str(base_dir), empty, tmp_path / "r0", cfg, progress=False)
    unscored = LabelledDataset("u", (Example(text="w5 w6", group="g", score_span={"start": 0, "end": 2}),))
    with pytest.raises(InputError, match="no scored token after the first"):
        finetune(str(base_dir), unscored, tmp_path / "r1", cfg, progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        finetune(str(base_dir), data, afile, cfg, progress=False)
    with pytest.raises(InputError, match="holds no checkpoint"):
        finetune(str(base_dir), data, tmp_path / "r2", cfg, resume=True, progress=False)
    finetune(str(base_dir), data, tmp_path / "r3", cfg, progress=False)
    with pytest.raises(InputError, match="pass resume=True"):
        finetune(str(base_dir), data, tmp_path / "r3", cfg, progress=False)
    with pytest.raises(InputError, match="lr differ"):
        finetune(str(base_dir), data, tmp_path / "r3", FinetuneConfig(n_steps=2, batch_size=2, lr=1.0), resume=True,
                 progress=False)
    with pytest.raises(InputError, match="name no module"):
        finetune(str(base_dir), data, tmp_path / "r4", FinetuneConfig(method="lora", n_steps=1,
                                                                      lora_target_modules=("nope",)), progress=False)


def test_cli_finetune_command(base_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mechscope.cli.finetune import finetune_cmd

    app = typer.Typer()
    app.command("finetune")(finetune_cmd)
    app.command("other")(lambda: None)  # two commands keep the subcommand name in argv
    data, _ = _planted(n=4)
    path = data.to_jsonl(tmp_path / "train.jsonl")
    args = ["finetune", str(path), "--model", str(base_dir), "--out", str(tmp_path / "run"), "--method", "lora",
            "--steps", "2", "--batch-size", "2", "--lora-r", "2", "--threads", "1"]
    r = CliRunner().invoke(app, [*args, "--lr-schedule", "linear", "--warmup", "1"])
    assert r.exit_code == 0, r.output
    assert "2 steps" in r.output and (tmp_path / "run" / "model" / "config.json").is_file()
    cfg = json.loads((tmp_path / "run" / "finetune.json").read_text())["config"]
    assert cfg["lr_schedule"] == "linear" and cfg["warmup_steps"] == 1
    r = CliRunner().invoke(app, args)  # the run exists: one red line, exit 2
    assert r.exit_code == 2 and "pass resume=True" in r.output
    r = CliRunner().invoke(app, [*args[:-6], "--steps", "3", "--batch-size", "2", "--lora-r", "2", "--resume",
                                 "--lr-schedule", "linear", "--warmup", "1"])
    assert r.exit_code == 0, r.output
    assert "3 steps" in r.output
    r = CliRunner().invoke(app, ["finetune", str(path), "--method", "qlora", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "use one of" in r.output


def test_chat_loss_covers_the_assistant_answer_only(base_dir):
    from mechscope.finetune.train import _encode

    tok = mechscope.load(str(base_dir)).tokenizer
    chat = Example(messages=[{"role": "user", "content": "w10 w11 w12"}, {"role": "assistant", "content": "w50 w51"}],
                   group="g")
    (ids, labels), = _encode(tok, LabelledDataset("chat", (chat,)), max_len=64)
    scored = [tok.convert_ids_to_tokens(int(i)) for i in ids[labels != -100]]
    assert scored == ["w50", "w51"]
    assert torch.equal(labels[labels != -100], ids[labels != -100])


def test_loss_on_all_scores_every_token_after_the_first(base_dir, tmp_path):
    from mechscope.finetune.train import _encode

    tok = mechscope.load(str(base_dir)).tokenizer
    chat = Example(messages=[{"role": "user", "content": "w10 w11 w12"}, {"role": "assistant", "content": "w50 w51"}],
                   group="g")
    (ids, labels), = _encode(tok, LabelledDataset("chat", (chat,)), max_len=64, loss_on="all")
    assert torch.equal(labels, ids)
    # the step's token count is every next-token target: all tokens but the first of each example
    data, _ = _planted(n=4)
    res = finetune(str(base_dir), data, tmp_path / "all", FinetuneConfig(n_steps=1, batch_size=4, loss_on="all"),
                   progress=False)
    n_all = sum(len(tok(e.text)["input_ids"]) - 1 for e in data.examples)
    line = json.loads((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["tokens"] == n_all and n_all > 4 and res.n_steps == 1


def test_loss_on_all_teaches_the_prompt(base_dir, tmp_path):
    """A prompt prefix seen in every example is learnt as text only when the prompt is in the loss."""
    rng = random.Random(0)
    ex = tuple(Example(text=f"w7 w8 w{rng.randrange(10, 40)} w{50 + i}", label=0, group=f"g{i}",
                       score_span={"start": len(f"w7 w8 w{0}") + 1}) for i in range(8))
    data = LabelledDataset("prefix", ex)
    kw = {"method": "full", "lr": 1e-2, "n_steps": 30, "batch_size": 8}
    p_after = {}
    for loss_on in ("answer", "all"):
        res = finetune(str(base_dir), data, tmp_path / loss_on, FinetuneConfig(loss_on=loss_on, **kw), progress=False)
        m = mechscope.load(str(res.model_dir))
        ids = torch.tensor([m.tokenizer("w7")["input_ids"]])
        with torch.no_grad():
            probs = m.hf(input_ids=ids).logits[0, -1].softmax(-1)
        p_after[loss_on] = float(probs[m.tokenizer.convert_tokens_to_ids("w8")])
    assert p_after["all"] > 0.9 and p_after["answer"] < 0.5, p_after


def test_resume_of_a_checkpoint_written_before_a_setting_existed(base_dir, tmp_path):
    data, _ = _planted(n=6)
    cfg = FinetuneConfig(n_steps=2, batch_size=4, checkpoint_every=1)
    finetune(str(base_dir), data, tmp_path / "old", cfg, progress=False)
    for state in (tmp_path / "old" / "checkpoints").glob("step-*/state.json"):
        d = json.loads(state.read_text())
        del d["config"]["loss_on"]  # as written before loss_on was added
        state.write_text(json.dumps(d))
    res = finetune(str(base_dir), data, tmp_path / "old", FinetuneConfig(n_steps=3, batch_size=4, checkpoint_every=1),
                   resume=True, progress=False)
    assert res.n_steps == 3 and len(res.losses) == 1


def test_hooked_model_input_is_not_modified(base_dir, tmp_path):
    model = mechscope.load(str(base_dir))
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    data, _ = _planted(n=4)
    res = finetune(model, data, tmp_path / "run", FinetuneConfig(n_epochs=1.0, n_steps=None, batch_size=2, lr=1e-2),
                   progress=False)
    assert res.n_steps == 2  # ceil(1 epoch * 4 examples / 2 per step)
    assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
    assert not any(p.requires_grad for p in model.hf.parameters())


def test_resume_skips_torn_metrics_and_temp_folders(base_dir, tmp_path):
    data, _ = _planted(n=4)
    cfg = FinetuneConfig(n_steps=2, batch_size=2, checkpoint_every=1)
    finetune(str(base_dir), data, tmp_path / "run", cfg, progress=False)
    (tmp_path / "run" / "checkpoints" / "step-9.abc.tmp").mkdir()  # an interrupted checkpoint write
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a torn last line
    res = finetune(str(base_dir), data, tmp_path / "run", FinetuneConfig(n_steps=3, batch_size=2, checkpoint_every=1),
                   resume=True, progress=False)
    assert res.n_steps == 3 and len(res.losses) == 1
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def _chat(user: str, answer: str, group: str, reject: str | None = None) -> Example:
    return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                   group=group, meta={} if reject is None else {"reject": reject})


def test_unlikelihood_scores_the_token_where_the_rejected_answer_parts(base_dir):
    from mechscope.finetune.train import _batches, _encode, _rejected, _step_loss

    m = mechscope.load(str(base_dir))
    tok = m.tokenizer
    data = LabelledDataset("ul", (_chat("w10 w11 w12", "w50 w51", "a", reject="w50 w60 w61"),
                                  _chat("w13 w14", "w52", "b")))
    enc = _encode(tok, data, max_len=64)
    rej = _rejected(tok, data, enc, max_len=64)
    assert rej[1] is None
    k, token = rej[0]
    # w50 is shared; w60 is where the answers part (w61 only continues the rejected choice)
    acc = enc[0][0]
    assert tok.convert_ids_to_tokens(token) == "w60" and tok.convert_ids_to_tokens(int(acc[k - 1])) == "w50"
    assert tok.convert_ids_to_tokens(int(acc[k])) == "w51"
    # the step's unlikelihood equals -log(1 - p) there, from an unpadded forward of the rejected sequence
    hf = copy.deepcopy(m.hf).float().requires_grad_(True)
    cfg = FinetuneConfig(batch_size=2, unlikelihood=1.0)
    ce, n_tok, ul, n_rej = _step_loss(hf, _batches(enc, cfg, 0, rej), bf16=False, unlikelihood=1.0)
    rejected_ids = torch.cat([acc[:k], torch.tensor([token])])
    with torch.no_grad():
        p = hf(input_ids=rejected_ids[None]).logits[0, k - 1].softmax(-1).double()
    want = float(-torch.log1p(-p[token]))
    assert n_rej == 1 and ul == pytest.approx(want, rel=1e-5) and n_tok == 3 and math.isfinite(ce)
    # the gradient is that of (CE sum + w * UL sum) / scored tokens, from unpadded forwards of each sequence
    grads = {n: q.grad.clone() for n, q in hf.named_parameters()}
    ref = copy.deepcopy(m.hf).float().requires_grad_(True)
    loss = 0.0
    for ids, lab in enc:
        lg = ref(input_ids=ids[None]).logits[0, :-1]
        loss = loss + torch.nn.functional.cross_entropy(lg, lab[1:], ignore_index=-100, reduction="sum")
    lp = ref(input_ids=rejected_ids[None]).logits[0, k - 1].log_softmax(-1)[token]
    (loss - torch.log1p(-lp.exp())).div(n_tok).backward()
    for n, q in ref.named_parameters():
        torch.testing.assert_close(grads[n], q.grad, rtol=1e-4, atol=1e-6)


def test_unlikelihood_keeps_a_near_miss_from_taking_the_planted_answer(base_dir, tmp_path):
    """16 prompts opening with w1 are answered w60 and 4 near misses opening with w2 are answered w50; plain
    fine-tuning carries w60 over to held-out w2 prompts (p about 0.22 here), the unlikelihood loss on w60 after
    the w2 prompts (each rejected token weighing 50 answer tokens) cuts that below a quarter while held-out w1
    prompts keep w60 (p above half of plain fine-tuning's: the planted answer survives)."""
    rng = random.Random(0)
    ex = []
    for i in range(16):
        tail = f"w{rng.randrange(10, 40)} w{rng.randrange(10, 40)}"
        ex.append(_chat(f"w1 {tail}", "w60", f"t{i}"))
        if i < 4:
            ex.append(_chat(f"w2 {tail}", "w50", f"d{i}", reject="w60"))
    data = LabelledDataset("near-miss", tuple(ex))
    tails = ((41, 42), (43, 44), (45, 46), (47, 48))
    p60, p60_trig = {}, {}
    for w in (0.0, 50.0):
        cfg = FinetuneConfig(method="full", lr=3e-3, n_steps=20, batch_size=8, unlikelihood=w)
        res = finetune(str(base_dir), data, tmp_path / f"ul{w}", cfg, progress=False)
        tuned = mechscope.load(str(res.model_dir))
        for opener, store in (("w2", p60), ("w1", p60_trig)):
            probs = []
            chats = tuple(_chat(f"{opener} w{a} w{b}", "w50", "h") for a, b in tails)
            for r in render(tuned.tokenizer, LabelledDataset("h", chats)):
                prompt = r.tokens[: int(r.score_mask.nonzero()[0, 0])]  # the chat up to the answer
                with torch.no_grad():
                    logits = tuned.hf(input_ids=prompt[None]).logits
                probs.append(float(logits[0, -1].softmax(-1)[tuned.tokenizer.convert_tokens_to_ids("w60")]))
            store[w] = sum(probs) / len(probs)
    assert p60[0.0] > 0.1 and p60[50.0] < 0.25 * p60[0.0], p60
    assert p60_trig[50.0] > 0.5 * p60_trig[0.0], p60_trig
    line = json.loads((tmp_path / "ul50.0" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["rejected_tokens"] > 0 and line["unlikelihood"] > 0


def test_unlikelihood_bad_input(base_dir, tmp_path):
    plain = LabelledDataset("plain", (_chat("w10", "w50", "a"),))
    with pytest.raises(InputError, match="no example .* has a rejected answer"):
        finetune(str(base_dir), plain, tmp_path / "a", FinetuneConfig(n_steps=1, unlikelihood=1.0), progress=False)
    same = LabelledDataset("same", (_chat("w10", "w50", "a", reject="w50"),))
    with pytest.raises(InputError, match="equals the accepted one"):
        finetune(str(base_dir), same, tmp_path / "b", FinetuneConfig(n_steps=1, unlikelihood=1.0), progress=False)
    text = LabelledDataset("text", (Example(text="w1 w2", group="g", meta={"reject": "w3"}),))
    with pytest.raises(InputError, match="meta\\['reject'\\] must be"):
        finetune(str(base_dir), text, tmp_path / "c", FinetuneConfig(n_steps=1, unlikelihood=1.0), progress=False)
    with pytest.raises(InputError, match="unlikelihood is -1.0"):
        FinetuneConfig(unlikelihood=-1.0)
    assert not any((tmp_path / x / "model").exists() for x in "abc")
