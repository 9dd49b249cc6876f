"""Parity on a CUDA GPU (every test skipped without one; ``bench/gpu_check.sh`` runs them on a GPU machine).

Claims tested, on every family's tiny random model moved to the GPU: with no hooks, with every site cached and with
an identity function at every site, the logits equal a plain transformers forward on the GPU bit for bit; every
site fires once, on the GPU, with its documented shape; no hook is left behind; the GPU's logits follow the CPU's
(to float32 kernel differences); ``mechscope.load(folder, device="cuda")`` puts the whole model on the GPU and
gives the plain forward's logits.
"""

from __future__ import annotations

import pytest
import torch

import mechscope
from tests.conftest import all_hooks_removed, make_tiny, site_shape, tiny_hooked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_cuda(family: str) -> tuple[mechscope.HookedModel, torch.nn.Module]:
    """(the HookedModel of ``make_tiny(family)`` on the GPU, an identical plain copy there)."""
    hf = make_tiny(family).to("cuda")
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}"), make_tiny(family).to("cuda")


@torch.no_grad()
def test_cuda_logits_equal_plain_transformers_and_follow_the_cpu(family, tokens):
    m, ref = _on_cuda(family)
    t = tokens.to("cuda")
    expected = ref(t, use_cache=False).logits  # run() forwards with use_cache=False
    got = m.run(t).logits
    assert got.device.type == "cuda" and torch.equal(got, expected)
    logits, cache = m.run(t, cache="*")
    assert torch.equal(logits, expected) and list(cache) == list(m.hook_names())
    for name in cache:
        assert cache[name].device.type == "cuda" and tuple(cache[name].shape) == site_shape(m, name, *tokens.shape)
    logits, _ = m.run(t, functions={n: (lambda v: v) for n in m.hook_names()})
    assert torch.equal(logits, expected)
    assert all_hooks_removed(m.hf) == []
    cpu = tiny_hooked(family).run(tokens).logits
    assert torch.allclose(got.cpu(), cpu, rtol=0, atol=1e-4 * float(cpu.abs().max()))


def test_cuda_load_puts_the_model_on_the_gpu(tmp_path):
    from tests.unit.test_cli import _save_tiny_llama

    folder = _save_tiny_llama(tmp_path / "m")
    m = mechscope.load(str(folder), device="cuda")
    assert m.device.type == "cuda" and all(p.device.type == "cuda" for p in m.hf.parameters())
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder).to("cuda").eval()
    t = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m.run(t).logits, ref(t.to("cuda"), use_cache=False).logits)
