"""The IOI steps of the report: logit difference, accuracy and direct logit attribution on every prompt, and
activation and attribution patching of every kind on an aligned subset (normalised logit-difference metric).

References:
    Wang et al. 2022, "Interpretability in the Wild" (IOI; logit difference, normalised patching metric).
    Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale".
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from mechscope.report.io import pearson

def top_heads(scores: torch.Tensor, k: int = 5) -> list[dict]:
    n_heads = scores.shape[1]
    vals, idx = scores.flatten().float().topk(min(k, scores.numel()))
    return [{"head": f"L{int(i) // n_heads}H{int(i) % n_heads}", "layer": int(i) // n_heads, "head_index": int(i) % n_heads,
             "score": float(v)} for v, i in zip(vals, idx)]


def progress_bar(it, desc: str, progress: bool, total: int | None = None):
    return tqdm(it, desc=desc, total=total, disable=not progress, leave=False, dynamic_ncols=True)


def _forward_last(model, tokens: torch.Tensor, chunk: int, desc: str, progress: bool) -> torch.Tensor:
    """Logits at the last position, [batch, 1, d_vocab], computed in chunks under a progress bar."""
    outs = []
    starts = range(0, tokens.shape[0], chunk)
    for s in progress_bar(starts, desc, progress, total=len(starts)):
        outs.append(model.run(tokens[s: s + chunk], logits_to_keep=1).logits)
    return torch.cat(outs)


def ioi_section(model, ds, *, chunk: int = 16, progress: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Logit difference, accuracy and DLA on every prompt. Returns (section, clean_logits, corrupt_logits)."""
    from mechscope.analysis import direct_logit_attribution, logit_diff

    clean_logits = _forward_last(model, ds.clean_tokens, chunk, "IOI clean", progress)
    corrupt_logits = _forward_last(model, ds.corrupt_tokens, chunk, "IOI corrupted", progress)
    ld = logit_diff(clean_logits, ds.answer_tokens)
    ld_corrupt = logit_diff(corrupt_logits, ds.answer_tokens)

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("embed", "attn", "heads", "mlp", "bias", "logit_diff", "total")}
    starts = range(0, ds.clean_tokens.shape[0], chunk)
    for s in progress_bar(starts, "DLA", progress, total=len(starts)):
        r = direct_logit_attribution(model, ds.clean_tokens[s: s + chunk], ds.answer_tokens[s: s + chunk])
        for k in parts:
            parts[k].append(r.total() if k == "total" else getattr(r, k))
    dla = {k: torch.cat(v) for k, v in parts.items()}
    tok = model.tokenizer
    section = {
        "n_prompts": int(ds.clean_tokens.shape[0]),
        "n_tokens": int(ds.clean_tokens.shape[1]),
        "templates": list(ds.templates),
        "prompts": list(ds.prompts),
        "corrupt_prompts": list(ds.corrupt_prompts),
        "io_names": list(ds.io_names),
        "s_names": list(ds.s_names),
        "answer_str": [[tok.decode([int(a)]) for a in row] for row in ds.answer_tokens] if tok is not None else None,
        "logit_diff": ld,
        "corrupt_logit_diff": ld_corrupt,
        "mean_logit_diff": float(ld.mean()),
        "std_logit_diff": float(ld.std()) if ld.numel() > 1 else 0.0,
        "median_logit_diff": float(ld.median()),
        "min_logit_diff": float(ld.min()),
        "max_logit_diff": float(ld.max()),
        "accuracy": float((ld > 0).float().mean()),
        "mean_corrupt_logit_diff": float(ld_corrupt.mean()),
        "corrupt_accuracy": float((ld_corrupt > 0).float().mean()),
        "dla": {
            "embed": float(dla["embed"].mean()),
            "bias": float(dla["bias"].mean()),
            "attn": dla["attn"].mean(0),
            "mlp": dla["mlp"].mean(0),
            "heads": dla["heads"].mean(0),
            "top_heads": top_heads(dla["heads"].mean(0)),
            "bottom_heads": top_heads(-dla["heads"].mean(0)),
            "max_abs_total_minus_logit_diff": float((dla["total"] - dla["logit_diff"]).abs().max()),
            "max_abs_logit_diff_minus_forward": float((dla["logit_diff"] - ld.to(dla["logit_diff"].dtype)).abs().max()),
        },
    }
    for row in section["dla"]["bottom_heads"]:
        row["score"] = -row["score"]
    return section, clean_logits, corrupt_logits


KINDS = ("resid_pre", "attn_out", "mlp_out", "heads")


def aligned_group(ds) -> list[int]:
    """The largest group of prompts with IO, S1 and S2 at the same positions (IO and S1 may swap: ABBA/BABA)."""
    w = {k: v.tolist() for k, v in ds.word_idx.items()}
    groups: dict[tuple, list[int]] = {}
    for i in range(len(ds.prompts)):
        key = (min(w["IO"][i], w["S1"][i]), max(w["IO"][i], w["S1"][i]), w["S2"][i])
        groups.setdefault(key, []).append(i)
    return max(groups.values(), key=len)


def patch_subset(ds, n: int) -> tuple[list[int], bool]:
    """Indices of ``n`` prompts for the patching sweeps, and whether their names are aligned.

    A residual-stream patching map is read column by column, so its prompts should have their names
    at the same positions (see :func:`aligned_group`); aligned prompts also share the longest prefix
    with their corrupted versions, which activation patching computes once. When the largest aligned
    group has fewer than ``n`` prompts: the first ``n`` prompts and ``aligned=False``.
    """
    best = aligned_group(ds)
    if len(best) >= n:
        return best[:n], True
    return list(range(n)), False


def position_labels(ds, rows: list[int], str_tokens: list[str]) -> list[str]:
    """Token of the first prompt at each position, with the IOI roles found there (e.g. " John (S2)")."""
    roles: dict[int, set[str]] = {}
    for role, idx in ds.word_idx.items():
        for i in rows:
            roles.setdefault(int(idx[i]), set()).add(role)
    return [f"{t} ({'/'.join(sorted(roles[p]))})" if p in roles else t for p, t in enumerate(str_tokens)]


def patching_section(model, ds, clean_logits, corrupt_logits, n: int, *, progress: bool = True) -> dict:
    """Activation and attribution patching of every kind on ``n`` aligned prompts (see :func:`patch_subset`)."""
    from mechscope.analysis import activation_patching, attribution_patching, make_metric

    rows, aligned = patch_subset(ds, n)
    sel = torch.tensor(rows, dtype=torch.long)
    clean, corrupt, answers = ds.clean_tokens[sel], ds.corrupt_tokens[sel], ds.answer_tokens[sel]
    metric = make_metric("logit_diff", clean_logits[sel], corrupt_logits[sel], answers)
    act, attr, times = {}, {}, {}
    for kind in KINDS:
        t = time.perf_counter()
        act[kind] = activation_patching(model, clean, corrupt, metric, kind=kind, progress=progress)
        times[f"activation_{kind}"] = time.perf_counter() - t
    for kind in progress_bar(KINDS, "attribution patching", progress):
        t = time.perf_counter()
        attr[kind] = attribution_patching(model, clean, corrupt, metric, kind=kind)
        times[f"attribution_{kind}"] = time.perf_counter() - t

    def res(r) -> dict:
        return {"values": r.values, "row_labels": list(r.row_labels),
                "col_labels": list(r.col_labels) if r.col_labels is not None else None, "method": r.method,
                "metric": r.metric}

    str_tokens = model.to_str_tokens(clean[0]) if model.tokenizer is not None else [str(int(t)) for t in clean[0]]
    out = {
        "n_prompts": n,
        "prompt_indices": rows,
        "positions_aligned": aligned,
        "metric": metric.name,
        "metric_note": "normalised logit difference (m_patched − m_corrupt) / (m_clean − m_corrupt): clean = 1, corrupted = 0",
        "raw_clean_logit_diff": metric.raw_clean,
        "raw_corrupt_logit_diff": metric.raw_corrupt,
        "str_tokens": str_tokens,
        "activation": {k: res(v) for k, v in act.items()},
        "attribution": {k: res(v) for k, v in attr.items()},
        "correlation": {k: pearson(act[k].values, attr[k].values) for k in KINDS},
        "top_heads": top_heads(act["heads"].values),
        "timings_s": times,
    }
    out["activation"]["resid_pre"]["col_labels"] = position_labels(ds, rows, str_tokens)
    return out
