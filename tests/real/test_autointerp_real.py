"""Auto-interpretation on the default real model (SmolLM2-135M-Instruct as explainer and scorer) and the
real layer-15 TopK SAE. A 135M model is a weak explainer and scorer, so only what must hold is asserted:
provenance, determinism, disjoint held-out sets, scores in [0, 1]. The "known token" sanity check (a label
naming a token-like latent's token) is reported as an expected failure when the scorer misses it."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from mechscope.features.autointerp import (
    Explanation, LocalChatBackend, _window, balanced_accuracy, explain, sample_detection_set, score_detection,
)

pytestmark = pytest.mark.real
SAE = Path("/work/runs/sae-smollm2-L15")
HOOK = "blocks.15.hook_resid_post"
N_CTX = 120
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def latents(real_model):
    """(acts [n_ctx, 63, n_candidates] without the BOS column, candidate latent ids, token strings)."""
    if not (SAE / "cfg.json").is_file():
        pytest.skip(f"{SAE} is missing (a trained SAE, not part of the repository)")
    from mechscope.data import corpus_tokens
    from mechscope.dictionaries import load_dictionary

    d = load_dictionary(SAE)
    toks = corpus_tokens(["pydoc", "wikipedia", "austen", "shakespeare"], real_model.tokenizer, 64, "eval").tokens[:N_CTX]
    chunks = []
    with torch.no_grad():
        for b in toks.split(40):
            _, cache = real_model.run(b, cache=[HOOK], stop_at_layer=16)
            chunks.append(d.encode(cache[HOOK])[:, 1:])
    acts = torch.cat(chunks)
    density = (acts > 0).float().mean((0, 1))
    n_active = (acts.amax(1) > 0).sum(0)
    ok = (density > 1e-3) & (density < 5e-2) & (n_active >= 25) & (n_active <= N_CTX - 20)
    ids = ok.nonzero().flatten()
    strs = [[real_model.tokenizer.decode([t]) for t in row[1:].tolist()] for row in toks]
    return acts[:, :, ids].clone(), ids.tolist(), strs


@pytest.fixture(scope="module")
def backend(real_model):
    return LocalChatBackend(real_model, batch_size=10)


FAST = dict(max_examples=6, context_tokens=16, max_new_tokens=12)


def test_explain_and_score_a_real_latent(latents, backend):
    acts, ids, strs = latents
    assert ids, "no latent with density in (1e-3, 5e-2) on these contexts"
    j = len(ids) // 2  # a fixed, arbitrary pick
    ds = sample_detection_set(acts[:, :, j], strs, n_train=6, n_pos=10, n_neg=10, seed=0)
    assert not set(ds.train_idx) & set(ds.pos_idx) and not set(ds.train_idx) & set(ds.neg_idx)
    assert not {e.fingerprint() for e in ds.train} & {e.fingerprint() for e in (*ds.positives, *ds.negatives)}

    e = explain(backend, ds.train, latent=ids[j], **FAST)
    again = explain(backend, ds.train, latent=ids[j], **FAST)
    assert e.label == again.label and e.prompt == again.prompt  # greedy decoding is deterministic
    assert e.label and len(e.label) <= 80 and e.explainer == "local:SmolLM2-135M-Instruct" and e.latent == ids[j]
    assert "<<" in e.prompt and e.extra["reply"] and e.date
    s = score_detection(backend, e, ds.positives, ds.negatives, context_tokens=16)
    assert 0.0 <= s.balanced_accuracy <= 1.0 and 0.0 <= s.auroc <= 1.0 and (s.n_pos, s.n_neg) == (10, 10)
    assert s.scorer == backend.name and len(s.predictions) == 20
    assert all(p.evidence is not None and (p.evidence > 0) == p.predicted for p in s.predictions)
    print(f"\nlatent {ids[j]}: label {e.label!r}, balanced accuracy {s.balanced_accuracy:.2f}, AUROC {s.auroc:.2f}")


def test_a_label_naming_a_token_like_latents_token(latents, backend):
    """Sanity: 'the token ";"' for a latent that fires on ';' should beat chance, if the scorer can read."""
    acts, ids, strs = latents
    best = None
    for j in range(len(ids)):
        a = acts[:, :, j]
        top = collections.Counter(strs[i][p] for i, p in a.nonzero().tolist()).most_common(1)[0][0]
        if len(top.strip()) != 1 or top.strip().isalnum():
            continue  # punctuation-like tokens only: unambiguous to name
        try:
            ds = sample_detection_set(a, strs, n_train=5, n_pos=10, n_neg=10, seed=0)
        except Exception:
            continue
        held = [*ds.positives, *ds.negatives]
        truth = [True] * 10 + [False] * 10
        rule = balanced_accuracy(truth, [top in "".join(_window(e, 16)[0]) for e in held])[0]
        if best is None or rule > best[0]:
            best = (rule, j, top, ds)
    if best is None or best[0] < 0.85:
        pytest.skip("no punctuation-like latent whose token presence separates its held-out contexts")
    rule, j, top, ds = best
    e = Explanation(f'the token "{top.strip()}"', "manual", "", "", ids[j], {})
    s = score_detection(backend, e, ds.positives, ds.negatives, context_tokens=16)
    msg = (f"latent {ids[j]}: {e.label}: scorer balanced accuracy {s.balanced_accuracy:.2f} (AUROC {s.auroc:.2f}); "
           f"the token-presence rule gets {rule:.2f}")
    print("\n" + msg)
    if s.balanced_accuracy <= 0.6:
        pytest.xfail("SmolLM2-135M cannot tell whether a text holds a named token: " + msg)
