"""Bad input fails loudly with mechscope's own errors, and says what to do."""

from __future__ import annotations

import re

import pytest
import torch

import mechscope
from mechscope.core.errors import MechscopeError
from tests.conftest import WRONG_TYPE, make_tiny, make_tokenizer, random_tokens, tiny_hooked, twin


@pytest.fixture(scope="module")
def with_tokenizer():
    return mechscope.HookedModel(make_tiny("llama"), make_tokenizer(), name="tiny-llama-tok")


def test_error_hierarchy():
    for cls in (mechscope.HookNameError, mechscope.SiteUnavailableError, mechscope.ShapeError, mechscope.InputError,
                mechscope.ModelLoadError, mechscope.UnsupportedArchitectureError, mechscope.HookDidNotFireError):
        assert issubclass(cls, MechscopeError)
    assert issubclass(mechscope.UnsupportedArchitectureError, mechscope.ModelLoadError)


def test_text_input_through_the_tokenizer(with_tokenizer):
    m = with_tokenizer
    toks = m.to_tokens(["w1 w2 w3", "w4 w5 w6"])
    assert toks.tolist() == [[5, 6, 7], [8, 9, 10]]
    assert torch.equal(m.run(["w1 w2 w3", "w4 w5 w6"]).logits, m.run(toks).logits)
    assert m.to_tokens("w1 w2", prepend_bos=True).tolist() == [[1, 5, 6]]
    assert m.to_str_tokens("w7 w9") == ["w7", "w9"]


def test_prompts_of_different_token_length(with_tokenizer):
    with pytest.raises(mechscope.InputError, match=r"different lengths \[2, 3\]"):
        with_tokenizer.run(["w1 w2 w3", "w4 w5"])
    with pytest.raises(mechscope.InputError, match="no text"):
        with_tokenizer.to_tokens([])


def test_prompt_longer_than_the_context(with_tokenizer):
    n_ctx = with_tokenizer.cfg.n_ctx
    with pytest.raises(mechscope.InputError, match=f"context of {n_ctx}"):
        with_tokenizer.run(" ".join(["w1"] * (n_ctx + 1)))
    with pytest.raises(mechscope.InputError, match=f"context of {n_ctx}"):
        tiny_hooked("gpt2").run(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    tiny_hooked("gpt2").run(torch.zeros(1, n_ctx, dtype=torch.long))  # exactly the context is fine


def test_bad_token_ids():
    m = tiny_hooked("qwen2")
    with pytest.raises(mechscope.InputError, match=r"\[0, 128\)"):
        m.run(torch.tensor([[3, 128]]))
    with pytest.raises(mechscope.InputError, match=r"\[0, 128\)"):
        m.run(torch.tensor([[-1, 4]]))
    with pytest.raises(WRONG_TYPE, match="integer|Int"):
        m.run(torch.tensor([[1.0, 2.0]]))


def test_text_without_a_tokenizer():
    with pytest.raises(mechscope.InputError, match="no tokenizer"):
        tiny_hooked("llama").run("hello")


def test_unknown_and_unavailable_hook_names(tokens):
    m = tiny_hooked("gpt_neox")
    with pytest.raises(mechscope.HookNameError) as info:
        m.run(tokens, cache=["blocks.0.attn.hook_resutl"])
    assert "blocks.0.attn.hook_result" in str(info.value)
    with pytest.raises(mechscope.SiteUnavailableError, match="hook_resid_pre plus hook_attn_out"):
        m.run(tokens, cache=["blocks.1.hook_resid_mid"])


@pytest.mark.parametrize("site, source_shape", [
    ("blocks.0.hook_resid_pre", (2, 9, 64)),  # one token short
    ("blocks.0.attn.hook_z", (2, 10, 64)),  # heads not split
    ("blocks.0.attn.hook_k", (2, 10, 4, 16)),  # n_heads where n_kv_heads (2) belong
])
def test_patch_of_the_wrong_shape(site, source_shape, tokens):
    m = tiny_hooked("llama")
    with pytest.raises(mechscope.ShapeError, match=r"\(axes"):
        m.run(tokens, interventions=[mechscope.Patch(site, source=torch.zeros(source_shape))])
    with pytest.raises(mechscope.ShapeError):
        m.run(tokens, interventions=[mechscope.Replace(site, value=torch.zeros(source_shape))])


def test_backward_must_return_a_scalar(tokens):
    with pytest.raises(mechscope.InputError, match="scalar"):
        tiny_hooked("llama").run(tokens, cache="hook_embed", backward=lambda logits: logits[:, -1])


# -- loading -----------------------------------------------------------------------------------
def test_load_a_saved_tiny_model_round_trips(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "tiny")
    m = mechscope.load(str(tmp_path / "tiny"))
    toks = random_tokens()
    assert torch.equal(m.run(toks).logits, twin("llama")(toks).logits)
    assert all(not p.requires_grad for p in m.hf.parameters())


@pytest.mark.parametrize("name", ["no such model!", "smollm2-135", "../nowhere/at/all", "~/no/such/dir/x"])
def test_unknown_model_name(name):
    with pytest.raises(mechscope.ModelLoadError):
        mechscope.load(name)


def test_near_miss_of_the_default_name_suggests_it():
    with pytest.raises(mechscope.ModelLoadError, match="smollm2-135m"):
        mechscope.load("smollm2-135")


def test_unknown_names_share_one_message_and_fail_fast_offline(monkeypatch, tmp_path):
    """An alias typo, a .gguf typo and an unknown hub id all say what was tried, list the built-in aliases and
    the fix; offline, the hub is not contacted at all (it used to retry for ~26 s, then suggest `hf download`)."""
    import time

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("hub contacted offline"))
    for name, tried in [("smollm9-1b", "not in the local HuggingFace cache .*HF_HUB_OFFLINE is set"),
                        (str(tmp_path / "modle.gguf"), "there is no such file or folder"),
                        ("./models/x.gguf", "there is no such file or folder"),
                        ("smollm-135m", "taken for a typo.*Did you mean 'smollm2-135m'")]:
        t0 = time.perf_counter()
        with pytest.raises(mechscope.ModelLoadError, match=f"unknown model '{re.escape(name)}': .*{tried}.*Built-in "
                                                           "aliases: 'smollm2-135m'.*Fix: pass a built-in alias"):
            mechscope.load(name)
        assert time.perf_counter() - t0 < 5


def test_unknown_hub_id_online_is_one_probe(monkeypatch):
    """Online, one probe with a short timeout decides: unreachable and not-on-the-hub both fail at once."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    import mechscope.models.loading as loading

    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    calls = []

    def unreachable(self, name, timeout=None):
        calls.append(timeout)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(mechscope.ModelLoadError, match="unknown model 'someone/nothing-here': .*could not be "
                                                       "reached \\(ConnectionError: .*HF_HUB_OFFLINE=1"):
        mechscope.load("someone/nothing-here")
    assert calls == [loading.HUB_PROBE_TIMEOUT_S]

    def missing(self, name, timeout=None):
        import httpx

        url = f"https://huggingface.co/api/models/{name}"
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(mechscope.ModelLoadError, match="has no model of that name"):
        mechscope.load("someone/nothing-here")


def test_missing_folder(tmp_path):
    with pytest.raises(mechscope.ModelLoadError):
        mechscope.load(str(tmp_path / "missing"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(mechscope.ModelLoadError, match="config.json"):
        mechscope.load(str(tmp_path / "empty"))


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(mechscope.ModelLoadError):
        mechscope.load(str(f))


def test_corrupt_safetensors(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(mechscope.ModelLoadError, match="safetensors"):
        mechscope.load(str(folder))


def test_bad_dtype():
    with pytest.raises(mechscope.ModelLoadError, match="dtype"):
        mechscope.load("smollm2-135m", dtype="int8")


@pytest.mark.parametrize("arch", ["opt", "bert"])
def test_unsupported_architecture(tmp_path, arch):
    import transformers

    if arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
        model = transformers.OPTForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                      num_attention_heads=2, max_position_embeddings=32, is_decoder=True)
        model = transformers.BertLMHeadModel(cfg)
    with pytest.raises(mechscope.UnsupportedArchitectureError) as info:
        mechscope.HookedModel(model)
    for supported in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "gpt_neox"):
        assert supported in str(info.value)
    assert arch in str(info.value)
    model.save_pretrained(tmp_path / arch)
    with pytest.raises(mechscope.UnsupportedArchitectureError):
        mechscope.load(str(tmp_path / arch))
