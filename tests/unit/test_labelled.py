"""Labelled datasets as data: the JSONL format, its loader, splits, rendering and the built-ins.

Claims tested: writing a dataset as JSONL and loading it back gives equal examples and fingerprint; every
bad input names its line and the fix; a split never puts one group on both sides, for any group layout,
and is deterministic, and check_disjoint catches an overlap; the score mask marks exactly the tokens of
the scored characters (decoded back to them), for text, for chats through a chat template and through
the plain fallback; honesty pairs leave out exactly the last 5 words of the answer; the built-ins have
the counts and class balance they document and are deterministic; the fingerprint sees one label change.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechscope
from mechscope.core.errors import InputError
from mechscope.data.labelled import (
    Example,
    LabelledDataset,
    ScoreSpan,
    check_disjoint,
    read_labelled,
    take,
)
from mechscope.data.labelled_render import render
from mechscope.data.labelled_builtins import (
    BUILTIN_LABELLED,
    HARMFUL,
    HARMLESS,
    SCENARIOS,
    control,
    deception_scenarios,
    harmfulness,
    honesty_pairs,
    load_labelled,
    truth,
)
from tests.conftest import make_tiny, make_tokenizer


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat(*turns, **kw) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], "label": 0, "group": "g", **kw}


def make_dataset(groups, labels=None, name="d") -> LabelledDataset:
    labels = labels or [i % 2 for i in range(len(groups))]
    return LabelledDataset(name, tuple(Example(text=f"w{4 + i % 100}", label=lab, group=g)
                                       for i, (g, lab) in enumerate(zip(groups, labels))))


@pytest.fixture(scope="module")
def wtok():
    """Word-level tokenizer "w0".."w123" with a chat template that wraps each message in role words."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}w1{% else %}w2{% endif %} "
                         "{{ m['content'] }} w3 {% endfor %}")
    return tok


# -- format and loader -------------------------------------------------------------------------------------
def test_jsonl_round_trip_equals_the_original(tmp_path):
    original = LabelledDataset("mine", (
        Example(text="The sky is green.", label=1, group="colours", meta={"topic": "sky", "n": [1, 2]}),
        Example(text="Héllo wörld ✓", label=0, group="colours", score_span=ScoreSpan(1, -2)),
        Example(messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello there."}), label=0, group="chat",
                score_span=ScoreSpan(0, 5, message=2)),
    ))
    path = original.to_jsonl(tmp_path / "mine.jsonl")
    back = load_labelled(str(path))
    assert read_labelled(path) == back and read_labelled(path, n=2, seed=1).class_counts() == {0: 1, 1: 1}
    assert back == original and back.fingerprint() == original.fingerprint() and back.name == "mine"
    assert back.examples[2].messages[1].role == "user" and back.examples[1].scored_text() == "éllo wörld"
    for name in BUILTIN_LABELLED:  # every built-in survives the round trip too
        ds = BUILTIN_LABELLED[name]()
        assert load_labelled(str(ds.to_jsonl(tmp_path / f"{name}.jsonl"))).fingerprint() == ds.fingerprint()


def test_labels_groups_counts_and_subset():
    ds = make_dataset(["a", "a", "b", "c"], [0, 1, 1, 1])
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 1, 1, 1]
    assert ds.groups == ("a", "a", "b", "c") and ds.class_counts() == {0: 1, 1: 3} and len(ds) == 4
    assert ds.subset([3, 0]).groups == ("c", "a") and len(ds.subset(torch.tensor([True, False, True, False]))) == 2
    with pytest.raises(InputError, match="no examples"):
        ds.subset([])
    assert ds.require_both_classes("training a probe") is ds
    with pytest.raises(InputError, match=r"training a probe needs examples of both labels.*3 of label 0 and 0 of label 1"):
        make_dataset(["a", "b", "c"], [0, 0, 0]).require_both_classes("training a probe")


@pytest.mark.parametrize("rows, match", [
    (["[1, 2]"], r"line 1: a JSON list, not an object"),
    (["{not json"], r"line 1: not valid JSON"),
    ([{"text": "a", "messages": [], "label": 0, "group": "g"}], r"line 1: .*exactly one of 'text'.*both were given"),
    ([{"label": 0, "group": "g"}], r"line 1: .*exactly one of 'text'.*neither was given"),
    ([{"text": "a", "label": 0, "group": "g"}, {"text": "b", "label": 2, "group": "g"}], r"line 2: label is 2; use 0"),
    ([{"text": "a", "label": True, "group": "g"}], r"line 1: label is True"),
    ([{"text": "a", "label": 0}], r"line 1: no 'group'"),
    ([{"text": "a", "group": "g"}], r"line 1: no 'label'"),
    ([chat(("robot", "hi"))], r"line 1: message 0 has role 'robot'; use one of \['system', 'user', 'assistant'\]"),
    ([{"messages": [], "label": 0, "group": "g"}], r"line 1: 'messages' must be a non-empty list"),
    ([chat(("user", "hi"), score_span={"message": 3, "start": 0})], r"line 1: score_span message 3 is out of range"),
    ([chat(("user", "hi"), score_span={"message": 0, "start": 0, "end": 9})], r"line 1: score_span start=0, end=9 is out of range.*2 characters"),
    ([chat(("user", "hi"), score_span={"message": 0, "start": 1, "end": -1})], r"resolves to \[1, 1\)"),
    ([chat(("user", "hi"), score_span={"start": 0})], r"line 1: score_span of a chat needs 'message'"),
    ([{"text": "abc", "label": 0, "group": "g", "score_span": {"message": 0}}], r"names a message but the example is text"),
    ([{"text": "abc", "label": 0, "group": "g", "score_span": {"start": "0"}}], r"score_span 'start' is '0'"),
    ([{"text": "a", "label": 0, "group": "g", "colour": 1}], r"line 1: unknown keys \['colour'\]"),
    ([{"text": 5, "label": 0, "group": "g"}], r"line 1: field 'text' is int, expected a string"),
    (["", "  "], r"holds no examples \(it is empty or blank\)"),
])
def test_bad_files_name_the_line_and_the_fix(tmp_path, rows, match):
    with pytest.raises(InputError, match=match):
        load_labelled(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_sources_say_what_to_use(tmp_path):
    with pytest.raises(InputError, match=r"no file .*missing\.jsonl; check the path.*Built-in datasets: \['control'"):
        load_labelled(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="is not a file"):
        load_labelled(str(tmp_path))
    with pytest.raises(InputError, match=r"no file truth; check the path"):
        read_labelled("truth")  # the file reader knows no built-in names
    with pytest.raises(InputError, match=r"unknown labelled dataset 'honest_pairs'; did you mean 'honesty_pairs'\?.*'truth'"):
        load_labelled("honest_pairs")
    with pytest.raises(InputError, match=r"asked for n=1000 examples but it holds 64"):
        load_labelled("deception_scenarios", n=1000)
    with pytest.raises(InputError, match=r"groups of 2 .*multiple of 2, not n=3"):
        load_labelled("deception_scenarios", n=3)


def test_hf_source_reads_rows_and_names_errors(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "me/broken":
            raise FileNotFoundError("not cached")
        return [{"text": "a", "messages": None, "label": 1, "group": "x", "score_span": None},
                {"text": "bcd", "label": 0, "group": "y", "score_span": {"message": None, "start": 1, "end": None}}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    ds = load_labelled("hf:me/probes:cfg@test")
    assert calls == [("me/probes", "cfg", "test")] and ds.name == "probes" and ds.labels.tolist() == [1, 0]
    assert ds.examples[1].scored_text() == "cd"
    load_labelled("hf:me/probes")
    assert calls[-1] == ("me/probes", None, "train")
    with pytest.raises(InputError, match=r"could not load 'hf:me/broken'.*not cached.*HF_HUB_OFFLINE"):
        load_labelled("hf:me/broken")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(InputError, match=r"needs the `datasets` library: run `pip install datasets`"):
        load_labelled("hf:me/probes")


def test_example_accepts_dicts_and_rejects_bad_values():
    e = Example(messages=[{"role": "user", "content": "hi"}], label=1, group="g")
    assert e.messages[0].content == "hi" and e.scored() == (0, 0, 2)
    with pytest.raises(InputError, match="exactly 'role' and 'content'"):
        Example(messages=[{"role": "user"}], label=0, group="g")


# -- splits ------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=40), st.floats(0.05, 0.95), st.integers(0, 10**6))
def test_split_never_shares_a_group(layout, fraction, seed):
    ds = make_dataset([f"g{k}" for k in layout])
    if len(set(layout)) < 2:
        with pytest.raises(InputError, match="one group"):
            ds.split(fraction, seed)
        return
    train, test = ds.split(fraction, seed)
    check_disjoint(train, test)
    assert not set(train.groups) & set(test.groups)
    assert sorted(train.examples + test.examples, key=ds.examples.index) == list(ds.examples)
    assert len(test) >= 1 and len(train) >= 1
    # whole groups go to test until it holds test_fraction, unless train is down to its last group
    assert len(test) >= fraction * len(ds) or len(set(train.groups)) == 1
    again = ds.split(fraction, seed)
    assert again[0] == train and again[1] == test


def test_split_rejects_bad_arguments_and_check_disjoint_names_shared_groups():
    ds = make_dataset(["a", "a", "b", "b", "c", "c"])
    with pytest.raises(InputError, match=r"test_fraction must lie in \(0, 1\)"):
        ds.split(1.0)
    with pytest.raises(InputError, match=r"all 2 examples are in one group \('a'\)"):
        make_dataset(["a", "a"]).split()
    with pytest.raises(InputError, match=r"share 2 group\(s\): 'a', 'b'.*split with LabelledDataset.split"):
        check_disjoint(ds.subset([0, 2, 4]), ds.subset([1, 3]))
    assert LabelledDataset.check_disjoint is check_disjoint


def test_take_is_stratified_and_deterministic():
    ds = truth()
    small = take(ds, 40, seed=3)
    assert len(small) == 40 and small.class_counts() == {0: 20, 1: 20} and small == take(ds, 40, seed=3)
    assert take(ds, 40, seed=4) != small
    pairs = load_labelled("honesty_pairs", n=10, seed=1)
    assert len(pairs) == 10 and all(pairs.groups.count(g) == 2 for g in pairs.groups)


# -- rendering ---------------------------------------------------------------------------------------------
def decoded(tok, r) -> str:
    return tok.decode(r.tokens[r.score_mask].tolist())


def test_score_mask_marks_the_scored_characters_of_text(wtok):
    ds = LabelledDataset("t", (
        Example(text="w10 w11 w12 w13 w14", label=0, group="a"),
        Example(text="w10 w11 w12 w13 w14", label=1, group="a", score_span=ScoreSpan(4, 11)),
        Example(text="w10 w11 w12 w13 w14", label=1, group="a", score_span=ScoreSpan(8, -4)),
    ))
    r = render(wtok, ds)
    assert [x.tokens.dtype for x in r] == [torch.int64] * 3 and [x.score_mask.dtype for x in r] == [torch.bool] * 3
    assert r[0].score_mask.all() and decoded(wtok, r[0]) == "w10 w11 w12 w13 w14"
    assert decoded(wtok, r[1]) == "w11 w12" and r[1].score_mask.tolist() == [False, True, True, False, False]
    assert decoded(wtok, r[2]) == "w12 w13"
    with pytest.raises(InputError, match=r"example 0: the scored characters ' ' cover no token"):
        render(wtok, LabelledDataset("t", (Example(text="w10 w11", label=0, group="a", score_span=ScoreSpan(3, 4)),)))


@pytest.mark.parametrize("chat_template", [True, False])
def test_score_mask_marks_the_scored_message_of_a_chat(wtok, chat_template):
    ex = Example(messages=({"role": "user", "content": "w20 w21 w22"}, {"role": "assistant", "content": "w30 w31 w32 w33"}),
                 label=0, group="a")
    ds = LabelledDataset("c", (ex, dataclasses.replace(ex, score_span=ScoreSpan(0, 7, message=0)),
                               dataclasses.replace(ex, score_span=ScoreSpan(4, -4, message=1))))
    r = render(wtok, ds, chat_template=chat_template)
    if chat_template:
        assert r[0].text == "w1 w20 w21 w22 w3 w2 w30 w31 w32 w33 w3 "
    else:
        assert r[0].text == "user: w20 w21 w22\nassistant: w30 w31 w32 w33\n"
    assert [decoded(wtok, x) for x in r] == ["w30 w31 w32 w33", "w20 w21", "w31 w32"]


def test_chat_templates_that_change_contents():
    ex = Example(messages=({"role": "user", "content": "w20 w21 "}, {"role": "assistant", "content": " w30 w31"}),
                 label=0, group="a")
    trims = make_tokenizer()
    trims.chat_template = "{% for m in messages %}w1 {{ m['content'] | trim }} w3 {% endfor %}"
    r = render(trims, LabelledDataset("c", (ex,)))[0]
    assert r.text == "w1 w20 w21 w3 w1 w30 w31 w3 " and decoded(trims, r) == "w30 w31"  # found by search
    drops = make_tokenizer()
    drops.chat_template = "{% for m in messages %}w1 {{ m['content'][:3] }} w3 {% endfor %}"
    with pytest.raises(InputError, match=r"changed message 0 \(user\).*chat_template=False"):
        render(drops, LabelledDataset("c", (ex,)))


def test_render_takes_a_model_and_needs_a_fast_tokenizer(wtok):
    model = mechscope.HookedModel(make_tiny("llama"), wtok, name="tiny-words")
    ds = LabelledDataset("t", (Example(text="w10 w11", label=0, group="a"),))
    assert render(model, ds)[0].tokens.tolist() == render(wtok, ds)[0].tokens.tolist()
    with pytest.raises(InputError, match="needs a fast tokenizer"):
        render(lambda text, **kw: None, ds)
    with pytest.raises(InputError, match="no tokenizer"):
        render(mechscope.HookedModel(make_tiny("llama"), None, name="no-tok"), ds)


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from mechscope.models.loading import cache_dir

    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not converted here yet (mechscope.load('smollm2-135m') once converts it)")
    return AutoTokenizer.from_pretrained(folder)


def test_score_mask_with_a_real_chat_template_and_honesty_pairs_skip_the_last_five_words():
    tok = _smollm2_tokenizer()
    pairs = honesty_pairs(n=6, seed=2)
    ds = LabelledDataset("mixed", pairs.examples + deception_scenarios(n=2).examples + harmfulness(n=2).examples)
    for ex, r in zip(ds.examples, render(tok, ds)):
        assert "<|im_start|>" in r.text
        assert decoded(tok, r).strip() == ex.scored_text().strip()
    for ex in pairs.examples:
        answer = ex.messages[1].content
        assert ex.scored_text() == " ".join(answer.split(" ")[:-5])
        assert answer[len(ex.scored_text()):].split() == answer.split()[-5:]


# -- built-ins ---------------------------------------------------------------------------------------------
def test_builtin_counts_and_balance():
    hp = honesty_pairs()
    assert len(hp) >= 240 and hp.class_counts()[0] == hp.class_counts()[1]
    assert all(hp.groups.count(g) == 2 for g in set(hp.groups))
    for g in list(dict.fromkeys(hp.groups))[:50]:  # a pair differs only in its instruction
        a, b = (e for e in hp.examples if e.group == g)
        assert (a.label, b.label) == (0, 1) and a.messages[1] == b.messages[1]
        assert a.messages[0].content.replace("an honest", "a dishonest") == b.messages[0].content
    instr = {e.messages[0].content for e in hp.examples}
    assert "Pretend you are an honest person making statements about the world." in instr and len(instr) >= 6

    tr = truth()
    assert tr.class_counts()[0] == tr.class_counts()[1] and len(tr) >= 300
    topics = {e.meta["topic"] for e in tr.examples}
    assert topics >= {"capitals", "numbers", "science"}
    assert all(sum(e.meta["topic"] == t for e in tr.examples) > 0 for t in topics)
    assert {e.meta["negated"] for e in tr.examples} == {True, False}
    assert len({g for g in tr.groups if g.startswith("capitals")}) >= 3
    assert tr.examples[0].text == "The capital of France is Paris." and tr.examples[0].label == 0
    assert tr.examples[1].text == "The capital of France is not Paris." and tr.examples[1].label == 1
    nums = [e for e in tr.examples if e.meta["topic"] == "numbers" and not e.meta["negated"]]
    for e in nums:
        a, _, _, _, b = e.text.rstrip(".").split(" ")
        assert e.label == int(not int(a) > int(b))

    dec = deception_scenarios()
    assert len(SCENARIOS) >= 30 and len(dec) == 2 * len(SCENARIOS) and dec.class_counts() == {0: len(SCENARIOS), 1: len(SCENARIOS)}
    assert all(e.scored() == (2, 0, len(e.messages[2].content)) for e in dec.examples)

    harm = harmfulness()
    c = harm.class_counts()
    assert c[1] >= 150 and c[0] >= 150 and len(HARMFUL) >= 6 and len(HARMLESS) >= 6
    assert {e.meta["category"] for e in harm.examples if e.label} == set(HARMFUL)
    assert all(len(e.messages) == 1 and e.messages[0].role == "user" and e.scored()[0] == 0 for e in harm.examples)
    train, test = harm.split(0.5, seed=0)
    train.require_both_classes("train"), test.require_both_classes("test")

    ctl = control()
    assert len(ctl) >= 200 and ctl.class_counts()[1] == 0 and {e.meta["kind"] for e in ctl.examples} == {"chat", "paragraph"}


@pytest.mark.parametrize("name", list(BUILTIN_LABELLED))
def test_builtins_are_deterministic_valid_and_splittable(name, wtok):
    build = BUILTIN_LABELLED[name]
    ds = build()
    assert build().fingerprint() == ds.fingerprint() and load_labelled(name).fingerprint() == ds.fingerprint()
    assert len(set(ds.groups)) >= 2 and all(e.scored_text().strip() for e in ds.examples)
    assert len({e.to_dict()["text" if e.text else "messages"].__repr__() + str(e.label) for e in ds.examples}) == len(ds)
    train, test = ds.split(0.3, seed=1)
    check_disjoint(train, test)
    assert len(test) >= 0.3 * len(ds)
    render(wtok, ds.subset(slice(0, 4)))  # every builtin renders (unknown words: <unk> tokens, offsets still hold)


def test_fingerprint_changes_when_one_label_changes():
    ds = truth()
    flipped = list(ds.examples)
    flipped[17] = dataclasses.replace(flipped[17], label=1 - flipped[17].label)
    other = LabelledDataset(ds.name, tuple(flipped))
    assert len(ds.fingerprint()) == 64 and other.fingerprint() != ds.fingerprint()
    assert LabelledDataset("other-name", ds.examples).fingerprint() == ds.fingerprint()
