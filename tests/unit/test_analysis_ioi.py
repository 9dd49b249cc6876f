"""The IOI dataset's structure, with the default model's tokenizer on a tiny random model.

Claims tested: equal token lengths; clean and corrupted prompts differ only at S2, where the IO name
stands; word positions hold the names they claim; answers are (IO, S); ABBA and BABA balanced;
deterministic given the seed; no BOS where the tokenizer adds none.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import mechscope
from mechscope.core.errors import InputError
from mechscope.data import IOIDataset, make_ioi_dataset
from mechscope.models.loading import cache_dir


@functools.cache
def tokenizer_model() -> mechscope.HookedModel:
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the default model's tokenizer is not converted yet (mechscope.load() once)")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return mechscope.HookedModel(transformers.LlamaForCausalLM(cfg).eval(), tok, name="tiny-with-smollm2-tokenizer")


def test_ioi_dataset_structure():
    m = tokenizer_model()
    ds = make_ioi_dataset(m, 24, seed=3)
    assert isinstance(ds, IOIDataset) and len(ds) == 24
    n, pos = ds.clean_tokens.shape
    assert n == 24 and ds.corrupt_tokens.shape == (n, pos) and ds.answer_tokens.shape == (n, 2)
    assert torch.equal(ds.clean_tokens, m.to_tokens(ds.prompts))
    assert torch.equal(ds.corrupt_tokens, m.to_tokens(ds.corrupt_prompts))
    assert ds.clean_tokens[0, 0] != m.tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS
    rows = torch.arange(n)
    io, s = ds.answer_tokens[:, 0], ds.answer_tokens[:, 1]
    assert (io != s).all()
    assert torch.equal(ds.clean_tokens[rows, ds.word_idx["IO"]], io)
    assert torch.equal(ds.clean_tokens[rows, ds.word_idx["S1"]], s)
    assert torch.equal(ds.clean_tokens[rows, ds.word_idx["S2"]], s)
    assert (ds.word_idx["end"] == pos - 1).all()
    assert (ds.word_idx["S1"] < ds.word_idx["S2"]).all() and (ds.word_idx["IO"] < ds.word_idx["S2"]).all()
    # the corrupted prompt differs only at S2, where the IO name stands
    differs = ds.clean_tokens != ds.corrupt_tokens
    assert (differs.sum(1) == 1).all() and differs[rows, ds.word_idx["S2"]].all()
    assert torch.equal(ds.corrupt_tokens[rows, ds.word_idx["S2"]], io)
    for i in range(n):
        assert m.tokenizer.decode([int(io[i])]) == " " + ds.io_names[i]
        assert m.tokenizer.decode([int(s[i])]) == " " + ds.s_names[i]
        assert ds.prompts[i].count(ds.s_names[i]) == 2 and ds.corrupt_prompts[i].count(ds.io_names[i]) == 2
    # ABBA: IO named first; BABA: S named first; half of each
    abba = torch.tensor([o == "ABBA" for o in ds.orders])
    assert int(abba.sum()) == n // 2
    assert torch.equal(ds.word_idx["IO"] < ds.word_idx["S1"], abba)
    assert len(set(ds.templates)) > 3
    assert ds.pos_labels == m.to_str_tokens(ds.clean_tokens[0]) and len(ds.pos_labels) == pos


def test_ioi_dataset_is_deterministic_given_the_seed():
    m = tokenizer_model()
    a, b, c = make_ioi_dataset(m, 10, seed=0), make_ioi_dataset(m, 10, seed=0), make_ioi_dataset(m, 10, seed=1)
    assert a.prompts == b.prompts and torch.equal(a.clean_tokens, b.clean_tokens)
    assert a.prompts != c.prompts


def test_ioi_dataset_errors():
    m = tokenizer_model()
    with pytest.raises(InputError, match="n_prompts"):
        make_ioi_dataset(m, 0)
    bare = mechscope.HookedModel(m.hf)
    with pytest.raises(InputError, match="tokenizer"):
        make_ioi_dataset(bare, 4)
