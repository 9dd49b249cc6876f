"""Every bad input a new user met, through the real CLI: exit code 2, one ``error:`` line on stderr that names
the file or value and the fix, and, where the check needs no model, no model load at all.

The table is the contract of the README's "Errors are one line saying what went wrong and what to do (exit
code 2)". A new check belongs here with the input that triggers it. Runs on a tiny random Llama saved to a
folder (no network: HF_HUB_OFFLINE), a few seconds in all. After the table: what the CLI says when it does
less than asked (``note:`` lines), and the corpus options reaching the reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mechscope.cli import app
from tests.unit.test_cli import tiny_model_dir  # noqa: F401 (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Dictionaries, corpora and a feature database of the tiny model (d_model 32, layers 0..1)."""
    import mechscope
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary
    from mechscope.features import FeatureSource, StatsConfig, build_feature_db

    root = tmp_path_factory.mktemp("cli-errors")
    hook = "blocks.1.hook_resid_post"
    for name, d_in, d_sae in (("sae", 32, 24), ("sae16", 32, 16), ("sae48", 48, 24)):
        save_dictionary(SparseDictionary(DictionaryConfig("topk", d_in, d_sae, hook, k=4)).initialize(0), root / name)
    save_dictionary(SparseDictionary(DictionaryConfig("topk", 32, 24, hook, k=4)).initialize(0), root / "cut")
    weights = root / "cut" / "dictionary.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(4, 124, 60)) for _ in range(40)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    (root / "lines.txt").write_text("\n".join(docs))
    (root / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (root / "latin1.txt").write_bytes("w1 w2 caf\xe9 w3".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"text": "w1 caf\xe9"}\n'.encode("latin-1"))
    (root / "surrogate.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:5])
                                          + '{"text": "w1 \\ud800 w2"}\n')
    (root / "a-file").write_text("not a folder")
    m = mechscope.load(str(tiny_model_dir))
    toks = mechscope.data.corpus_tokens([str(root / "corpus.txt")], m.tokenizer, 16, "train", cache=False).tokens
    from mechscope.dictionaries import load_dictionary

    build_feature_db(FeatureSource(m, dictionary=load_dictionary(root / "sae"), dictionary_path=str(root / "sae")),
                     toks, root / "f.duckdb", StatsConfig(top_k=3), progress=False).close()
    _circuit_files(root, str(tiny_model_dir))
    return root


def _circuit_files(root, model: str) -> None:
    """Task files (tests/unit/test_circuit_cli.py's), a discover folder, an ACDC one, one of another model's graph,
    one holding an empty circuit, and an empty folder."""
    import shutil

    from tests.unit.test_circuit_cli import write_tasks

    write_tasks(root, model)
    for name, method in (("circ-run", ["--method", "eap", "--edges", "20"]),
                         ("circ-acdc", ["--method", "acdc", "--level", "node", "--tau", "0"])):
        r = runner.invoke(app, ["circuit", "discover", "--task", str(root / "solved.jsonl"), *method, "--out",
                                str(root / name), "--model", model, "--threads", "1"])
        assert r.exit_code == 0, r.output
    for name, edit in (("circ-other", {"model": "other-model"}), ("circ-empty", {"edges": []})):
        shutil.copytree(root / "circ-run", root / name)
        doc = json.loads((root / name / "circuit.json").read_text())
        doc.update(edit)
        if name == "circ-other":
            doc["graph"]["n_layers"] = 3
        (root / name / "circuit.json").write_text(json.dumps(doc))
    (root / "empty-dir").mkdir()


@pytest.fixture()
def env(files, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """Offline, a private cache, no progress bars on stderr, and every model load recorded."""
    import transformers

    import mechscope.models.loading as loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    transformers.utils.logging.disable_progress_bar()
    loads = []
    real = loading._from_folder

    def recorded(path, *a, **k):
        loads.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(loading, "_from_folder", recorded)
    yield {"root": files, "model": str(tiny_model_dir), "loads": loads}
    transformers.utils.logging.enable_progress_bar()


#: (id, arguments, what the line must name, the fix it must give, whether the check may load the model).
#: ``{root}`` is the fixture folder, ``{model}`` the tiny model's folder.
M = ["--model", "{model}", "--dtype", "float32", "--threads", "1"]
TRAIN = ["sae", "train", "--hook", "blocks.1.hook_resid_post", "--width", "16", "--k", "4", "--tokens", "600",
         "--batch-tokens", "256", "--context-len", "16", "--eval-tokens", "0", "--out", "{tmp}/run", *M]
EVAL = ["sae", "eval", "{root}/sae", "--context-len", "16", "--tokens", "200", *M]
BUILD = ["features", "build", "{root}/sae", "--out", "{tmp}/new.duckdb", "--tokens", "300", "--context-len", "16", *M]
DISCOVER = ["circuit", "discover", "--task", "{root}/solved.jsonl", "--method", "eap", "--out", "{tmp}/c", *M]
EVALUATE = ["circuit", "evaluate", "{root}/circ-run", "--out", "{tmp}/e", *M]
PATCH = ["circuit", "path-patch", "--task", "{root}/solved.jsonl", "--receivers", "logits", *M]
CASES = [
    # -- models
    ("unknown-alias", ["hooks", "--model", "smollm9-1b"], ["'smollm9-1b'", "local HuggingFace cache", "HF_HUB_OFFLINE"],
     "Built-in aliases: 'smollm2-135m'", True),
    ("gguf-typo", ["hooks", "--model", "./models/x.gguf"], ["'./models/x.gguf'", "no such file"],
     "Built-in aliases: 'smollm2-135m'", True),
    ("alias-near-miss", ["hooks", "--model", "smollm-135m"], ["'smollm-135m'"], "Did you mean 'smollm2-135m'", True),
    ("bad-dtype", ["hooks", "--model", "{model}", "--dtype", "int8"], ["--dtype 'int8'"], "use float32 or bfloat16",
     False),
    ("model-without-config", ["hooks", "--model", "{root}/sae"], ["has no config.json"], "point at a transformers", True),
    # -- lens
    ("empty-prompt", ["lens", "", "--model", "{model}"], ["the prompt is empty"], "pass some text", False),
    ("lens-k-0", ["lens", "w1", "--k", "0", "--model", "{model}"], ["--k must be at least 1"], "at least 1", False),
    ("position-outside", ["lens", "w1 w2", "--position", "5", "--model", "{model}"], ["position 5", "2 tokens"],
     "use a position in -2..1", True),
    # -- report
    ("report-out-is-file", ["report", "--out", "{root}/a-file", *M], ["{root}/a-file is a file"], "pass a folder",
     False),
    ("report-missing-sae", ["report", "--sae", "{root}/nope", "--out", "{tmp}/r", *M], ["{root}/nope"],
     "a dictionary is a folder with cfg.json", False),
    ("report-truncated-sae", ["report", "--sae", "{root}/cut", "--out", "{tmp}/r", *M],
     ["{root}/cut/dictionary.safetensors"], "restore it from a checkpoint or re-create it", False),
    ("report-settings", ["report", "--n-prompts", "4", "--patch-prompts", "9", "--out", "{tmp}/r", *M],
     ["patch_prompts", "9"], "must be in 1..n_prompts", False),
    # -- serve
    ("serve-missing-db", ["serve", "--features", "{root}/missing.duckdb", *M], ["{root}/missing.duckdb"],
     "mechscope features build", False),
    ("serve-db-of-another-dictionary", ["serve", "-d", "{root}/sae16", "--features", "{root}/f.duckdb", *M],
     ["{root}/sae16 has 16 latents but the database has 24", "{root}/f.duckdb"],
     "Fix: pass the database built from {root}/sae16", False),
    ("serve-missing-dictionary", ["serve", "-d", "{root}/nope", *M], ["{root}/nope is not a folder"],
     "a dictionary is a folder with cfg.json", False),
    ("serve-missing-report", ["serve", "--report", "{root}/nope", *M], ["{root}/nope does not exist"],
     "pass the results.json", False),
    ("serve-dictionary-of-another-model", ["serve", "-d", "{root}/sae48", *M],
     ["{root}/sae48/cfg.json says d_in=48", "blocks.1.hook_resid_post", "32 wide (d_model=32)"],
     "pass the model the dictionary was trained on", True),
    # -- sae train
    ("unknown-hook", [*TRAIN, "--hook", "blocks.1.hook_resd_post"], ["'blocks.1.hook_resd_post' is not a hook name"],
     "Closest templates", False),
    ("hook-past-last-layer", [*TRAIN[:3], "blocks.7.hook_resid_post", *TRAIN[4:]], ["layer 7 does not exist"],
     "layers 0..1", True),
    ("bad-arch", [*TRAIN, "--arch", "topq"], ["--arch", "'topq'"], "must be one of relu, topk, batchtopk, jumprelu",
     False),
    ("bad-compute-dtype", [*TRAIN, "--compute-dtype", "float16"], ["--compute-dtype", "'float16'"],
     "must be one of float32, bfloat16", False),
    ("k-above-width", [*TRAIN, "--k", "64"], ["k=64"], "needs k in 1..d_sae=16", False),
    ("unknown-corpus", [*TRAIN, "--corpus", "pydco"], ["unknown corpus 'pydco'"], "Did you mean 'pydoc'", False),
    ("missing-corpus-file", [*TRAIN, "--corpus", "{root}/nope.txt"], ["{root}/nope.txt"], "Check the path", False),
    ("bad-hf-spec", [*TRAIN, "--corpus", "hf:"], ["'hf:'"], "write 'hf:NAME' or 'hf:NAME:CONFIG'", False),
    ("train-out-is-file", [*TRAIN, "--out", "{root}/a-file"], ["{root}/a-file is a file"], "pass a folder", False),
    ("too-few-tokens", [*TRAIN, "--tokens", "100"], ["n_tokens=100", "batch_tokens=256"], "raise n_tokens (--tokens)",
     False),
    ("non-utf8-txt", [*TRAIN, "--corpus", "{root}/latin1.txt"], ["{root}/latin1.txt is not UTF-8", "byte 9"],
     "iconv -f latin1 -t utf-8", True),
    ("surrogate-jsonl-train", [*TRAIN, "--corpus", "{root}/surrogate.jsonl"],
     ["{root}/surrogate.jsonl, line 6", "lone surrogate \\ud800"], "Fix the line", True),
    # -- sae eval
    ("eval-dictionary-of-another-model", [*EVAL[:2], "{root}/sae48", *EVAL[3:]],
     ["{root}/sae48/cfg.json says d_in=48", "blocks.1.hook_resid_post", "32 wide (d_model=32)"],
     "pass the model the dictionary was trained on", True),
    ("eval-missing-dictionary", [*EVAL[:2], "{root}/nope", *EVAL[3:]], ["{root}/nope is not a folder"],
     "a dictionary is a folder with cfg.json", False),
    ("eval-non-utf8-jsonl", [*EVAL, "--corpus", "{root}/latin1.jsonl"], ["{root}/latin1.jsonl is not UTF-8",
                                                                         "line 1, byte 16"], "iconv", True),
    ("eval-wrong-text-field", [*EVAL, "--corpus", "{root}/body.jsonl"], ["{root}/body.jsonl, line 1",
                                                                         "no field 'text'"], "--text-field", True),
    # -- features build
    ("build-surrogate-jsonl", [*BUILD, "--corpus", "{root}/surrogate.jsonl"], ["{root}/surrogate.jsonl, line 6"],
     "Fix the line", True),
    ("build-dictionary-of-another-model", [*BUILD[:2], "{root}/sae48", *BUILD[3:], "--corpus", "{root}/corpus.txt"],
     ["{root}/sae48/cfg.json says d_in=48", "32 wide (d_model=32)"], "--model on the command line", True),
    ("build-neither-dictionary-nor-neurons", ["features", "build", *BUILD[3:]], ["exactly one"],
     "give a dictionary folder or --neurons", False),
    ("build-bad-encode-dtype", [*BUILD, "--encode-dtype", "float16"], ["--encode-dtype", "'float16'"],
     "must be auto, float32 or bfloat16", False),
    ("build-bad-split", [*BUILD, "--split", "test"], ["--split", "'test'"], "must be one of train, eval", False),
    ("build-bad-neurons", ["features", "build", "--neurons", "blocks.1.hook_resid_post", *BUILD[3:]],
     ["'blocks.1.hook_resid_post'"], "MLP hidden hook like 'blocks.3.mlp.hook_post'", False),
    ("build-out-is-folder", [*BUILD[:3], "--out", "{root}", *BUILD[5:]], ["--out {root} is a folder"],
     "pass a file name, e.g. {root}/features.duckdb", False),
    ("build-truncated-dictionary", [*BUILD[:2], "{root}/cut", *BUILD[3:]], ["{root}/cut/dictionary.safetensors"],
     "re-create it", False),
    # -- features export (no model at all) and explain
    ("export-missing-db", ["features", "export", "{root}/missing.duckdb", "--dashboard", "{tmp}/d.html"],
     ["{root}/missing.duckdb"], "mechscope features build", False),
    ("export-reversed-range", ["features", "export", "{root}/f.duckdb", "--latents", "10-5", "--dashboard",
                               "{tmp}/d.html"], ["the range 10-5 is empty"], "write it low-high, e.g. 5-10", False),
    ("export-ids-beyond-db", ["features", "export", "{root}/f.duckdb", "--latents", "3,20-30", "--dashboard",
                              "{tmp}/d.html"], ["20-30 is beyond", "{root}/f.duckdb", "0-23"],
     "pass ids in that range", False),
    ("export-bad-latents", ["features", "export", "{root}/f.duckdb", "--latents", "1,x", "--dashboard",
                            "{tmp}/d.html"], ["'x'"], "ids and ranges like 0-99,250", False),
    ("export-nothing-to-do", ["features", "export", "{root}/f.duckdb"], ["nothing to do"], "pass --dashboard", False),
    ("export-sae-of-another-db", ["features", "export", "{root}/f.duckdb", "--neuronpedia", "{tmp}/np", "--sae",
                                  "{root}/sae16"], ["16 latents but the database has 24"],
     "pass the database built from", False),
    ("explain-ids-beyond-db", ["features", "explain", "{root}/f.duckdb", "-d", "{root}/sae", "--latents", "99", *M],
     ["99 is beyond", "0-23"], "pass ids in that range", False),
    ("explain-db-of-another-dictionary", ["features", "explain", "{root}/f.duckdb", "-d", "{root}/sae16", "--latents",
                                          "1", *M], ["16 latents but the database has 24"],
     "pass the database built from", False),
    ("explain-endpoint-without-model", ["features", "explain", "{root}/f.duckdb", "-d", "{root}/sae", "--latents", "1",
                                        "--endpoint", "http://127.0.0.1:9/v1", *M], ["--endpoint needs"],
     "--endpoint-model", False),
    # -- toys
    ("toy-bad-modulus", ["toy", "modular", "--p", "4", "--out", "{tmp}/t"], ["p must be a prime", "4"],
     "the paper uses 113", False),
    ("toy-out-is-file", ["toy", "superposition", "--out", "{root}/a-file"], ["{root}/a-file is a file"],
     "pass a folder", False),
    ("toy-missing-corpus", ["toy", "induction", "--corpus", "{root}/nope.txt", "--out", "{tmp}/t"],
     ["{root}/nope.txt"], "Check the path", False),
    # -- circuits
    ("circuit-unknown-task", [*DISCOVER[:3], "ioj", *DISCOVER[4:]], ["unknown task 'ioj'"], "did you mean 'ioi'", False),
    ("circuit-unequal-lengths", [*DISCOVER[:3], "{root}/unequal.jsonl", *DISCOVER[4:]],
     ["{root}/unequal.jsonl", "different token lengths", "line 2: 5 vs 6"], "reword the corrupted prompts", True),
    ("circuit-task-the-model-fails", [*DISCOVER[:3], "{root}/failed.jsonl", *DISCOVER[4:]],
     ["does not solve task 'failed'", "only 0 of 16"], "To go on anyway, pass --no-check", True),
    ("circuit-bad-node-name", [*PATCH, "--senders", "a0h1"], ["--senders: 'a0h1' is not a node name"],
     "write names like a20.h0", False),
    ("circuit-node-not-in-graph", [*PATCH, "--senders", "a7.h0"], ["'a7.h0' is not a node of"], "Closest:", True),
    ("circuit-receiver-not-in-graph", [*PATCH, "--senders", "a0.h1", "--receivers", "a1.h0<k>"],
     ["'a1.h0<k>' is not a receiver"], "head 0's <k> receiver is a1.kv0<k>", True),
    ("circuit-of-another-model", [*EVALUATE[:2], "{root}/circ-other", *EVALUATE[3:]],
     ["{root}/circ-other/circuit.json holds a circuit of other-model"], "Pass --model other-model", True),
    ("circuit-empty", [*EVALUATE[:2], "{root}/circ-empty", *EVALUATE[3:]],
     ["{root}/circ-empty/circuit.json holds an empty circuit"], "discover a larger one (raise --edges", False),
    ("circuit-threshold-keeps-nothing", [*DISCOVER, "--threshold", "1000"], ["--threshold 1000 keeps no edge"],
     "or lower, or --edges N", True),
    ("circuit-folder-without-circuit-json", [*EVALUATE[:2], "{root}/empty-dir", *EVALUATE[3:]],
     ["{root}/empty-dir has no circuit.json"], "run mechscope circuit discover", False),
    ("circuit-acdc-edge-level-too-large", [*DISCOVER[:5], "acdc", "--level", "edge", "--max-candidates", "10",
                                           *DISCOVER[6:]], ["edge-level ACDC", "more than --max-candidates 10"],
     "use --level node", True),
    ("circuit-curve-of-acdc", [*EVALUATE[:2], "{root}/circ-acdc", *EVALUATE[3:], "--curve"], ["is an ACDC run"],
     "leave out --curve", False),
    ("circuit-roles-not-ioi", [*EVALUATE, "--roles"], ["--roles", "needs the ioi task"], "leave out --roles", False),
    ("circuit-bad-split", [*DISCOVER, "--split", "1"], ["--split 1.0"], "strictly between 0 and 1", False),
    ("circuit-edges-and-threshold", [*DISCOVER, "--edges", "5", "--threshold", "0.1"], ["--edges N or --threshold T"],
     "not both", False),
    ("circuit-bad-ablation", [*EVALUATE, "--ablation", "resample"], ["--ablation", "'resample'"],
     "must be one of corrupted, mean, zero", False),
    ("circuit-render-not-an-evaluation", ["circuit", "render", "{root}/circ-run/discover.json"],
     ["{root}/circ-run/discover.json is not a circuit evaluation"], "pass the evaluation.json of mechscope circuit", False),
    ("report-missing-circuit", ["report", "--circuit", "{root}/nope", "--out", "{tmp}/r", *M], ["{root}/nope is not a folder"],
     "the --out folder of mechscope circuit discover", False),
    ("serve-circuit-not-evaluated", ["serve", "--circuit", "{root}/circ-run", *M],
     ["{root}/circ-run/evaluation.json does not exist"], "run mechscope circuit evaluate {root}/circ-run first", False),
]


@pytest.mark.parametrize("args, names, fix, may_load", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_naming_value_and_fix(env, tmp_path, args, names, fix, may_load):
    fill = lambda s: s.format(root=env["root"], model=env["model"], tmp=tmp_path)  # noqa: E731
    r = runner.invoke(app, [fill(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for name in names:
        assert fill(name) in lines[0], (fill(name), lines[0])
    assert fill(fix) in lines[0], (fill(fix), lines[0])
    if not may_load:
        assert env["loads"] == [], f"the model was loaded before a check that does not need it: {env['loads']}"


def test_a_search_that_keeps_nothing_says_so_after_its_progress_bar(env, tmp_path):
    """ACDC removing every node is found after its sweep, so its progress bar precedes the one error line."""
    args = [a.format(root=env["root"], model=env["model"], tmp=tmp_path) for a in DISCOVER]
    r = runner.invoke(app, [*args[:5], "acdc", *args[6:]])
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the selected circuit is empty") and "lower --tau (now 0.01)" in last
    assert not (tmp_path / "c" / "circuit.json").exists()


# -- doing less than asked is said, not silent -------------------------------------------------------------------
def test_eval_says_when_the_held_out_split_is_smaller_than_asked(env, tmp_path):
    import shutil

    root = env["root"]
    shutil.copytree(root / "sae", tmp_path / "sae")
    r = runner.invoke(app, ["sae", "eval", str(tmp_path / "sae"), "--corpus", str(root / "corpus.txt"),
                            "--context-len", "16", "--tokens", "8000", "--model", env["model"], "--dtype", "float32"],
                      terminal_width=300)
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "sae" / "eval.json").read_text())
    assert ev["n_tokens_requested"] == 8000 and 0 < ev["n_tokens"] < 8000
    assert f"note: sae: evaluated on {ev['n_tokens']:,} held-out tokens, not the 8,000 asked" in r.stdout


def test_train_says_the_tokens_it_trains_on(env, tmp_path):
    root = env["root"]
    args = [a.format(root=root, model=env["model"], tmp=tmp_path) for a in TRAIN]
    r = runner.invoke(app, [*args, "--tokens", "600", "--corpus", str(root / "corpus.txt"), "--eval-tokens", "9000"],
                      terminal_width=300)
    assert r.exit_code == 0, r.output
    said = r.stdout.index("note: training on 512 tokens, not the 600 asked: 2 whole steps of --batch-tokens 256")
    assert said < r.stdout.index("trained 1 dictionary")  # said before training, not after
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert (data["train_tokens"], data["train_tokens_used"]) == (600, 512)
    ev = json.loads((tmp_path / "run" / "topk_L1_resid_post_w16_k4" / "eval.json").read_text())
    assert ev["n_tokens_requested"] == 9000 and "not the 9,000 asked" in r.stdout


def test_train_says_when_it_repeats_its_text(env, tmp_path):
    root = env["root"]
    args = [a.format(root=root, model=env["model"], tmp=tmp_path) for a in TRAIN]
    r = runner.invoke(app, [*args, "--tokens", "5120", "--corpus", str(root / "corpus.txt")], terminal_width=300)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    passes = 5120 / data["unique_tokens"]
    assert passes > 1.5
    said = r.stdout.index(f"note: the train split of {root / 'corpus.txt'} holds {data['unique_tokens']:,} tokens; "
                          f"training on 5,120 makes {passes:.1f} passes over it")
    assert said < r.stdout.index("trained 1 dictionary")


def test_export_takes_each_latent_once_and_says_so(env, tmp_path, monkeypatch):
    import mechscope.features.export as export

    got = []
    monkeypatch.setattr(export, "export_dashboard", lambda db, ids, path, title: got.append(list(ids)))
    r = runner.invoke(app, ["features", "export", str(env["root"] / "f.duckdb"), "--latents", "3,1-2,3,2",
                            "--dashboard", str(tmp_path / "d.html")], terminal_width=300)
    assert r.exit_code == 0, r.output
    assert got == [[3, 1, 2]]
    assert "note: --latents lists 2 latent(s) more than once (3, 2); each is taken once" in r.stdout
    got.clear()
    r = runner.invoke(app, ["features", "export", str(env["root"] / "f.duckdb"), "--dashboard", str(tmp_path / "d.html")])
    assert r.exit_code == 0 and got == [list(range(24))]  # the default: the first 100, or all if fewer


def test_first_fetch_of_a_corpus_is_announced(env, tmp_path, monkeypatch):
    import mechscope.data.corpora as corpora

    spec = corpora.CORPORA["shakespeare"]
    docs = (env["root"] / "corpus.txt").read_text().split("\n\n")
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpora.CorpusSpec(
        "shakespeare", lambda: docs, spec.licence, spec.description, spec.version, origin=spec.origin))
    r = runner.invoke(app, ["sae", "eval", str(env["root"] / "sae"), "--corpus", "shakespeare", "--context-len", "16",
                            "--tokens", "100", "--model", env["model"], "--dtype", "float32"], terminal_width=400)
    assert r.exit_code == 0, r.output
    assert (f"note: fetching corpus 'shakespeare' for the first time from {spec.origin}; it will be cached at "
            f"{corpora.corpus_cache_path('shakespeare')}") in r.stdout


def test_corpus_options_reach_the_reader(env, tmp_path, monkeypatch):
    """--text-field and --split-lines of every command that reads a corpus reach corpus_tokens."""
    import mechscope.data
    import mechscope.training.pipeline as pipeline

    root, seen = env["root"], []

    def recording(real):
        def call(*a, **k):
            seen.append((k.get("text_field"), k.get("split_lines")))
            return real(*a, **k)
        return call

    monkeypatch.setattr(pipeline, "corpus_tokens", recording(pipeline.corpus_tokens))
    monkeypatch.setattr(mechscope.data, "corpus_tokens", recording(mechscope.data.corpus_tokens))
    m = ["--model", env["model"], "--dtype", "float32", "--context-len", "16"]
    r = runner.invoke(app, ["sae", "eval", str(root / "sae"), "--corpus", str(root / "body.jsonl"), "--text-field",
                            "body", "--tokens", "100", *m])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["features", "build", str(root / "sae"), "--out", str(tmp_path / "l.duckdb"), "--corpus",
                            str(root / "lines.txt"), "--split-lines", "--tokens", "300", *m])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*[a.format(root=root, model=env["model"], tmp=tmp_path) for a in TRAIN], "--corpus",
                            str(root / "lines.txt"), "--split-lines", "--text-field", "t"])
    assert r.exit_code == 0, r.output
    assert seen == [("body", False), ("text", True), ("t", True)]
