"""The settings of the induction-head toy (:class:`InductionConfig`, the quick :data:`SYNTHETIC` preset) and
their checks. Split from :mod:`mechscope.toys.induction`, which re-exports every name; the toy's data, model
and figures modules read the settings from here, so none of them imports the toy itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.core.errors import InputError


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device {device!r} is not a torch device ({e}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu, or install a CUDA build of torch on a machine with a GPU.")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {device!r} asked for, but there are only {n} CUDA GPUs (cuda:0..cuda:{n - 1}).")
    elif dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise InputError(f"device {device!r} asked for, but this torch ({torch.__version__}) cannot use it here; "
                             "use --device cpu, or a machine and torch build that have it.")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r}: the induction toy runs on 'cpu' or a GPU ('cuda', 'cuda:N', 'mps', 'xpu').")
    return dev



#: ``positions`` values -> the architecture they build (the result page's note names it).
POSITIONS = {"learned": "GPT-2 (learned positions)",
             "shortformer": "GPT-2 (shortformer: sinusoidal positions in queries and keys only)",
             "rotary": "Llama (rotary positions)"}

@dataclass(frozen=True)
class InductionConfig:
    """Settings of the induction-head run (defaults: the paper's setting scaled to a CPU, 16M tokens of the
    Python standard library's source, about 20 minutes on one thread here; the phase change comes at about
    8M tokens, see the README).

    Attributes:
        corpus: mechscope corpus names (or paths) of the training text (default ``pysource``: code repeats
            its identifiers within a file, and on it the circuit forms on a CPU; on the four prose corpora,
            about 5M tokens in all, no run up to 102M tokens formed one). vocab: token ids (text runs: the
            BPE's size, or the SmolLM2 ids kept, see ``tokenizer``). context_len: tokens per row (>= 501 for
            the paper's ICL score; shorter rows use ``icl_late`` = the last position).
        tokenizer: ``"bpe"`` (a byte-level BPE of ``vocab`` ids trained on the training split, so every
            token has its own id) or ``"smollm2"`` (the default model's tokenizer, its ``vocab - 1`` most
            frequent training tokens plus one "other" id, which hides the rare tokens induction copies).
        d_model / n_heads: widths (2 layers, attention only). steps / batch / lr / warmup / weight_decay:
            AdamW with linear warm-up then cosine decay. grad_clip: max gradient norm (None: no clipping).
            eval_every: steps between checkpoints.
        eval_contexts: held-out rows of the ICL score. icl_early / icl_late: token positions of the ICL score
            (50 and 500 in the paper). icl_window: each is averaged over +-this many tokens (0: the paper's
            single positions, which on 64 rows swung by up to 0.4 nats between neighbouring checkpoints here).
        repeat_len / repeat_batch: the repeated-random-token prompts of the head scores.
        synthetic: train on repeated random sequences instead of text (the quick test's setting).
        seed: seeds initialisation, data order and the probe prompts (all drawn on the CPU, so a run on
            another device sees the same data and the same initial weights).
        positions: ``"learned"`` (GPT-2's absolute position embeddings added to the residual stream),
            ``"shortformer"`` (GPT-2 with fixed sinusoidal positions added to the queries' and keys' input
            only, Press et al. 2021; the residual stream carries tokens only, like TransformerLens's
            ``positional_embedding_type="shortformer"``) or ``"rotary"`` (a Llama attention stack: rotary
            positions, RMSNorm, no biases). On prose, shortformer positions grew the
            previous-token head fastest here (README).
        device: where the model trains and is scored (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...). One CPU
            thread here trains the default model at 13-18k tokens a second; a GPU is for larger models,
            longer runs and larger corpora.
    """

    corpus: tuple[str, ...] = ("pysource",)
    vocab: int = 1024
    context_len: int = 512
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 2
    steps: int = 4000
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    eval_every: int = 250
    eval_contexts: int = 256
    icl_early: int = 50
    icl_late: int = 500
    icl_window: int = 5
    repeat_len: int = 25
    repeat_batch: int = 32
    synthetic: bool = False
    seed: int = 0
    positions: str = "shortformer"
    device: str = "cpu"
    tokenizer: str = "bpe"

    def check(self) -> None:
        """Raises InputError naming the bad field, or a device that is not a device or is not here."""
        _check_device(self.device)
        if self.tokenizer not in ("bpe", "smollm2"):
            raise InputError(f"tokenizer must be 'bpe' (trained on the corpora) or 'smollm2' (the default model's, "
                             f"remapped), got {self.tokenizer!r}.")
        if not self.synthetic and self.tokenizer == "bpe" and self.vocab < 258:
            raise InputError(f"a BPE vocabulary needs >= 258 ids (1 special + 256 bytes + merges), got {self.vocab}; "
                             "raise --vocab or use --tokenizer smollm2.")
        if self.positions not in POSITIONS:
            raise InputError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}.")
        for name in ("vocab", "context_len", "d_model", "n_heads", "steps", "batch", "eval_every", "n_layers"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.d_model % self.n_heads:
            raise InputError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}.")
        if not self.synthetic and not 0 < self.icl_early < self.context_len:
            raise InputError(f"icl_early must lie inside the context (1..{self.context_len - 1}), got {self.icl_early}.")
        if 2 * self.repeat_len + 1 > self.context_len:
            raise InputError(f"repeat_len {self.repeat_len} does not fit twice in context_len {self.context_len}.")


#: The quick setting: a trigram-language sequence repeated after a filler; a previous-token head and an
#: induction head form in about 1,000 of its 2,000 steps (about a minute on one CPU thread).
SYNTHETIC = InductionConfig(synthetic=True, vocab=64, context_len=97, repeat_len=8, d_model=64, n_heads=4, steps=2000,
                            batch=32, lr=3e-3, warmup=20, eval_every=250, repeat_batch=16, positions="learned")
