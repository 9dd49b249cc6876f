"""Attribution graphs against circuit-tracer 0.5.0 itself, on the same transcoders and prompt.

circuit-tracer pins ``transformers<=4.57.3`` (and works with nnsight 0.6, not 0.8), so it cannot share mechscope's
environment (transformers 5.23): it runs in its own virtual environment, named by ``MECHSCOPE_CT_PYTHON`` (its
python), through ``scripts/circuit_tracer_graph.py``, which writes its graph to a safetensors file compared here.
Without that variable the test is skipped. Set it up with::

    python3 -m venv ct && ct/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 "nnsight>=0.6,<0.7"
    MECHSCOPE_CT_PYTHON=ct/bin/python .venv/bin/python -m pytest tests/parity/test_circuit_tracer.py

Claims tested, on a tiny random Llama with random TopK skip transcoders (float32): the same active features, the
same target logits and probabilities, the same adjacency (to 1e-4 of its largest entry), the same pruned node and
edge sets, the same replacement and completeness scores; with a feature budget, the same greedy choice of features.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mechscope
from mechscope.graphs import attribute, graph_scores, load_transcoders, prune, save_transcoders
from tests.conftest import make_tokenizer
from tests.unit.test_cli import _save_tiny_llama
from tests.unit.test_graphs import random_set

CT = os.environ.get("MECHSCOPE_CT_PYTHON")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "circuit_tracer_graph.py"
pytestmark = pytest.mark.skipif(not CT, reason="set MECHSCOPE_CT_PYTHON to a python with circuit-tracer 0.5 installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    _save_tiny_llama(root / "model", make_tokenizer())
    cfg = json.loads((root / "model" / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4.57 does not know 5's TokenizersBackend
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    mcfg = json.loads((root / "model" / "config.json").read_text())  # 4.57 reads rope_theta at the top level
    mcfg.update({k: v for k, v in mcfg.get("rope_parameters", {}).items() if k == "rope_theta"})
    (root / "model" / "config.json").write_text(json.dumps(mcfg))
    m = mechscope.load(str(root / "model"))
    save_transcoders(random_set(m, d_sae=64, k=4, dtype="float32"), root / "tc")
    tok = m.to_tokens("w5 w9 w13 w5 w9 w13 w5", prepend_bos=True)[0]
    (root / "tokens.json").write_text(json.dumps(tok.tolist()))
    return root, m, load_transcoders(root / "tc"), tok


def run_ct(root: Path, budget: str) -> dict:
    out = root / f"ct-{budget}.safetensors"
    r = subprocess.run([CT, str(SCRIPT), str(root / "model"), str(root / "tc"), str(root / "tokens.json"), str(out),
                        budget], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(out))


def test_the_full_graph_equals_circuit_tracers(files):
    root, m, ts, tok = files
    ct = run_ct(root, "none")
    g = attribute(m, ts, tok, max_feature_nodes=None, progress=False)
    assert torch.equal(g.active_features, ct["active_features"])
    assert torch.allclose(g.activations, ct["activations"], rtol=1e-5, atol=1e-6)
    assert torch.equal(g.logit_tokens, ct["logit_tokens"]) and torch.allclose(g.logit_probs, ct["logit_probs"])
    A, B = g.adjacency, ct["adjacency"]
    assert A.shape == B.shape and float((A - B).abs().max()) <= 1e-4 * float(B.abs().max())
    pr = prune(g, 0.8, 0.98)
    assert torch.equal(pr.node_mask, ct["node_mask"])
    full_mask = torch.zeros_like(ct["edge_mask"])
    full_mask[:g.n_features, :g.n_sources] = pr.edge_mask[:g.n_features]
    full_mask[g.logit_start:, :g.n_sources] = pr.edge_mask[g.n_features:]
    assert torch.equal(full_mask, ct["edge_mask"])
    assert graph_scores(g) == pytest.approx(ct["scores"].tolist(), rel=1e-5)


def test_a_feature_budget_picks_the_same_features(files):
    root, m, ts, tok = files
    ct = run_ct(root, "20")
    g = attribute(m, ts, tok, max_feature_nodes=20, batch_size=64, progress=False)
    assert torch.equal(g.selected, ct["selected"])
    A, B = g.adjacency, ct["adjacency"]
    assert float((A - B).abs().max()) <= 1e-4 * float(B.abs().max())
