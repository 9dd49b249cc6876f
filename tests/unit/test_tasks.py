"""Circuit tasks as data, on tiny models with word-level tokenizers.

Claims tested: a JSONL task loads to the tokens and answer ids the model's tokenizer gives, and saving and
loading it again changes nothing; every metric of Task.values equals a naive per-prompt computation
(logit difference, probability, KL, probability mass over answer sets), on full and on truncated
logits, and is differentiable; split keeps every group on one side; check_task counts and averages as a
hand computation does, and refuses (or warns about) a task the model does not solve; the induction and
greater-than builders lay prompts out as documented, for a digit-splitting and a two-digit tokenizer;
every bad input says what is wrong and the fix.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError, ShapeError
from mechscope.data import (
    Task,
    check_task,
    greater_than_task,
    induction_task,
    load_task,
    resolve_task_source,
    save_task,
)
from mechscope.data.task_builtins import EVENT_NOUNS, GREATER_THAN_TEMPLATES
from tests.conftest import WRONG_TYPE, make_tiny, make_words_model, tiny_hooked

SHAPE_ERRORS = (ShapeError, *WRONG_TYPE)


@pytest.fixture(scope="module")
def wmodel() -> mechscope.HookedModel:
    """A tiny random Llama with the word-level tokenizer "w0".."w123" (ids 4..127)."""
    return make_words_model()


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pair(clean: str, corrupt: str, answer: str = " w50", wrong: str = " w51", **extra) -> dict:
    return {"clean": clean, "corrupt": corrupt, "answer": answer, "wrong": wrong, **extra}


def make_task(n: int = 5, pos: int = 6, metric: str = "logit_diff", seed: int = 0, **kw) -> Task:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 128, (n, pos), generator=g)
    sets = None
    if metric == "prob_mass":
        sets = dict(answer_sets=tuple(tuple(range(10 + i, 13 + i)) for i in range(n)),
                    wrong_sets=tuple(tuple(range(40, 41 + i)) for i in range(n)))
    return Task("toy", clean, torch.randint(4, 128, (n, pos), generator=g), torch.randint(4, 128, (n,), generator=g),
                torch.randint(4, 128, (n,), generator=g), metric=metric, **(sets or {}), **kw)


# -- JSONL ------------------------------------------------------------------------------------------
def test_jsonl_round_trip(wmodel, tmp_path):
    rows = [pair("w1 w2 w3", "w1 w9 w3", " w5", " w6", group="a"), pair("w4 w2 w3", "w4 w8 w3", "w7", "w6", group="b"),
            pair("w1 w2 w11", "w1 w10 w11", " w12", " w13", group="a")]
    task = load_task(write_jsonl(tmp_path / "mine.jsonl", rows), wmodel)
    assert task.name == "mine" and len(task) == 3 and task.metric == "logit_diff"
    assert torch.equal(task.clean_tokens, wmodel.to_tokens([r["clean"] for r in rows]))
    assert torch.equal(task.corrupt_tokens, wmodel.to_tokens([r["corrupt"] for r in rows]))
    vocab = wmodel.tokenizer.get_vocab()
    assert task.answer.tolist() == [vocab["w5"], vocab["w7"], vocab["w12"]]
    assert task.wrong.tolist() == [vocab["w6"], vocab["w6"], vocab["w13"]]
    assert task.groups == ("a", "b", "a") and task.clean_text[1] == "w4 w2 w3"
    again = load_task(save_task(task, tmp_path / "again.jsonl", wmodel), wmodel)
    for f in ("clean_tokens", "corrupt_tokens", "answer", "wrong"):
        assert torch.equal(getattr(again, f), getattr(task, f)), f
    assert again.groups == task.groups and again.corrupt_text == task.corrupt_text
    assert len(load_task(str(tmp_path / "mine.jsonl"), wmodel, n=2)) == 2
    assert load_task(tmp_path / "mine.jsonl", wmodel, metric="kl").metric == "kl"


def test_unequal_pair_lengths_name_the_lines(wmodel, tmp_path):
    rows = [pair("w1 w2 w3", "w1 w2 w3"), pair("w1 w2", "w1 w2 w3"), "", pair("w1 w2 w3", "w1 w2 w3 w4 w5")]
    with pytest.raises(InputError, match=r"2 of 3 pairs have clean and corrupted prompts of different token lengths "
                                         r"\(line 2: 2 vs 3; line 4: 3 vs 5.*reword the corrupted prompts"):
        load_task(write_jsonl(tmp_path / "t.jsonl", rows), wmodel)


def test_mixed_lengths_keep_the_most_common_and_warn(wmodel, tmp_path):
    rows = [pair("w1 w2 w3", "w4 w2 w3"), pair("w1 w2", "w4 w2"), pair("w5 w2 w3", "w6 w2 w3"), pair("w1", "w2")]
    with pytest.warns(UserWarning, match=r"kept the 2 pairs of 3 tokens .* dropped 2 \(1 of 1 tokens, 1 of 2 tokens; "
                                         r"lines 2, 4\)"):
        task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), wmodel)
    assert task.clean_text == ("w1 w2 w3", "w5 w2 w3")


def test_answer_that_is_not_one_token(wmodel, tmp_path):
    rows = [pair("w1 w2", "w3 w2"), pair("w1 w2", "w3 w2", answer=" w5 w6")]
    with pytest.raises(InputError, match=r"line 2: answer ' w5 w6' is 2 tokens for tiny-llama-words's tokenizer "
                                         r"\['w5', 'w6'\]; an answer must be exactly one token"):
        load_task(write_jsonl(tmp_path / "t.jsonl", rows), wmodel)
    with pytest.raises(InputError, match=r"line 1: wrong '' is 0 tokens"):
        load_task(write_jsonl(tmp_path / "u.jsonl", [pair("w1 w2", "w3 w2", wrong="")]), wmodel)


@pytest.mark.parametrize("lines, message", [
    ([], r"holds no task pairs \(it is empty or blank\)"),
    (["", "  "], r"holds no task pairs"),
    ([json.dumps(pair("w1", "w2")), '{"clean": "w1", '], r"line 2: not valid JSON .*one JSON object"),
    (['["w1", "w2"]'], r"line 1: a JSON list, not an object"),
    ([json.dumps({"clean": "w1", "corrupt": "w2", "answer": " w3"})], r"line 1: missing \['wrong'\]"),
    ([json.dumps(pair("w1", "w2", label="x"))], r"line 1: unknown keys \['label'\]"),
    ([json.dumps(pair("w1", "w2", group="a")), json.dumps(pair("w1", "w2"))], r"line 2: no 'group'"),
    ([json.dumps({**pair("w1", "w2"), "clean": 3})], r"line 1: field 'clean' is int, expected a string"),
])
def test_bad_files(wmodel, tmp_path, lines, message):
    with pytest.raises(InputError, match=message):
        load_task(write_jsonl(tmp_path / "t.jsonl", lines), wmodel)


def test_bad_sources_and_options(wmodel, tmp_path):
    with pytest.raises(InputError, match=r"unknown task 'ioii'; did you mean 'ioi'\? Built-in tasks: .*'docstring'"):
        load_task("ioii", wmodel)
    with pytest.raises(InputError, match=r"unknown task 'greater'; did you mean 'greater_than'"):
        load_task("greater", wmodel)
    with pytest.raises(InputError, match=r"no task file .*nope\.jsonl; check the path"):
        load_task(str(tmp_path / "nope.jsonl"), wmodel)
    with pytest.raises(InputError, match=r"is not a file"):
        load_task(tmp_path, wmodel)
    path = write_jsonl(tmp_path / "t.jsonl", [pair("w1 w2", "w3 w2")])
    # the same checks without a model (the CLI runs them before loading one)
    assert resolve_task_source("ioi") == ("builtin", "ioi") and resolve_task_source(str(path)) == ("file", Path(path))
    for source, message in (("ioii", "did you mean 'ioi'"), (str(tmp_path / "nope.jsonl"), "no task file"),
                            (tmp_path, "is not a file")):
        with pytest.raises(InputError, match=message):
            resolve_task_source(source)
    with pytest.raises(InputError, match=r"asked for n=2 pairs but it holds 1 usable pairs"):
        load_task(path, wmodel, n=2)
    with pytest.raises(InputError, match=r"'prob_mass' needs sets of answer tokens"):
        load_task(path, wmodel, metric="prob_mass")
    with pytest.raises(InputError, match=r"unknown metric 'logitdiff'"):
        load_task(path, wmodel, metric="logitdiff")
    with pytest.raises(InputError, match=r"task 'induction' has no answer sets"):
        load_task("induction", wmodel, n=2, metric="prob_mass")
    assert load_task("induction", wmodel, n=3, metric="prob").metric == "prob"


# -- the Task itself -------------------------------------------------------------------------------
def _naive(task: Task, logits: torch.Tensor, clean_logits: torch.Tensor | None) -> torch.Tensor:
    out = []
    for i in range(len(task)):
        row = logits[i, task.position].double()
        p = torch.softmax(row, -1)
        if task.metric == "logit_diff":
            out.append(row[task.answer[i]] - row[task.wrong[i]])
        elif task.metric == "prob":
            out.append(p[task.answer[i]])
        elif task.metric == "kl":
            q = torch.softmax(clean_logits[i, task.position].double(), -1)
            out.append(sum(q[v] * (q[v].log() - p[v].log()) for v in range(row.shape[0])))
        else:
            out.append(sum(p[v] for v in task.answer_sets[i]) - sum(p[v] for v in task.wrong_sets[i]))
    return torch.stack(out)


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl", "prob_mass"])
@pytest.mark.parametrize("position", [-1, -2])
def test_values_equal_a_naive_computation(metric, position):
    task = make_task(metric=metric, position=position)
    g = torch.Generator().manual_seed(1)
    logits, clean = torch.randn(5, 6, 128, generator=g) * 3, torch.randn(5, 6, 128, generator=g) * 3
    got = task.values(logits, clean)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), _naive(task, logits, clean), atol=1e-5, rtol=1e-5)
    # only the last positions present: the same values
    k = -position
    torch.testing.assert_close(task.values(logits[:, -k:], clean[:, -k:]), got)
    # differentiable
    x = logits.clone().requires_grad_(True)
    task.values(x, clean).sum().backward()
    assert x.grad is not None and x.grad[:, position].abs().sum() > 0


def test_values_errors():
    task = make_task(metric="kl")
    with pytest.raises(InputError, match="needs clean_logits"):
        task.values(torch.randn(5, 1, 128))
    with pytest.raises(SHAPE_ERRORS):
        task.values(torch.randn(4, 1, 128), torch.randn(4, 1, 128))
    with pytest.raises(InputError, match=r"position -2, outside logits with 1 positions; keep at least the last 2"):
        make_task(position=-2).values(torch.randn(5, 1, 128))


def test_task_rejects_bad_fields():
    t = make_task()
    with pytest.raises(SHAPE_ERRORS):
        Task("x", t.clean_tokens, t.corrupt_tokens[:, :-1], t.answer, t.wrong)
    with pytest.raises(InputError, match=r"unknown metric 'logitdiff'"):
        Task("x", t.clean_tokens, t.corrupt_tokens, t.answer, t.wrong, metric="logitdiff")
    with pytest.raises(InputError, match=r"position 0 must be a negative index"):
        Task("x", t.clean_tokens, t.corrupt_tokens, t.answer, t.wrong, position=0)
    with pytest.raises(InputError, match=r"'prob_mass' needs answer_sets"):
        Task("x", t.clean_tokens, t.corrupt_tokens, t.answer, t.wrong, metric="prob_mass")
    with pytest.raises(InputError, match=r"int64"):
        Task("x", t.clean_tokens.int(), t.corrupt_tokens, t.answer, t.wrong)
    with pytest.raises(SHAPE_ERRORS):
        Task("x", t.clean_tokens, t.corrupt_tokens, t.answer, t.wrong, groups=("a",))
    with pytest.raises(InputError, match="no prompts"):
        t.subset([])


def test_subset_and_split_keep_groups_apart():
    groups = tuple(f"g{int(i ** 0.5)}" for i in range(30))  # groups of 1, 3, 5, 7, 9 and 5 prompts
    task = make_task(n=30, metric="prob_mass", groups=groups, clean_text=tuple(f"c{i}" for i in range(30)),
                     positions={"end": torch.arange(30)})
    sub = task.subset([4, 2])
    assert sub.clean_text == ("c4", "c2") and sub.groups == (groups[4], groups[2])
    assert sub.positions["end"].tolist() == [4, 2] and sub.answer_sets == (task.answer_sets[4], task.answer_sets[2])
    assert torch.equal(sub.clean_tokens, task.clean_tokens[[4, 2]])
    assert task.subset(slice(0, 3)).clean_text == ("c0", "c1", "c2")
    sides = set()
    for seed in range(8):
        train, test = task.split(0.3, seed=seed)
        assert not set(train.groups) & set(test.groups)
        assert sorted(train.clean_text + test.clean_text, key=lambda s: int(s[1:])) == list(task.clean_text)
        assert len(test) >= 9 and len(train) >= 1
        assert [int(s[1:]) for s in test.clean_text] == sorted(int(s[1:]) for s in test.clean_text)  # order kept
        sides.add(tuple(sorted(set(test.groups))))
        again = task.split(0.3, seed=seed)[1]
        assert again.clean_text == test.clean_text  # deterministic
    assert len(sides) > 1  # the seed matters


def test_split_by_prompt_and_its_errors():
    task = make_task(n=10)
    train, test = task.split(0.3, seed=1)
    assert len(test) == 3 and len(train) == 7
    assert not set(test.clean_tokens[:, 0].tolist()) - set(task.clean_tokens[:, 0].tolist())
    with pytest.raises(InputError, match=r"test_fraction must lie in \(0, 1\)"):
        task.split(1.0)
    with pytest.raises(InputError, match=r"all 10 prompts are in one group \('a'\).*groups=\(\)"):
        make_task(n=10, groups=("a",) * 10).split()
    with pytest.raises(InputError, match=r"has one prompt"):
        make_task(n=1).split()


# -- check_task -------------------------------------------------------------------------------------
def _answers_by_rank(model, tokens, good: int, bad: int):
    logits = model.run(tokens).logits[:, -1]
    order = logits.argsort(-1, descending=True)
    return order[:, good].clone(), order[:, bad].clone()


def test_check_task_counts_and_means_like_a_hand_computation():
    model = tiny_hooked("llama")
    task0 = make_task(n=6, pos=7)
    answer, wrong = _answers_by_rank(model, task0.clean_tokens, 0, -1)
    answer[:2], wrong[:2] = wrong[:2].clone(), answer[:2].clone()  # prompts 0 and 1 prefer the wrong token
    task = Task("toy", task0.clean_tokens, task0.corrupt_tokens, answer, wrong)
    with torch.no_grad():
        cl, co = model.run(task.clean_tokens).logits, model.run(task.corrupt_tokens).logits
    check = check_task(model, task, batch_size=4)
    assert (check.n, check.n_correct) == (6, 4) and check.accuracy == pytest.approx(4 / 6)
    ld_clean = cl[torch.arange(6), -1, answer] - cl[torch.arange(6), -1, wrong]
    ld_corrupt = co[torch.arange(6), -1, answer] - co[torch.arange(6), -1, wrong]
    assert check.clean_mean == pytest.approx(float(ld_clean.mean()), abs=1e-5)
    assert check.clean_median == pytest.approx(float(ld_clean.sort().values[2:4].mean()), abs=1e-5)
    assert check.corrupt_mean == pytest.approx(float(ld_corrupt.mean()), abs=1e-5)
    assert check.corrupt_accuracy == pytest.approx(float((ld_corrupt > 0).float().mean()))
    with pytest.warns(UserWarning, match=r"solves task 'toy' only partly: 4 of 6 clean prompts \(66.7%\)"):
        assert check.require() is check
    assert "4/6 clean prompts prefer the answer" in str(check) and check.to_dict()["n_correct"] == 4
    kl = check_task(model, Task("toy", task.clean_tokens, task.corrupt_tokens, answer, wrong, metric="kl"))
    assert kl.clean_mean == 0.0 and kl.corrupt_mean > 0 and kl.n_correct == 4


def test_a_task_the_model_fails_is_refused():
    model = tiny_hooked("llama")
    task0 = make_task(n=5, pos=7)
    answer, wrong = _answers_by_rank(model, task0.clean_tokens, -1, 0)
    check = check_task(model, Task("toy", task0.clean_tokens, task0.corrupt_tokens, answer, wrong))
    assert check.n_correct == 0
    with pytest.raises(InputError, match=r"does not solve task 'toy': only 0 of 5 clean prompts \(0.0%\) prefer the "
                                         r"answer .*use a larger model, a task it solves"):
        check.require()
    good = check_task(model, Task("toy", task0.clean_tokens, task0.corrupt_tokens, wrong, answer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good.require()
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        check_task(model, task0, batch_size=0)


# -- built-ins on tiny models ----------------------------------------------------------------------
def test_induction_task_layout():
    model = tiny_hooked("llama")  # no tokenizer: BOS from the config (1)
    task = induction_task(model, n=6, seed=3, seq_len=8)
    c, x = task.clean_tokens, task.corrupt_tokens
    assert c.shape == x.shape == (6, 16) and (c[:, 0] == 1).all() and (x[:, 0] == 1).all()
    r, r2 = c[:, 1:9], x[:, 1:9]
    assert torch.equal(c[:, 9:], r[:, :-1]) and torch.equal(x[:, 9:], r[:, :-1])
    assert torch.equal(task.answer, r[:, -1]) and torch.equal(task.wrong, r2[:, -1])
    for i in range(6):
        assert len(set(r[i].tolist())) == 8 and not set(r[i].tolist()) & set(r2[i].tolist())
        assert c[i, task.positions["first_answer"][i]] == task.answer[i]
        assert c[i, task.positions["first_current"][i]] == c[i, task.positions["end"][i]]
    assert torch.equal(induction_task(model, n=6, seed=3, seq_len=8).clean_tokens, c)
    assert not torch.equal(induction_task(model, n=6, seed=4, seq_len=8).clean_tokens, c)
    with pytest.raises(InputError, match="seq_len must be >= 3"):
        induction_task(model, n=2, seq_len=2)
    with pytest.raises(InputError, match="fewer than the 2 \\* seq_len = 200"):
        induction_task(model, n=2, seq_len=100)


def _year_model(split: str) -> mechscope.HookedModel:
    """A tiny random Llama whose word-level tokenizer splits numbers into digits or into digit pairs."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for t in GREATER_THAN_TEMPLATES for w in re.findall(r"[A-Za-z]+", t)} - {"noun", "c", "yy"}
    numbers = [str(d) for d in range(10)] + ([f"{x:02d}" for x in range(100)] if split == "pair" else [])
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", *sorted(words), *EVENT_NOUNS, *numbers]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    pattern = {"digit": r"\d", "pair": r"\d\d", "none": r"\d\d\d\d"}[split]
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                               pre_tokenizers.Split(Regex(pattern), behavior="isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    hf = make_tiny("llama", vocab_size=256)
    return mechscope.HookedModel(hf, tok, name=f"tiny-years-{split}")


@pytest.mark.parametrize("split", ["digit", "pair"])
def test_greater_than_sets_follow_the_tokenizer(split):
    model = _year_model(split)
    task = greater_than_task(model, n=12, seed=0)
    assert task.metric == "prob_mass" and len(task) == 12 and len(set(task.groups)) > 1
    vocab = model.tokenizer.get_vocab()
    for i in range(12):
        yy = int(re.findall(r"17(\d\d)", task.clean_text[i])[0])
        assert "1701" in task.corrupt_text[i] and task.corrupt_text[i].replace("1701", f"17{yy:02d}") == task.clean_text[i]
        if split == "digit":
            d = yy // 10
            assert 1 <= d <= 8
            assert task.answer_sets[i] == tuple(vocab[str(k)] for k in range(d + 1, 10))
            assert task.wrong_sets[i] == tuple(vocab[str(k)] for k in range(d))
            assert (task.answer[i], task.wrong[i]) == (vocab[str(d + 1)], vocab[str(d - 1)])
        else:
            assert task.answer_sets[i] == tuple(vocab[f"{k:02d}"] for k in range(yy + 1, 100))
            assert task.wrong_sets[i] == tuple(vocab[f"{k:02d}"] for k in range(yy + 1))
    logits = model.run(task.clean_tokens).logits
    torch.testing.assert_close(task.values(logits).double(), _naive(task, logits, None), atol=1e-5, rtol=1e-5)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape


def test_greater_than_refuses_other_year_tokenizers():
    with pytest.raises(InputError, match="neither keeps a year's last two digits as one token nor splits them"):
        greater_than_task(_year_model("none"), n=4)
    with pytest.raises(InputError, match="century must be two digits"):
        greater_than_task(_year_model("digit"), n=4, century=7)


@pytest.mark.parametrize("name, message", [
    ("ioi", "fewer than two of mechscope's IOI names are known single tokens"),
    ("greater_than", "none of the event nouns is one token"),
    ("factual_recall", "no fact's object is one token"),
    ("docstring", "keeps only 0 parameter names"),
])
def test_builtins_on_a_tokenizer_without_their_words(wmodel, name, message):
    with pytest.raises(InputError, match=message):
        load_task(name, wmodel, n=4)
