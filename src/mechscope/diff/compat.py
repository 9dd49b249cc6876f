"""Can two models be diffed? Same architecture (layers, widths, heads, vocabulary) and the same tokenizer.

Every comparison in :mod:`mechscope.diff` feeds the same token ids to both models and matches activations
site by site, so a second model with another shape or another tokenizer would give numbers that mean
nothing; :func:`check_comparable` refuses such a pair with one message naming every difference.
"""

from __future__ import annotations

from mechscope.core.errors import InputError

#: Strings both tokenizers must encode identically (a few scripts, digits, code, whitespace, a chat marker).
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # 12345",
    "  Zürich, naïve café — 東京 🙂",
    "<|im_start|>user\nhello<|im_end|>",
)


def _arch(model) -> dict[str, object]:
    c = model.cfg
    text = model.text_config
    return {
        "model_type": getattr(text, "model_type", None), "family": c.family, "n_layers": c.n_layers,
        "d_model": c.d_model, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "d_head": c.d_head,
        "d_mlp": c.d_mlp, "d_vocab": c.d_vocab,
    }


def _special(tok) -> dict[str, object]:
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id,
            "special tokens": sorted(map(str, tok.all_special_tokens))}


def _tokenizer_differences(tb, tt, probes) -> list[str]:
    diffs = []
    if len(tb) != len(tt):
        diffs.append(f"vocabulary size {len(tb)} != {len(tt)}")
    vb, vt = tb.get_vocab(), tt.get_vocab()
    if vb != vt:
        changed = [w for w in vb.keys() | vt.keys() if vb.get(w) != vt.get(w)]
        shown = ", ".join(repr(w) for w in sorted(changed)[:3])
        diffs.append(f"{len(changed)} vocabulary entries differ (e.g. {shown})")
    sb, st = _special(tb), _special(tt)
    for k in sb:
        if sb[k] != st[k]:
            diffs.append(f"{k}: {sb[k]} != {st[k]}")
    for p in probes:
        eb, et = tb(p)["input_ids"], tt(p)["input_ids"]
        if eb != et:
            diffs.append(f"{p!r} encodes to {eb[:8]}{'...' if len(eb) > 8 else ''} vs {et[:8]}"
                         f"{'...' if len(et) > 8 else ''}")
    return diffs


def check_comparable(base, tuned, *, probe_texts: tuple[str, ...] = PROBE_TEXTS) -> None:
    """Raise InputError unless ``base`` and ``tuned`` can be compared site by site on the same token ids.

    Checks the architecture (model_type, family, n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp,
    d_vocab) and, when both models carry a tokenizer, the tokenizers (vocabulary, special-token ids and
    strings, and the encodings of ``probe_texts``). A model without a tokenizer is compared on token ids only.

    Raises:
        InputError: naming each difference and the fix.
    """
    ab, at = _arch(base), _arch(tuned)
    arch = [f"{k} {ab[k]} != {at[k]}" for k in ab if ab[k] != at[k]]
    if arch:
        raise InputError(
            f"the models differ in architecture ({'; '.join(arch)}; base {base.cfg.name!r}, tuned {tuned.cfg.name!r}), "
            "so their weights and activations cannot be matched site by site. Diff a fine-tune against the model "
            "it was tuned from (same family and size).")
    tb, tt = base.tokenizer, tuned.tokenizer
    if tb is None or tt is None or tb is tt:
        return
    diffs = _tokenizer_differences(tb, tt, probe_texts)
    if diffs:
        raise InputError(
            f"the models' tokenizers differ ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}), so the same "
            "text would be different token ids in each. Load both with the same tokenizer (save the base's tokenizer "
            "into the tuned model's folder), or diff models that share one.")


__all__ = ["PROBE_TEXTS", "check_comparable"]
