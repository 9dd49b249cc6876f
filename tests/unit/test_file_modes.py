"""Artefacts that mechscope renames into place (dictionary folders, packed tokens, the model cache, atomic
files) get the modes the user's umask gives, not ``tempfile``'s private 0o700/0o600: a collaborator in the
same group can read a dictionary that was trained for them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mechscope.core.io import current_umask, make_temp_dir, shared_mode, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask  # still the same: reading did not reset it
    assert shared_mode(is_dir=True) == 0o777 & ~umask and shared_mode(is_dir=False) == 0o666 & ~umask


def test_folders_and_files_follow_the_umask(umask, tmp_path):
    from mechscope.data.corpora import write_jsonl
    from mechscope.data.packing import PackedTokens
    from mechscope.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary

    dirs, files = 0o777 & ~umask, 0o666 & ~umask
    assert _mode(make_temp_dir(tmp_path / "new", prefix="x.")) == dirs  # tempfile.mkdtemp alone gives 0o700
    write_text_atomic("hi", tmp_path / "a.txt")
    write_jsonl(tmp_path / "c" / "documents.jsonl", ["one", "two"])
    assert _mode(tmp_path / "a.txt") == files and _mode(tmp_path / "c" / "documents.jsonl") == files

    sae = SparseDictionary(DictionaryConfig("topk", 8, 16, "blocks.0.hook_resid_post", k=2)).initialize(0)
    folder = save_dictionary(sae, tmp_path / "sae")
    assert _mode(folder) == dirs
    assert {p.name: _mode(p) for p in folder.iterdir()} == {"cfg.json": files, "dictionary.safetensors": files}
    save_dictionary(sae, folder)  # replacing a dictionary keeps the modes too
    assert _mode(folder) == dirs

    packed = PackedTokens(tokens=torch.ones(2, 4, dtype=torch.long), sources=("x",), n_documents=1, n_tokens=8,
                          context_len=4, bos_token_id=None, sep_token_id=None, split="all", eval_fraction=0.05,
                          seed=0, tokenizer="t")
    out = packed.save(tmp_path / "tokens" / "key")
    assert _mode(out) == dirs and all(_mode(p) == files for p in out.iterdir())


def test_model_cache_folder_follows_the_umask(umask, tmp_path, monkeypatch):
    """The GGUF conversion writes the converted model through the same helper (transformers stubbed out:
    only the folder it leaves behind is under test)."""
    import transformers

    import mechscope.models.loading as loading

    class Stub:
        config = type("Config", (), {"to_dict": lambda self: {}})()

        def state_dict(self):
            return {}

        def load_state_dict(self, state, assign):
            pass

        def tie_weights(self):
            pass

        def save_pretrained(self, path):
            (path / "config.json").write_text("{}")

    class Auto:
        from_pretrained = from_config = staticmethod(lambda *a, **k: Stub())
        for_model = staticmethod(lambda **k: None)

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(transformers, name, Auto)
    out = tmp_path / "models" / "smollm2-135m"
    loading._convert_gguf(tmp_path / "m.gguf", out)
    assert _mode(out) == 0o777 & ~umask and _mode(out / "config.json") == 0o666 & ~umask
