"""Dictionary diffing (mechscope.diff.dictionary): a crosscoder and a diff-SAE trained on a tiny base model and a
copy whose embedding of one token moved far along a random direction, so the fine-tune's only change at
``blocks.0.hook_resid_pre`` is planted at that token.

Claims tested: the diff-SAE's top latent fires exactly where the planted token is and its decoder points along
the planted direction; the crosscoder's rows equal the crosscoder analysis run by hand (model_specific_latents),
with Latent Scaling ratios, the spurious flag and JSON-ready contexts; ``diff_models(dictionary=...)``
carries the latents into diff.json and the HTML report; bad input (kind, layer, too few tokens) names the fix;
the CLI trains and saves the dictionary.
"""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.errors import InputError
from mechscope.diff import dictionary_diff, diff_models
from mechscope.report.diff import render_diff_html
from tests.unit.test_diff import TEXTS, _model

TOKEN = 7  # the token whose embedding the "fine-tune" moved
SITE = "blocks.0.hook_resid_pre"


def _docs(n: int = 96, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Random token rows (ids 4..127) with the planted token at about 10% of positions."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, 128, (n, length), generator=g)
    rows[torch.rand(n, length, generator=g) < 0.1] = TOKEN
    return list(rows)


@pytest.fixture(scope="module")
def pair():
    base = _model()
    tuned = _model()
    g = torch.Generator().manual_seed(5)
    emb = tuned.hf.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=g)
    v = 20 * emb[TOKEN].norm() * v / v.norm()  # far: the tuned model's token-7 embedding is mostly v
    with torch.no_grad():
        emb[TOKEN] += v
    return base, tuned, v


def _focus_token(ctx: dict) -> str:
    return ctx["text"].split("«", 1)[1].split("»", 1)[0]


def test_diff_sae_top_latent_is_the_planted_token(pair):
    base, tuned, v = pair
    dd = dictionary_diff(base, tuned, _docs(), kind="diff-sae", site=SITE, d_sae=16, k=1, n_steps=300,
                         batch_rows=256, skip_first=0, distinct=False, progress=False)
    assert dd.kind == "diff-sae" and dd.site == SITE and dd.n_rows == 96 * 24
    top = dd.latents[0]
    word = base.tokenizer.decode([TOKEN])
    assert top["contexts"] and all(_focus_token(c) == word for c in top["contexts"])
    share = float(torch.stack(_docs()).eq(TOKEN).float().mean())
    assert top["frequency"] == pytest.approx(share, abs=0.01)  # fires on every planted token and nowhere else
    d = dd.dictionary.W_dec[top["latent"]].detach()
    assert torch.nn.functional.cosine_similarity(d, v, dim=0).abs() > 0.99
    assert dd.stats["fvu"]["diff"] < 0.01
    json.dumps(dd.to_dict())


def test_crosscoder_latents_equal_the_analysis_run_by_hand(pair):
    # Random tiny models have no sparse structure for a crosscoder to find (the recovery of planted shared and
    # model-specific directions is tested on synthetic data in test_crosscoder); here the wiring is checked:
    # the rows equal model_specific_latents on the same crosscoder and paired activations.
    from mechscope.dictionaries.crosscoder_analysis import model_specific_latents
    from mechscope.diff.dictionary import distinct_rows
    from mechscope.training.crosscoder import paired_activations

    base, tuned, _ = pair
    dd = dictionary_diff(base, tuned, _docs(), kind="crosscoder", site=SITE, d_sae=64, k=4, n_steps=200,
                         batch_rows=256, skip_first=0, specific=0.51, spurious_at=0.4, top=64, progress=False)
    paired = distinct_rows(paired_activations(base, tuned, _docs(), SITE, skip_first=0, progress=False))
    assert dd.n_rows == len(paired) < dd.stats["n_rows_all"] == 96 * 24  # some random rows open alike
    want = model_specific_latents(dd.dictionary, paired, specific=0.51, tokenizer=base.tokenizer)
    assert dd.latents and [r["latent"] for r in dd.latents] == [r["latent"] for r in want]
    for got, w in zip(dd.latents, want):
        assert got["relative_norm"] == pytest.approx(w["relative_norm"]) and got["relative_norm"] > 0.51
        assert got["nu_eps"] == pytest.approx(w["nu_eps"], nan_ok=True)
        assert [c["text"] for c in got["contexts"]] == [c.text for c in w["contexts"]]
        assert got["spurious"] == (max(w["nu_r"], w["nu_eps"]) >= 0.4)
    assert dd.stats["classes"]["tuned_only"] == len(want) and set(dd.stats["fvu"]) == {"base", "tuned"}
    assert dd.stats["relative_norm_max"] == pytest.approx(max(w["relative_norm"] for w in want))
    assert -1 <= dd.stats["decoder_cosine_median"] <= 1
    json.dumps(dd.to_dict())


def test_diff_models_carries_the_latents_into_json_and_html(pair):
    base, tuned, _ = pair
    res = diff_models(base, tuned, TEXTS, n_boot=20, top_n=5, progress=False, dictionary="diff-sae",
                      dictionary_texts=_docs(), dictionary_options={"site": SITE, "d_sae": 16, "k": 1, "n_steps": 100,
                                                                    "batch_rows": 256, "skip_first": 0})
    d = json.loads(res.to_json())
    assert d["dictionary"]["kind"] == "diff-sae" and d["latents"] and "latents" not in d["dictionary"]
    assert d["settings"]["dictionary"] == "diff-sae" and "dictionary" in d["seconds"]
    page = render_diff_html(d)
    section = page.split('<section id="latents">', 1)[1].split("</section>", 1)[0]
    assert "diff-sae at blocks.0.hook_resid_pre" in section and "mean contribution" in section
    assert "r (ratio)" not in section
    plain = diff_models(base, tuned, TEXTS, n_boot=20, top_n=5, progress=False).to_dict()
    assert "latents" not in plain and "dictionary" not in plain


def test_bad_input_names_the_fix(pair):
    base, tuned, _ = pair
    with pytest.raises(InputError, match="kind must be one of"):
        dictionary_diff(base, tuned, _docs(4), kind="sae", progress=False)
    with pytest.raises(InputError, match="layer 9 is out of range"):
        dictionary_diff(base, tuned, _docs(4), site=9, progress=False)
    with pytest.raises(InputError, match="fewer than one training batch"):
        dictionary_diff(base, tuned, _docs(4), site=1, batch_rows=1024, progress=False)


def test_cli_trains_and_saves_the_dictionary(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app
    from tests.unit.test_diff import saved_pair

    b, t = saved_pair(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(80)) + "\n")
    common = ["diff", str(b), str(t), "--texts", str(texts), "--split-lines", "--threads", "1", "--n-boot", "20",
              "--n", "4"]
    args = [*common, "--out", str(tmp_path / "out"), "--dictionary", "crosscoder", "--dict-layer", "1",
            "--dict-size", "64", "--dict-k", "4", "--dict-steps", "20"]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "crosscoder at blocks.1.hook_resid_post" in r.output
    from mechscope.dictionaries.crosscoder import load_crosscoder

    cc = load_crosscoder(tmp_path / "out" / "crosscoder")
    assert cc.cfg.d_sae == 64 and cc.cfg.hook == "blocks.1.hook_resid_post"
    d = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert d["dictionary"]["stats"]["n_steps"] == 20
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "bad"), "--dictionary", "sae"])
    assert r.exit_code != 0 and "crosscoder, diff-sae" in r.output
    assert not (tmp_path / "bad").exists()


def test_repeated_contexts_are_read_once(pair):
    from mechscope.diff.dictionary import distinct_rows
    from mechscope.training.crosscoder import paired_activations

    base, tuned, _ = pair
    prefix = torch.tensor([20, 21, 22, 23])
    docs = [torch.cat([prefix, d[:6]]) for d in _docs(8)]  # a shared 4-token "system prompt"
    paired = paired_activations(base, tuned, docs, SITE, skip_first=0, progress=False)
    kept = distinct_rows(paired)
    assert len(paired) == 80 and len(kept) == 80 - 7 * 4  # the prefix's rows once, every later row kept
    keys = [tuple(kept.tokens[d][: p + 1].tolist()) for d, p in zip(kept.doc.tolist(), kept.pos.tolist())]
    assert len(set(keys)) == len(keys)
    first = (paired.doc == 0)
    assert torch.equal(kept.base[:10], paired.base[first])  # document 0 whole, rows in order
    assert torch.equal(kept.tuned[10:16], paired.tuned[paired.doc == 1][4:])
