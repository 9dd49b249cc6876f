"""Dictionary evaluation against a naive recomputation of every metric from its definition (REFERENCE.md):
FVU relative to the mean (not zero), CE loss recovered, delta LM loss, KL, L0, dead/dense fractions."""

from __future__ import annotations

import pytest
import torch

from mechscope.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.evals import evaluate_dictionary
from mechscope.hooks.interventions import Replace
from tests.conftest import tiny_hooked

HOOK = "blocks.0.hook_resid_post"


def naive_metrics(model, d, contexts, batch, skip=1):
    ys, recs, acts = [], [], []
    ce = {"clean": [], "sae": [], "zero": []}
    kl = []
    per_batch = []
    for s in range(0, contexts.shape[0], batch):
        toks = contexts[s:s + batch]
        logits, cache = model.run(toks, cache=[HOOK])
        y = cache[HOOK][:, skip:].reshape(-1, 64)
        a = d.encode(y)
        r = d.decode(a)
        ys.append(y), recs.append(r), acts.append(a)
        per_batch.append(float((r - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()))

        def splice(v):
            out = v.clone()
            out[:, skip:] = d(v[:, skip:])
            return out

        runs = {"clean": logits, "sae": model.run(toks, interventions=[Replace(HOOK, value=splice)]).logits,
                "zero": model.run(toks, interventions=[Replace(HOOK, value=lambda v: torch.cat(
                    [v[:, :skip], torch.zeros_like(v[:, skip:])], 1))]).logits}
        for k, lg in runs.items():
            lp = lg[:, skip:-1].log_softmax(-1)
            ce[k].append(-lp.gather(-1, toks[:, skip + 1:, None]).squeeze(-1).flatten())
        p = runs["clean"][:, skip:-1].log_softmax(-1)
        q = runs["sae"][:, skip:-1].log_softmax(-1)
        kl.append((p.exp() * (p - q)).sum(-1).flatten())
    y, r, a = torch.cat(ys), torch.cat(recs), torch.cat(acts)
    ce = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    density = (a > 0).float().mean(0)
    return {
        "fvu": float((r - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()),
        "fvu_vs_zero": float((r - y).pow(2).sum() / y.pow(2).sum()),
        "fvu_batch_mean": sum(per_batch) / len(per_batch),
        "l0": float((a > 0).float().sum(-1).mean()),
        "ce_clean": ce["clean"], "ce_with_dictionary": ce["sae"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "kl_to_clean": float(torch.cat(kl).mean()),
        "dead_fraction": float((density == 0).float().mean()), "dense_fraction": float((density > 0.1).float().mean()),
        "cosine_similarity": float(torch.nn.functional.cosine_similarity(r, y, dim=-1).mean()),
        "n_tokens": y.shape[0],
    }


@pytest.mark.parametrize("arch,k", [("topk", 8), ("relu", None)])
@torch.no_grad()
def test_evaluation_equals_naive_definitions(arch, k):
    model = tiny_hooked("llama")
    d = SparseDictionary(DictionaryConfig(arch, 64, 96, HOOK, k=k)).initialize(3)
    with torch.no_grad():
        d.b_enc.fill_(-0.05)  # some latents stay dead on this little text
    contexts = torch.randint(0, 128, (10, 12), generator=torch.Generator().manual_seed(1))
    e = evaluate_dictionary(model, d, contexts, batch_contexts=4, progress=False)
    ref = naive_metrics(model, d, contexts, 4)
    for key, want in ref.items():
        if key != "fvu_vs_zero":
            assert getattr(e, key) == pytest.approx(want, rel=1e-4, abs=1e-6), key
    assert e.explained_variance == pytest.approx(1 - ref["fvu"], rel=1e-4, abs=1e-6)
    assert e.fvu != pytest.approx(ref["fvu_vs_zero"], rel=1e-3)  # measured against the mean, not zero
    assert e.delta_lm_loss == pytest.approx(ref["ce_with_dictionary"] - ref["ce_clean"], rel=1e-4)
    assert sum(e.density_histogram) == round(96 * (1 - e.dead_fraction))


@torch.no_grad()
def test_outlier_tokens_are_reported_apart():
    """A token with a massive norm holds most of the variance: fvu_without_outliers leaves it out."""
    model = tiny_hooked("llama")
    d = SparseDictionary(DictionaryConfig("topk", 64, 96, HOOK, k=8)).initialize(3)
    contexts = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    base = evaluate_dictionary(model, d, contexts, batch_contexts=4, progress=False)
    assert base.outlier_fraction == 0 and base.fvu_without_outliers == pytest.approx(base.fvu)
    big = torch.zeros(64)
    big[0] = 500.0

    def massive(v):
        v = v.clone()
        v[0, 5] += big
        return v

    with model.hooks(functions={HOOK: massive}):
        e = evaluate_dictionary(model, d, contexts, batch_contexts=4, progress=False)
    assert e.outlier_fraction == pytest.approx(1 / e.n_tokens)
    assert e.outlier_variance_share > 0.9
    assert e.fvu_without_outliers == pytest.approx(base.fvu, rel=0.05)  # the other tokens are as before
