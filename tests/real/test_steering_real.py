"""Steering on the default real model (SmolLM2-135M-Instruct): a data-chosen SAE latent and a
contrastive (CAA) sentiment vector each move the next-token distribution by a measured margin.

The SAE test needs a trained dictionary at ``MECHSCOPE_STEERING_SAE`` (default
``/work/runs/sae-smollm2-L15``: TopK k=32, d_sae 4608, ``blocks.15.hook_resid_post``) and skips
without one; the CAA test needs nothing but the model. Numbers measured on this machine are in the
comments (fp32, CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mechscope.dictionaries import Splice, load_dictionary
from mechscope.features.generation import compare_generations
from mechscope.features.steering import (
    add_directions,
    contrastive_direction,
    decoder_direction,
    measure_steering,
    promoted_tokens,
    steer_latents,
)

pytestmark = pytest.mark.real
torch.set_num_threads(1)

SAE_DIR = Path(os.environ.get("MECHSCOPE_STEERING_SAE", "/work/runs/sae-smollm2-L15"))

PARIS = ["The Eiffel Tower is in Paris", "I flew to Paris last summer", "The capital of France is Paris",
         "We spent a week in Paris"]
OTHER = ["The weather today is cold and rainy", "She opened the book and began to read",
         "My dog likes to run in the park"]
CALIBRATION = ["I went on holiday to", "My favourite city is", "Next year we will travel to", "She was born in"]
HELD_OUT = ["We took the train to", "He moved to", "The conference was held in", "They live in"]


def test_sae_latent_found_by_data_steers_next_token_and_generation(real_model):
    if not (SAE_DIR / "cfg.json").exists():
        pytest.skip(f"no SAE at {SAE_DIR} (set MECHSCOPE_STEERING_SAE to a dictionary folder for "
                    "blocks.15.hook_resid_post of SmolLM2-135M)")
    model = real_model
    sae = load_dictionary(SAE_DIR)
    site = f"{sae.cfg.hook_out}.sae.hook_sae_acts_post"

    # 1. the latent: largest mean activation on " Paris" tokens, relative to ordinary text
    on_paris, elsewhere = [], []
    for text in PARIS + OTHER:
        tokens = model.to_tokens(text)
        _, cache = model.run(tokens, saes=[Splice(sae, error_term=True)], cache=[site])
        acts = cache[site][0]
        if text in PARIS:
            on_paris.append(acts[model.to_str_tokens(tokens).index(" Paris")])
        else:
            elsewhere.append(acts.mean(0))
    on_paris, elsewhere = torch.stack(on_paris), torch.stack(elsewhere)
    latent = int((on_paris.mean(0) - elsewhere.mean(0)).argmax())
    natural = float(on_paris[:, latent].mean())  # measured: latent 8, 6.40 on " Paris", 0 elsewhere
    assert bool((on_paris[:, latent] > 0).all()) and float(elsewhere[:, latent].mean()) < 0.1 * natural
    value = 6.0 * natural  # steering strength: ~6x the latent's natural activation (Templeton et al. use 5-10x)

    # 2. the tokens its decoder direction promotes through W_U, raised at the next position
    promoted = [i for i, _, _ in promoted_tokens(model, decoder_direction(sae, latent), k=5)]
    add = measure_steering(model, CALIBRATION, steer_latents(sae, {latent: value}, mode="add"), torch.arange(
        model.cfg.d_vocab))
    mean_promoted = float(add.mean_delta_logprob[promoted].mean())
    print(f"latent {latent}: natural {natural:.2f}, steer {value:.1f}; W_U-promoted "
          f"{[model.tokenizer.decode([i]) for i in promoted]}: mean delta log p {mean_promoted:+.2f} nats")
    assert mean_promoted > 1.0  # measured +3.8 nats

    # 3. the tokens it raises most on calibration prompts are raised on held-out prompts, by add and clamp
    targets = add.mean_delta_logprob.topk(3).indices
    for mode in ("add", "clamp"):
        held = measure_steering(model, HELD_OUT, steer_latents(sae, {latent: value}, mode=mode), targets)
        print(f"{mode}: targets {[model.tokenizer.decode([i]) for i in targets.tolist()]}, held-out delta log p "
              f"{held.delta_logprob.mean():+.2f} (min {held.delta_logprob.min():+.2f}) nats, delta p "
              f"{held.delta_prob.mean():+.4f}")
        assert float(held.delta_logprob.min()) > 1.0  # measured min +4.5, mean +7.1 nats (add)

    # 4. generation with the KV cache: the continuation changes
    base, steered = compare_generations(model, HELD_OUT[1], steer_latents(sae, {latent: value / 2}, mode="clamp"),
                                        max_new_tokens=12)
    print(f"unsteered: {base!r}\nsteered:   {steered!r}")
    assert steered != base


POSITIVE = ["I love this", "I really love it", "This is wonderful", "What a great day", "I adore this film",
            "She loves the song"]
NEGATIVE = ["I hate this", "I really hate it", "This is terrible", "What an awful day", "I loathe this film",
            "She hates the song"]
REVIEWS = ["I think this movie is", "Honestly, the food here is", "My opinion of the book: it is",
           "The concert last night was"]
GOOD, BAD = [" great", " good", " wonderful", " amazing"], [" terrible", " bad", " awful", " boring"]


def test_contrastive_sentiment_vector_moves_good_vs_bad_tokens(real_model):
    model = real_model
    dirs = contrastive_direction(model, POSITIVE, NEGATIVE, 10)  # blocks.10.hook_resid_post, norm ~22
    margins = {}
    for scale in (2.0, -2.0):
        eff = measure_steering(model, REVIEWS, add_directions(dirs, scale=scale), GOOD + BAD)
        # per prompt: change in (mean log p(good) - mean log p(bad)), nats
        margins[scale] = eff.delta_logprob[:, :4].mean(1) - eff.delta_logprob[:, 4:].mean(1)
        print(f"scale {scale:+}: delta log p good {eff.delta_logprob[:, :4].mean():+.2f}, bad "
              f"{eff.delta_logprob[:, 4:].mean():+.2f}, margin per prompt {margins[scale].tolist()}")
    assert float(margins[2.0].min()) > 1.0  # measured min +2.5 nats
    assert float(margins[-2.0].max()) < -1.0  # measured max -4.1 nats
    base, steered = compare_generations(model, REVIEWS[0], add_directions(dirs, scale=-4.0), max_new_tokens=12)
    print(f"unsteered: {base!r}\nsteered:   {steered!r}")
    assert steered != base
