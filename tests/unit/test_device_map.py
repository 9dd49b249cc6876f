"""A model split with ``device_map`` (accelerate): some blocks in CPU memory, the rest offloaded to disk.

The claims: the split model's logits, every hook site's cached value, interventions and gradients equal the unsplit
model's exactly; hooks are removed after each run; weights read outside a forward (W_O, W_U, ...) are the real ones;
the cache lands where ``cache_device`` says; and bad placements fail before or at load naming the fix. On CPU the
only "devices" are cpu and disk; the same code paths carry GPU placements (tested on GPUs where one is lent).
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope import Ablate, Add, Patch, Replace
from mechscope.cli import app
from mechscope.core.errors import InputError, ModelLoadError
from tests.conftest import all_hooks_removed, make_tiny, random_tokens

N_LAYERS = 4


def split_map(m: mechscope.HookedModel) -> dict[str, str]:
    """The embedding and the first half of the blocks in CPU memory; the other blocks, the final norm and the
    unembedding on disk (a dict device_map over the model's own module names)."""
    layers = m.adapter.layers  # e.g. "model.layers"
    parent = layers.rsplit(".", 1)[0]
    dm = {}
    for name, _ in m.hf.get_submodule(parent).named_children():
        full = f"{parent}.{name}"
        if full == layers:
            dm.update({f"{layers}.{i}": "cpu" if i < N_LAYERS // 2 else "disk" for i in range(N_LAYERS)})
        else:
            dm[full] = "cpu" if full in (m.adapter.embed, getattr(m.adapter, "pos_embed", None)) else "disk"
    tied = set(getattr(m.hf, "all_tied_weights_keys", None) or {})  # GPT-2: lm_head.weight is wte.weight
    dm.update({name: "cpu" if f"{name}.weight" in tied else "disk" for name, _ in m.hf.named_children()
               if name != parent})
    return dm


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(unsplit, split) HookedModels of one saved tiny model (llama: separate unembedding; gpt2: Conv1D, tied)."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_tiny(request.param, num_hidden_layers=N_LAYERS, n_layer=N_LAYERS).save_pretrained(folder) \
        if request.param == "gpt2" else make_tiny(request.param, num_hidden_layers=N_LAYERS).save_pretrained(folder)
    ref = mechscope.load(str(folder))
    split = mechscope.load(str(folder), device_map=split_map(ref))
    return ref, split


def test_split_puts_blocks_in_memory_and_on_disk(pair):
    ref, split = pair
    where = split.placement()
    assert {"cpu", "disk -> cpu"} <= set(where.values())
    assert ref.placement() == {"": "cpu"}
    offloaded = split.layers[N_LAYERS - 1]
    assert all(p.device.type == "meta" for p in offloaded.parameters())  # nothing of it in memory between forwards
    assert all(p.device.type == "cpu" for p in split.layers[0].parameters())
    assert split.device == torch.device("cpu")


def test_logits_and_every_site_equal_the_unsplit_model(pair):
    ref, split = pair
    tokens = random_tokens()
    names = list(ref.hook_names())
    assert list(split.hook_names()) == names
    plain_ref, plain_split = ref.run(tokens).logits, split.run(tokens).logits
    assert torch.equal(plain_ref, plain_split)
    a, b = ref.run(tokens, cache=names), split.run(tokens, cache=names)
    assert torch.equal(a.logits, b.logits) and torch.equal(b.logits, plain_ref)
    assert list(b.cache) == list(a.cache) == names  # every site fired, in forward order
    for n in names:
        assert torch.equal(a.cache[n], b.cache[n]), n
    assert all_hooks_removed(split.hf) == []


def test_interventions_equal_the_unsplit_model(pair):
    ref, split = pair
    tokens, other = random_tokens(seed=0), random_tokens(seed=1)
    last = N_LAYERS - 1  # an offloaded block
    src = ref.run(other, cache=[f"blocks.{last}.hook_resid_pre"]).cache
    d = torch.randn(ref.cfg.d_model, generator=torch.Generator().manual_seed(0))
    cases = [
        [Ablate(f"blocks.{last}.attn.hook_z", heads=1)],
        [Ablate(f"blocks.{last}.attn.hook_result", heads=[0, 2], positions=slice(2, None))],  # reads W_O in the hook
        [Patch(f"blocks.{last}.hook_resid_pre", positions=[3, 4], source=src)],
        [Add("blocks.1.hook_resid_post", direction=d, scale=2.0), Add(f"blocks.{last}.hook_mlp_out", direction=d)],
        [Replace(f"blocks.{last}.attn.hook_pattern", value=lambda p: p.roll(1, dims=-1))],
    ]
    for ivs in cases:
        want = ref.run(tokens, interventions=ivs).logits
        got = split.run(tokens, interventions=ivs).logits
        assert not torch.equal(want, ref.run(tokens).logits), ivs  # the intervention did something
        assert torch.equal(want, got), ivs
    assert all_hooks_removed(split.hf) == []


def test_gradients_equal_the_unsplit_model(pair):
    ref, split = pair
    tokens = random_tokens()
    sites = ["hook_embed", f"blocks.{N_LAYERS - 1}.hook_resid_pre", f"blocks.{N_LAYERS - 1}.attn.hook_result"]

    def metric(logits):
        return logits[:, -1, 5].sum() - logits[:, -1, 7].sum()

    a = ref.run(tokens, cache=sites, backward=metric)
    b = split.run(tokens, cache=sites, backward=metric)
    assert a.cache.metric == b.cache.metric
    for n in sites:
        assert torch.equal(a.cache.grad(n), b.cache.grad(n)), n


def test_offloaded_weights_are_read_in(pair):
    ref, split = pair
    last = N_LAYERS - 1
    assert split.layer_module(last, split.adapter.o_proj).weight.device.type == "meta"
    assert torch.equal(split.W_O(last), ref.W_O(last))
    assert (split.b_O(last) is None) == (ref.b_O(last) is None)
    if ref.b_O(last) is not None:
        assert torch.equal(split.b_O(last), ref.b_O(last))
    assert torch.equal(split.W_U, ref.W_U) and torch.equal(split.W_E, ref.W_E)


def test_cache_device(pair):
    _, split = pair
    tokens = random_tokens()
    site = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    c = split.run(tokens, cache=[site], cache_device="cpu", cache_dtype=torch.bfloat16).cache
    assert c[site].device.type == "cpu" and c[site].dtype == torch.bfloat16
    assert split.run(tokens, cache=[site]).cache[site].device.type == "cpu"  # default: where the block ran
    for bad, says in [("meta", "holds no values"), ("cuda:7", "not on this machine"), ("gpu", "not a device"),
                      ("disk", "not a device")]:
        with pytest.raises(InputError, match=says):
            split.run(tokens, cache=[site], cache_device=bad)
        with pytest.raises(InputError, match=says), split.hooks(cache=[site], cache_device=bad):
            pass


def test_auto_with_max_memory_offloads_what_does_not_fit(tmp_path):
    make_tiny("llama", num_hidden_layers=N_LAYERS).save_pretrained(tmp_path)
    ref = mechscope.load(str(tmp_path))
    block_bytes = sum(p.numel() * p.element_size() for p in ref.layers[0].parameters())
    # room for about two blocks: accelerate keeps the first ones in memory and sends the rest to disk
    split = mechscope.load(str(tmp_path), device_map="auto", max_memory={"cpu": int(2.5 * block_bytes)})
    where = split.placement()
    assert "disk -> cpu" in where.values() and "cpu" in where.values(), where
    tokens = random_tokens()
    assert torch.equal(split.run(tokens).logits, ref.run(tokens).logits)
    everything_on_disk = mechscope.load(str(tmp_path), device_map={"": "disk"})
    assert everything_on_disk.device == torch.device("cpu")  # inputs go to the execution device, not meta
    assert torch.equal(everything_on_disk.run(tokens).logits, ref.run(tokens).logits)


def test_offload_of_a_bin_checkpoint_needs_an_offload_folder(tmp_path):
    hf = make_tiny("llama", num_hidden_layers=N_LAYERS)
    ckpt = tmp_path / "bin"
    hf.save_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    torch.save(hf.state_dict(), ckpt / "pytorch_model.bin")  # weights that cannot be read in place
    ref = mechscope.load(str(ckpt))
    dm = split_map(ref)
    with pytest.raises(ModelLoadError, match="offload_folder=") as e:
        mechscope.load(str(ckpt), device_map=dm)
    assert "--offload-folder" in str(e.value)
    folder = tmp_path / "offload"
    split = mechscope.load(str(ckpt), device_map=dm, offload_folder=folder)
    assert any(folder.iterdir())  # the offloaded blocks were re-saved there
    tokens = random_tokens()
    assert torch.equal(split.run(tokens).logits, ref.run(tokens).logits)


@pytest.mark.parametrize("kwargs, says", [
    (dict(device="cpu", device_map="auto"), "either device='cpu' or device_map"),
    (dict(max_memory={"cpu": "1GiB"}), "device_map='auto'"),
    (dict(offload_folder="/tmp/x"), "device_map='auto'"),
    (dict(device_map="bogus"), "not a device"),
    (dict(device_map="cuda:3"), "not on this machine"),
    (dict(device_map={"": "gpu"}), "not a device"),
    (dict(device_map={}), "empty"),
    (dict(device_map="auto", max_memory={"gpu0": "1GiB"}), "not a device"),
    (dict(device_map="auto", max_memory={0: "1GiB"}), "not on this machine"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "not a size"),
    (dict(device_map="auto", max_memory={"cpu": 1.5e9}), "not a size"),
])
def test_bad_placements_fail_before_loading(kwargs, says):
    with pytest.raises(InputError, match=says):
        mechscope.load("/nonexistent/never-read", **kwargs)  # checked before the path is looked at


def test_device_map_naming_missing_modules(tmp_path):
    make_tiny("llama", num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"lacks: \['model.layer.1'\]; closest: \['model.layers.1'"):
        mechscope.load(str(tmp_path), device_map={"": "cpu", "model.layer.1": "disk"})


def test_device_map_splitting_a_tied_weight(tmp_path):
    make_tiny("gpt2", n_layer=2).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="'lm_head' and 'transformer.wte' in different places.*same device"):
        mechscope.load(str(tmp_path), device_map={"transformer": "cpu", "lm_head": "disk"})


def test_stack_of_values_on_several_devices_says_where_to_gather():
    c = mechscope.ActivationCache()
    c._set("blocks.0.hook_resid_post", torch.zeros(1, 2, 3))
    c._set("blocks.1.hook_resid_post", torch.zeros(1, 2, 3, device="meta"))
    with pytest.raises(InputError, match="cache_device='cpu'"):
        c.stack("blocks.*.hook_resid_post")


def test_cli_device_map(tmp_path):
    make_tiny("llama", num_hidden_layers=N_LAYERS).save_pretrained(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["hooks", "--model", str(tmp_path), "--device-map", "auto", "--max-memory", "cpu=200000"],
                      terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "disk -> cpu" in r.output and "blocks.3.hook_resid_post" in r.output
    for args, says in [(["--max-memory", "cpu"], "device=size pairs"), (["--max-memory", "cpu=1GiB"], "device_map"),
                       (["--device-map", "cuda:5"], "not on this machine")]:
        r = runner.invoke(app, ["hooks", "--model", str(tmp_path), *args])
        assert r.exit_code == 2 and says in " ".join(r.output.split()), (args, r.output)
