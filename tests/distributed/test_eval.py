"""Dictionary evaluation split over two gloo ranks (``evaluate_dictionary(..., dist=)``) against one process.

Claims tested: with 7 batches over 2 ranks, every rank gets the whole evaluation, equal to one process's —
token counts, per-latent densities, dead/dense fractions and the density histogram exactly; FVU (pooled and per-batch
mean), L0, MSE, cosine, the three cross-entropies, CE loss recovered and KL to float64 rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from tests.distributed.test_dist import _env, free_port


def _inputs():
    import torch

    from mechscope.dictionaries import DictionaryConfig, SparseDictionary
    from tests.conftest import tiny_hooked

    torch.set_num_threads(1)
    model = tiny_hooked("llama")
    d = SparseDictionary(DictionaryConfig("topk", 64, 40, "blocks.1.hook_resid_post", k=4)).initialize(seed=2)
    g = torch.Generator().manual_seed(0)
    return model, d, torch.randint(3, 128, (26, 12), generator=g)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    from dataclasses import asdict

    from mechscope.evals.dictionary_eval import evaluate_dictionary
    from mechscope.scale.dist import init_distributed

    _env(rank, world, port)
    model, d, toks = _inputs()
    info = init_distributed("gloo", timeout_s=30.0)
    e = evaluate_dictionary(model, d, toks, batch_contexts=4, progress=False, dist=info)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(asdict(e)))
    os._exit(0)


def test_two_ranks_evaluate_as_one_process(tmp_path):
    from dataclasses import asdict

    import pytest

    from mechscope.evals.dictionary_eval import evaluate_dictionary

    model, d, toks = _inputs()
    want = json.loads(json.dumps(asdict(evaluate_dictionary(model, d, toks, batch_contexts=4, progress=False))))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert set(got) == set(want)
        for k, v in want.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
            else:
                assert got[k] == v, k
    assert want["n_tokens"] == 26 * 11 and want["l0"] > 0
