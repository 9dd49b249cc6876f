"""Do the diff-SAE's latents of the safety fine-tune read harmfulness? (issue 17, item 2 on SmolLM2)

    HF_HUB_OFFLINE=1 .venv/bin/python -u scripts/safety_diff_latents.py SAFETY_RUN DIFF_DIR OUT.json

DIFF_DIR is a ``mechscope diff --dictionary diff-sae`` run of the base model against SAFETY_RUN/planted/model. On
the recipe's held-out requests (54 harmful, 54 harmless, goals the fine-tune never saw), for each of the diff's
listed latents: its activation on ``tuned - base`` at the site, at the last prompt token (after the generation
prompt, where the answer starts), and the AUROC of harmful against harmless with a stratified bootstrap CI.
Controls: the projection of the same difference on 20 random unit directions (AUROC), and the raw difference's
norm.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechscope
from mechscope.core.io import write_json_atomic
from mechscope.dictionaries.loader import load_dictionary
from mechscope.safety.metrics import auroc_ci


@torch.no_grad()
def last_token(model, site: str, prompts: list[str]) -> torch.Tensor:
    """The site's activation at the last token of each chat prompt (generation prompt included), [n, d]."""
    tok = model.tokenizer
    rows = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        rows.append(model.run(ids, cache=[site]).cache[site][0, -1].float())
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("diff_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--base", default="smollm2-135m", help="the base model the diff was run against")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-random", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    d = json.loads((a.diff_dir / "diff.json").read_text())
    site = d["dictionary"]["site"]
    sae = load_dictionary(a.diff_dir / "diff-sae")
    evals = json.loads((a.run / "data" / "evals.json").read_text())["evals"]
    harmful, harmless = evals["harmful"], evals["harmless"]
    labels = [1] * len(harmful) + [0] * len(harmless)
    base, tuned = mechscope.load(a.base), mechscope.load(str(a.run / "planted" / "model"))
    diff = last_token(tuned, site, harmful + harmless) - last_token(base, site, harmful + harmless)
    acts = sae.encode(diff)
    rows = []
    for r in d["latents"]:
        j = r["latent"]
        ci = auroc_ci(acts[:, j], labels)
        rows.append({"latent": j, "auroc": ci.estimate, "low": ci.low, "high": ci.high,
                     "active_harmful": float((acts[: len(harmful), j] > 0).float().mean()),
                     "active_harmless": float((acts[len(harmful):, j] > 0).float().mean()),
                     "top_context": r["contexts"][0]["text"] if r["contexts"] else None})
    g = torch.Generator().manual_seed(0)
    rand = []
    for _ in range(a.n_random):
        v = torch.randn(diff.shape[1], generator=g)
        rand.append(auroc_ci(diff @ (v / v.norm()), labels).estimate)
    norm = auroc_ci(diff.norm(dim=1), labels)
    out = {"site": site, "n_harmful": len(harmful), "n_harmless": len(harmless), "latents": rows,
           "random_directions": {"auroc": rand, "max_abs_from_half": max(abs(x - 0.5) for x in rand)},
           "diff_norm": {"auroc": norm.estimate, "low": norm.low, "high": norm.high},
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out, a.out)
    for r in sorted(rows, key=lambda r: -abs(r["auroc"] - 0.5)):
        print(f"latent {r['latent']:5d}  AUROC {r['auroc']:.3f} [{r['low']:.3f}, {r['high']:.3f}]  active harmful "
              f"{r['active_harmful']:.2f} harmless {r['active_harmless']:.2f}  {r['top_context']!r}")
    print("random directions:", " ".join(f"{x:.2f}" for x in rand))
    print(f"||diff||: AUROC {norm.estimate:.3f} [{norm.low:.3f}, {norm.high:.3f}]; {out['seconds']} s")


if __name__ == "__main__":
    main()
