"""Attribution graphs on a chosen device (issue 19, item 10): the graph code runs where the model runs.

Claims tested: transcoders loaded with an explicit ``device="cpu"`` give the same graph, validation, head split,
score split and steering, bit for bit, as the set built in memory; a set on another device than the model is
refused up front, naming both devices and the fix. On a second device that exists on every machine
(``tests/fakegpu.py``: CPU data, CUDA's rules on mixing devices), every graph function, transcoder training,
evaluation and the feature databases run without one op mixing the device with the CPU, and give the CPU's
results (to float64 rounding); pruning, supernodes and influence follow a graph moved there. Where CUDA exists:
the same tiny graph computed on the GPU equals the CPU graph (same active and selected features, edges to the
rounding of HF's float32 norms), and validation, edge heads, attention scores, supernode steering and pruning on
the GPU agree with the CPU's.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mechscope
from mechscope.graphs import (TranscoderSet, attribute, explain_attention, graph_scores, load_transcoders, prune,
                              save_transcoders, steer_supernode, validate)
from mechscope.graphs.edge_heads import graph_edge_heads
from tests.conftest import make_tiny, random_tokens
from tests.unit.test_graphs import random_set, setup, tiny64  # noqa: F401 (setup: the shared fixture)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _everything(m, ts, tok, g) -> dict[str, torch.Tensor]:
    """Every graph result of one prompt, as tensors (on the CPU)."""
    pr = prune(g)
    v = validate(m, ts, g, n_features=12)
    eh = graph_edge_heads(m, ts, g, 3, g.logit_start)
    a = explain_attention(m, ts, tok, 1, 0, 5, 2)
    s = steer_supernode(m, ts, g, pr, [0, 1, 2], n_random=2)
    agreements = [x for d in v.to_dict().values() if isinstance(d, dict) for x in d.values()]
    return {"edges": g.edges, "selected": g.selected, "active": g.active_features, "node_mask": pr.node_mask,
            "edge_mask": pr.edge_mask, "scores": torch.tensor(graph_scores(g, pr)),
            "validate": torch.tensor(agreements, dtype=torch.float64), "heads": eh.heads, "residual": eh.residual,
            "attention": torch.tensor([a.score, a.total, a.bias] + [p.value for p in a.pairs], dtype=torch.float64),
            "steer": torch.tensor([s.effect, s.predicted, *s.random_effects], dtype=torch.float64)}


def test_an_explicit_cpu_device_changes_nothing(setup, tmp_path):  # noqa: F811
    m, ts, tok, g = setup
    save_transcoders(ts, tmp_path / "tc")
    loaded = load_transcoders(tmp_path / "tc", device="cpu")
    assert loaded.device == torch.device("cpu")
    loaded.check_device(m)
    h = attribute(m, loaded, tok, max_feature_nodes=None, batch_size=16, progress=False)
    assert h.info["device"] == g.info["device"] == "cpu"
    want, got = _everything(m, ts, tok, g), _everything(m, loaded, tok, h)
    for k in want:  # nan (a constant correlation) compares equal to itself
        assert torch.equal(want[k].nan_to_num(7.0), got[k].nan_to_num(7.0)), k
    for name in ("edges", "active_features", "activations", "selected", "tokens", "logit_tokens", "logit_probs"):
        assert getattr(h, name).device.type == "cpu", name


def test_a_set_on_another_device_is_refused_naming_both(setup):  # noqa: F811
    m, ts, tok, _ = setup
    elsewhere = TranscoderSet([copy.deepcopy(t).to("meta") for t in ts.transcoders], model_name=ts.model_name)
    assert elsewhere.device.type == "meta"
    says = r"transcoder 0 is on meta but tiny-llama runs on cpu.*ts\.to\('cpu'\)"
    with pytest.raises(mechscope.InputError, match=says):
        attribute(m, elsewhere, tok, progress=False)
    mixed = TranscoderSet([ts[0], copy.deepcopy(ts[1]).to("meta")], model_name=ts.model_name)
    with pytest.raises(mechscope.InputError, match="transcoder 1 is on meta"):
        mixed.check_device(m)


# -- on a second device (no GPU needed) --------------------------------------------------------------------------
def _library_results(m, ts, tok) -> tuple:
    """(graph, {name: tensor}) of every library function of a graph on ``m``'s device."""
    from mechscope.graphs import to_neuronpedia
    from mechscope.graphs.edge_heads import json_edge_heads
    from mechscope.graphs.steer import steer_graph_features

    g = attribute(m, ts, tok, max_feature_nodes=None, batch_size=16, progress=False)
    d = to_neuronpedia(g, slug="x", node_threshold=1.0, edge_threshold=1.0)
    feats = [n["node_id"] for n in d["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
    logit = next(n["node_id"] for n in d["nodes"] if n["feature_type"] == "logit")
    out = _everything(m, ts, tok, g)
    out["budget"] = attribute(m, ts, tok, max_feature_nodes=10, batch_size=4, progress=False,
                              memory_budget_gb=1e-6).edges
    s = steer_graph_features(m, ts, d, feats, scale=0.0, max_new_tokens=3)
    out["steer_json"] = torch.tensor([s["kl"]] + [t["prob_after"] for t in s["targets"]], dtype=torch.float64)
    out["json_heads"] = json_edge_heads(m, ts, d, feats[0], logit).heads
    return g, out


def _text_and_model(root: Path) -> Path:
    """A tiny Llama folder with a word tokenizer in ``root/model`` and a text file ``root/text.txt``."""
    from tests.conftest import make_tokenizer
    from tests.unit.test_cli import _save_tiny_llama

    rng = torch.Generator().manual_seed(0)
    words = (" ".join(f"w{int(i)}" for i in torch.randint(3, 120, (40,), generator=rng)) for _ in range(60))
    (root / "text.txt").write_text("\n".join(words) + "\n")
    return _save_tiny_llama(root / "model", make_tokenizer())


def _cli_runs(root: Path, folder: Path, transcoders: Path, where: str) -> dict:
    """The commands with --device on ``where``: a graph, its validation, an edge's heads, a transcoder training."""
    from typer.testing import CliRunner

    from mechscope.cli import app
    from mechscope.graphs import AttributionGraph

    def cli(*args):
        r = CliRunner().invoke(app, [str(a) for a in args] + ["--threads", "1", "--device", where],
                               terminal_width=400)
        assert r.exit_code == 0, (r.output, r.exception)
        return r.stdout

    out = root / f"graph-{where}"
    cli("graph", "w5 w9 w13 w5 w9", "-t", transcoders, "-o", out, "--model", folder, "--batch-size", 8)
    cli("graph", "validate", out, "--model", folder, "--n-features", 5)
    kind = {n["node_id"]: n["feature_type"] for n in json.loads((out / "neuronpedia.json").read_text())["nodes"]}
    src = next(i for i, k in kind.items() if k == "embedding" and not i.endswith("_0"))
    heads = cli("graph", "heads", out, src, next(i for i, k in kind.items() if k == "logit"), "--model", folder)
    cli("transcoders", "train", "--model", folder, "--dtype", "float32", "--corpus", root / "text.txt", "--tokens",
        512, "--batch-tokens", 256, "--width", 32, "--k", 4, "--eval-tokens", 0, "--buffer-tokens", 512,
        "--context-len", 32, "--out", root / f"tc-{where}")
    return {"graph": AttributionGraph.load(out), "validation": json.loads((out / "validation.json").read_text()),
            "heads": heads, "trained": load_transcoders(root / f"tc-{where}")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (nan as a number, so that two nans agree)."""
    a, b = a.double().cpu().nan_to_num(7.0), b.double().cpu().nan_to_num(7.0)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def _compare_cli(cpu: dict, dev: dict) -> dict:
    import re

    v_cpu, v_dev, t_cpu, t_dev = cpu["validation"], dev["validation"], cpu["trained"], dev["trained"]
    edge = [float(re.search(r"edge \S+ -> \S+: ([-+0-9.e]+)", r["heads"]).group(1)) for r in (cpu, dev)]
    return {"device": dev["graph"].info["device"], "edges": _rel(dev["graph"].edges, cpu["graph"].edges),
            "selected": torch.equal(dev["graph"].selected, cpu["graph"].selected), "heads": edge,
            "frozen_rel_error": v_dev["frozen_features"]["rel_error"],
            "pearson": [[v[k]["pearson"] for k in ("real_direct", "real_paths", "live_paths")] for v in (v_cpu, v_dev)],
            "trained": [[t.n_layers, t.d_sae, t.metadata["tokens"], str(t.device)] for t in (t_cpu, t_dev)]}


def _on_fake_gpu() -> dict:
    """Every graph result on ``fakegpu`` beside the CPU's; run in a fresh interpreter (see tests/fakegpu.py)."""
    from tests import fakegpu  # first: the autograd engine counts devices at the first backward pass

    import tempfile

    from mechscope.data import corpus_tokens
    from mechscope.features.db import FeatureDB
    from mechscope.features.stats import StatsConfig
    from mechscope.graphs import suggest_supernodes
    from mechscope.graphs.features import build_set_features
    from mechscope.graphs.train import train_transcoders
    from mechscope.training.pipeline import CorpusConfig

    m, tok = tiny64(), random_tokens(1, 8, seed=3)[0]
    ts = random_set(m)
    g, want = _library_results(m, ts, tok)
    root = Path(tempfile.mkdtemp())
    folder = _text_and_model(root)
    train = {"d_sae": 64, "k": 4, "n_tokens": 1024, "batch_tokens": 256, "buffer_tokens": 512, "eval_tokens": 128,
             "progress": False, "corpus": CorpusConfig((str(root / "text.txt"),), context_len=32),
             "compute_dtype": "float32"}
    small = mechscope.load(str(folder))
    trained = train_transcoders(small, root / "cpu", **train)
    packed = corpus_tokens([str(root / "text.txt")], small.tokenizer, 16, "train", max_tokens=512, seed=0)
    stats = StatsConfig(top_k=5, per_bin=2, batch_contexts=8)
    db_cpu = build_set_features(small, trained, packed.tokens, folder=root / "cpu", cfg=stats, progress=False)
    cli_cpu = _cli_runs(root, folder, root / "cpu", "cpu")

    fakegpu.enable()
    hf = make_tiny("llama").double().to(fakegpu.NAME)
    for p in hf.parameters():
        p.requires_grad_(False)
    mf = mechscope.HookedModel(hf, name=m.cfg.name)
    tf = TranscoderSet([copy.deepcopy(t).to(fakegpu.NAME) for t in ts.transcoders], model_name=ts.model_name)
    gf, got = _library_results(mf, tf, tok)
    moved = copy.copy(gf)  # the graph's tensors on the device: pruning and supernodes follow them
    for name in ("edges", "active_features", "activations", "selected", "tokens", "logit_tokens", "logit_probs"):
        setattr(moved, name, getattr(gf, name).to(fakegpu.NAME))
    pm, pr = prune(moved), prune(g)
    small_f = mechscope.load(str(folder), device=fakegpu.NAME)
    trained_f = train_transcoders(small_f, root / "dev", **train)
    db_f = build_set_features(small_f, load_transcoders(root / "cpu", device=fakegpu.NAME), packed.tokens,
                              folder=root / "dev", cfg=stats, progress=False)
    cli_dev = _cli_runs(root, folder, root / "cpu", fakegpu.NAME)

    def stats_of(path):
        with FeatureDB(path) as db:
            return db.meta["n_tokens"], db.list_latents(limit=64)

    return {"violations": fakegpu.violations,
            "devices": [str(mf.device), gf.info["device"], str(gf.edges.device), str(trained_f.device)],
            "rel": {k: _rel(got[k], want[k]) for k in want},
            "prune_moved": [str(pm.node_mask.device), torch.equal(pm.node_mask.cpu(), pr.node_mask),
                            torch.equal(pm.edge_mask.cpu(), pr.edge_mask),
                            [s.nodes for s in suggest_supernodes(moved, pm, threshold=0.3)]
                            == [s.nodes for s in suggest_supernodes(g, pr, threshold=0.3)]],
            "train_rel": max(_rel(trained_f[L].W_dec, trained[L].W_dec) for L in range(trained.n_layers)),
            "eval": [json.loads((root / w / "eval.json").read_text())["set"] for w in ("cpu", "dev")],
            "features": [stats_of(db_cpu[L]) for L in (0, 1)] + [stats_of(db_f[L]) for L in (0, 1)],
            "cli": _compare_cli(cli_cpu, cli_dev)}


def test_on_a_second_device_no_tensor_is_left_on_the_cpu():
    pytest.importorskip("torch.utils.backend_registration")
    code = "import json; from tests.unit.test_graph_device import _on_fake_gpu; print(json.dumps(_on_fake_gpu()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["violations"] == []
    assert got["devices"] == ["fakegpu:0", "fakegpu:0", "cpu", "fakegpu:0"]
    bad = {k: v for k, v in got["rel"].items() if v > 1e-12}  # the same CPU kernels run underneath
    assert not bad, bad
    assert got["prune_moved"] == ["fakegpu:0", True, True, True]
    assert got["train_rel"] < 1e-5 and got["eval"][0] == got["eval"][1]
    _check_cli(got["cli"], "fakegpu:0")
    for (n_cpu, cpu), (n_dev, dev) in zip(got["features"][:2], got["features"][2:]):  # float32 statistics
        assert n_cpu == n_dev and [r["n_fired"] for r in cpu] == [r["n_fired"] for r in dev]
        assert all(a[k] == pytest.approx(b[k], rel=1e-5) for a, b in zip(cpu, dev) for k in ("max_act", "mean_act"))


def _check_cli(c: dict, device: str) -> None:
    """The commands on the device give the CPU's graph, validation and head split (a float32 model: to float32
    rounding) and train a set of the same shape there (the numbers differ: fakegpu's autocast casts nothing)."""
    assert c["device"] == device and c["edges"] < 1e-5 and c["selected"], c
    assert c["heads"][0] == pytest.approx(c["heads"][1], abs=2e-4) and c["heads"][0] != 0, c  # printed to 4 places
    assert c["frozen_rel_error"] < 1e-4 and c["pearson"][0] == pytest.approx(c["pearson"][1], abs=1e-4), c
    assert c["trained"][0][:3] == c["trained"][1][:3] and c["trained"][1][3] == "cpu", c  # loaded back on the CPU


# -- on a GPU ---------------------------------------------------------------------------------------------------
def _on_cuda(m, ts):
    hf = make_tiny("llama").double().to("cuda")
    for p in hf.parameters():
        p.requires_grad_(False)
    mc = mechscope.HookedModel(hf, name=m.cfg.name)
    tc = TranscoderSet([copy.deepcopy(t).to("cuda") for t in ts.transcoders], model_name=ts.model_name)
    return mc, tc


@needs_cuda
def test_a_graph_on_cuda_equals_the_cpu_graph(setup):  # noqa: F811
    m, ts, tok, g = setup
    mc, tc = _on_cuda(m, ts)
    gc = attribute(mc, tc, tok, max_feature_nodes=None, batch_size=16, progress=False)
    assert gc.info["device"].startswith("cuda") and gc.edges.device.type == "cpu"
    assert torch.equal(gc.active_features, g.active_features) and torch.equal(gc.selected, g.selected)
    assert torch.equal(gc.logit_tokens, g.logit_tokens)
    scale = float(g.edges.abs().max())
    assert torch.allclose(gc.edges, g.edges, rtol=0, atol=1e-5 * scale)  # HF's norms run in float32
    # a budget of nodes picks the same features by influence, and the long-prompt plan (two passes) too
    small = attribute(m, ts, tok, max_feature_nodes=10, batch_size=4, progress=False, memory_budget_gb=1e-6)
    small_c = attribute(mc, tc, tok, max_feature_nodes=10, batch_size=4, progress=False, memory_budget_gb=1e-6)
    assert small.info["passes"] == small_c.info["passes"] == 2 and torch.equal(small.selected, small_c.selected)
    assert torch.allclose(small_c.edges, small.edges, rtol=0, atol=1e-5 * scale)
    want, got = _everything(m, ts, tok, g), _everything(mc, tc, tok, gc)
    v = validate(mc, tc, gc, n_features=12)
    assert v.frozen_features.rel_error < 1e-4 and v.frozen_logits.rel_error < 1e-4
    for k in ("heads", "residual", "attention", "steer", "scores"):
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * float(want[k].abs().max())), k
    # pruning a graph whose tensors sit on the GPU: the same nodes and edges (up to a tie at a threshold)
    moved = copy.copy(g)
    for name in ("edges", "active_features", "activations", "selected", "tokens", "logit_tokens", "logit_probs"):
        setattr(moved, name, getattr(g, name).cuda())
    pc, pr = prune(moved), prune(g)
    assert pc.node_mask.device.type == "cuda"
    assert int((pc.node_mask.cpu() != pr.node_mask).sum()) <= 1 and int((pc.edge_mask.cpu() != pr.edge_mask).sum()) <= 1
    assert graph_scores(moved, pc) == pytest.approx(graph_scores(g, pr), rel=1e-5)


@needs_cuda
def test_the_graph_commands_on_cuda_equal_the_cpu(tmp_path):
    """--device cuda on graph, graph validate, graph heads and transcoders train (a float32 tiny Llama)."""
    from mechscope.graphs.train import train_transcoders
    from mechscope.training.pipeline import CorpusConfig

    folder = _text_and_model(tmp_path)
    train_transcoders(mechscope.load(str(folder)), tmp_path / "tc", d_sae=64, k=4, n_tokens=1024, batch_tokens=256,
                      buffer_tokens=512, eval_tokens=0, progress=False,
                      corpus=CorpusConfig((str(tmp_path / "text.txt"),), context_len=32))
    cpu, gpu = (_cli_runs(tmp_path, folder, tmp_path / "tc", where) for where in ("cpu", "cuda"))
    _check_cli(_compare_cli(cpu, gpu), "cuda:0")
