"""The main job: run the standard analyses on one model and write results.json plus a self-contained HTML report.

Steps (each timed, each slow one with a progress bar):

1. load the model;
2. hook parity: max |Δ logit| between ``model.hf(tokens).logits`` and ``model.run(tokens)``, plain and
   with every hook cached;
3. logit lens of "The capital of France is" (target " Paris");
4. head-score atlas (induction, previous-token, duplicate-token) on repeated random tokens;
5. IOI on ``n_prompts`` templated prompts: logit difference, accuracy, corrupted logit difference,
   direct logit attribution;
6. activation patching (resid_pre x position, attn_out, mlp_out, heads) and attribution patching on a
   subset of ``patch_prompts`` prompts, with the normalised logit-difference metric.

References:
    Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
    GPT-2 small" (IOI; logit difference, normalised patching metric). Olsson et al. 2022, "In-context
    Learning and Induction Heads" (induction and previous-token heads). nostalgebraist 2020, "interpreting
    GPT: the logit lens". Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale".
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text
from tqdm.auto import tqdm

from mechscope.core.errors import InputError
from mechscope.report.io import jsonable, write_json_atomic, write_text_atomic
from mechscope.report.ioi_sections import aligned_group, ioi_section, patching_section, progress_bar, top_heads
from mechscope.report.render import render_html

#: Prompts of the hook-parity check: prose, the IOI form, code, and markup-like characters.
PARITY_PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def fibonacci(n):\n    return n if n < 2 else",
    '<b>Fish & chips</b> cost "£3" </script> today',
)

#: Published or previously measured numbers shown beside ours (quantity key -> reference rows).
REFERENCES = {
    "ioi_logit_diff": [
        {"value": 3.56, "model": "GPT-2 small", "source": "Wang et al. 2022, IOI templated prompts"},
        {"value": 5.4, "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md, 10 IOI prompts (+3.3..+6.7)"},
    ],
    "ioi_accuracy": [
        {"value": 0.993, "model": "GPT-2 small", "source": "Wang et al. 2022, IO preferred over S"},
        {"value": 1.0, "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md, 10 of 10 IOI prompts"},
    ],
    "lens_target_prob": [
        {"value": 0.77, "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md, p(' Paris')"},
    ],
    "top_induction": [
        {"value": "L18H6 (~0.92), L17H3, L17H4", "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md"},
    ],
    "top_previous_token": [
        {"value": "L16H0, L11H1, L2H1", "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md"},
    ],
    "repeat_loss": [
        {"value": "13.3 → 2.3", "model": "SmolLM2-135M-Instruct", "source": "mechscope REFERENCE.md, 50 random tokens repeated"},
    ],
}


@dataclass(frozen=True)
class ReportConfig:
    """What ``mechscope report`` runs.

    Attributes:
        model: built-in alias, local folder, .gguf file or hub id.
        out: output folder (created); receives ``report.html`` and ``results.json``.
        dtype: "float32" (default) or "bfloat16".
        n_prompts: IOI prompts for logit difference and accuracy (count).
        patch_prompts: IOI prompts (the first ones) used by the patching sweeps (count); None picks
            :attr:`DEFAULT_PATCH_PROMPTS`, capped at ``n_prompts``.
        seed: seed of the random-token sequences and of the IOI dataset.
        lens_prompt / lens_target: logit-lens prompt and the token whose probability is tracked.
        head_seq_len: length of each random half of the repeated sequences (tokens).
        head_batch: number of repeated sequences (count).
        sae: dictionary folders to add a sparse-dictionary section for (training curves, evaluation,
            latent density); empty for none.
        circuit: circuit folders (``mechscope circuit discover`` / ``evaluate``) to add a circuit section for
            (:mod:`mechscope.report.circuit_section`); empty for none.
    """

    #: Measured on the 2-core CPU with other jobs running (fp32): 12 prompts -> patching ~6 min of a
    #: ~9 min run; alone on the machine about a third of that.
    DEFAULT_PATCH_PROMPTS = 12

    model: str = "smollm2-135m"
    out: Path = Path("mechscope-report")
    dtype: str = "float32"
    n_prompts: int = 60
    patch_prompts: int | None = None
    seed: int = 0
    lens_prompt: str = "The capital of France is"
    lens_target: str = " Paris"
    head_seq_len: int = 50
    head_batch: int = 4
    sae: tuple[Path, ...] = ()
    circuit: tuple[Path, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sae", tuple(Path(p) for p in self.sae))
        object.__setattr__(self, "circuit", tuple(Path(p) for p in self.circuit))
        if self.n_prompts < 2:
            raise InputError(f"n_prompts must be at least 2, got {self.n_prompts}.")
        if self.patch_prompts is not None and not 1 <= self.patch_prompts <= self.n_prompts:
            raise InputError(f"patch_prompts must be in 1..n_prompts ({self.n_prompts}), got {self.patch_prompts}.")
        if self.head_seq_len < 4 or self.head_batch < 1:
            raise InputError(f"head_seq_len must be >= 4 and head_batch >= 1, got {self.head_seq_len}, {self.head_batch}.")

    @property
    def n_patch(self) -> int:
        return self.patch_prompts if self.patch_prompts is not None else min(self.DEFAULT_PATCH_PROMPTS, self.n_prompts)


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    json: Path


# -- steps ------------------------------------------------------------------------------------
class _Steps:
    """Times each step and prints one line per step (progress bars come from tqdm inside steps)."""

    def __init__(self, console: Console | None, total: int):
        self.console = console
        self.total = total
        self.i = 0
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[dict]:
        self.i += 1
        note: dict = {}
        if self.console:
            self.console.print(Text(f"[{self.i}/{self.total}] {title} …", style="bold"))
        t = time.perf_counter()
        yield note
        self.timings[key] = time.perf_counter() - t
        if self.console:
            line = f"      done in {self.timings[key]:.1f} s"
            if note.get("summary"):
                line += f": {note['summary']}"
            self.console.print(Text(line), soft_wrap=True)


def parity_check(model, prompts=PARITY_PROMPTS, *, progress: bool = True) -> dict:
    """Max |Δ logit| of ``model.run`` (no hooks, and every hook cached) against the plain HF forward.

    Returns:
        dict with ``max_abs_delta_plain`` / ``max_abs_delta_all_hooks`` (logit units; 0.0 means
        bit-identical), ``n_hooks_cached`` and a per-prompt breakdown.
    """
    rows = []
    n_cached = 0
    for prompt in progress_bar(prompts, "parity", progress):
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            ref = model.hf(tokens, use_cache=False).logits
        plain = model.run(tokens).logits
        full, cache = model.run(tokens, cache="*")
        n_cached = len(cache)
        rows.append({"prompt": prompt, "n_tokens": int(tokens.shape[1]),
                     "plain": float((ref - plain).abs().max()), "all_hooks": float((ref - full).abs().max())})
        del cache
    return {
        "prompts": list(prompts),
        "n_hooks_cached": n_cached,
        "max_abs_delta_plain": max(r["plain"] for r in rows),
        "max_abs_delta_all_hooks": max(r["all_hooks"] for r in rows),
        "per_prompt": rows,
    }


def lens_section(model, prompt: str, target: str | None, k: int = 5) -> dict:
    from mechscope.analysis import logit_lens

    r = logit_lens(model, prompt, target=target, k=k)
    return {
        "prompt": prompt,
        "str_tokens": model.to_str_tokens(prompt),
        "target": target,
        "target_token": r.target_token,
        "labels": list(r.labels),
        "top_tokens": [list(t) for t in r.top_tokens],
        "top_probs": r.top_probs,
        "target_prob": r.target_prob,
        "target_rank": r.target_rank,
    }


def head_section(model, *, seq_len: int, batch: int, seed: int, progress: bool = True) -> dict:
    """Head scores and the per-position loss on ``batch`` random sequences of ``seq_len`` tokens repeated once."""
    from mechscope.analysis import head_scores, repeated_random_tokens

    tokens = repeated_random_tokens(model, batch=batch, seq_len=seq_len, seed=seed)
    with tqdm(total=2, desc="head scores", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        scores = head_scores(model, tokens, seq_len=seq_len, batch=batch, seed=seed)
        bar.update()
        logits = model.run(tokens).logits.float()
        bar.update()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
    off = tokens.shape[1] - 2 * seq_len  # 1 with a BOS in front
    # predictions of tokens 2..L of each copy (the first token of a copy is unpredictable)
    first = nll[off: off + seq_len - 1]
    second = nll[off + seq_len: off + 2 * seq_len - 1]
    return {
        "seq_len": seq_len, "batch": batch, "seed": seed, "n_tokens": int(tokens.shape[1]),
        "scores": {k: v for k, v in scores.items()},
        "top": {k: top_heads(v) for k, v in scores.items()},
        "repeat_loss": {"per_position": nll, "first_copy": float(first.mean()), "second_copy": float(second.mean()),
                        "repeat_start": off + seq_len},
    }


def _versions() -> dict:
    import transformers

    import mechscope

    return {"mechscope": mechscope.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _comparisons(results: dict) -> list[dict]:
    """Rows of ours-vs-reference, for the quantities where a reference exists."""
    rows = []
    ioi = results.get("ioi") or {}
    lens = results.get("logit_lens") or {}
    hs = results.get("head_scores") or {}

    def add(key, quantity, ours):
        for ref in REFERENCES[key]:
            rows.append({"quantity": quantity, "ours": ours, **ref})

    if ioi:
        add("ioi_logit_diff", "IOI mean logit difference (nats)", round(ioi["mean_logit_diff"], 3))
        add("ioi_accuracy", "IOI accuracy (logit diff > 0)", round(ioi["accuracy"], 3))
    if lens.get("target_prob") is not None:
        add("lens_target_prob", f"p({lens.get('target_token')!r}) at the last layer", round(float(lens["target_prob"][-1]), 3))
    if hs:
        top = hs["top"]
        if "induction" in top:
            add("top_induction", "top induction heads", ", ".join(f"{r['head']} ({r['score']:.2f})" for r in top["induction"][:3]))
        if "previous_token" in top:
            add("top_previous_token", "top previous-token heads",
                ", ".join(f"{r['head']} ({r['score']:.2f})" for r in top["previous_token"][:3]))
        rl = hs.get("repeat_loss")
        if rl:
            add("repeat_loss", "loss first copy → repeat (nats)", f"{rl['first_copy']:.1f} → {rl['second_copy']:.1f}")
    return rows


def compute_results(cfg: ReportConfig, *, console: Console | None = None, progress: bool = True) -> dict:
    """Run every step of the report and return the JSON-ready results (see the module docstring)."""
    import mechscope
    from mechscope.data.ioi import make_ioi_dataset

    steps = _Steps(console, total=6 + bool(cfg.sae) + bool(cfg.circuit))
    started = _dt.datetime.now(_dt.timezone.utc)
    results: dict[str, Any] = {"schema": "mechscope.report/1"}

    with steps.step("load", f"load {cfg.model} ({cfg.dtype})") as note:
        model = mechscope.load(cfg.model, dtype=cfg.dtype)
        n_params = sum(p.numel() for p in model.hf.parameters())
        note["summary"] = f"{model.cfg.name}, {model.cfg.n_layers} layers, {n_params / 1e6:.1f} M parameters"

    with steps.step("parity", "hook parity against the plain transformers forward") as note:
        results["parity"] = parity_check(model, progress=progress)
        p = results["parity"]
        note["summary"] = (f"max |Δ logit| {p['max_abs_delta_plain']:.3g} (no hooks), "
                           f"{p['max_abs_delta_all_hooks']:.3g} (all {p['n_hooks_cached']} hooks cached)")

    with steps.step("logit_lens", f"logit lens of {cfg.lens_prompt!r}") as note:
        results["logit_lens"] = lens_section(model, cfg.lens_prompt, cfg.lens_target)
        lp = results["logit_lens"]["target_prob"]
        if lp is not None:
            note["summary"] = f"p({cfg.lens_target!r}) = {float(lp[-1]):.3f} at the last layer"

    with steps.step("head_scores", "head-score atlas on repeated random tokens") as note:
        results["head_scores"] = head_section(model, seq_len=cfg.head_seq_len, batch=cfg.head_batch, seed=cfg.seed,
                                              progress=progress)
        top = results["head_scores"]["top"]
        note["summary"] = ", ".join(f"{k}: {v[0]['head']} {v[0]['score']:.2f}" for k, v in top.items())

    with steps.step("ioi", f"indirect-object identification on {cfg.n_prompts} prompts") as note:
        ds = make_ioi_dataset(model, cfg.n_prompts, seed=cfg.seed)
        results["ioi"], clean_logits, corrupt_logits = ioi_section(model, ds, progress=progress)
        i = results["ioi"]
        note["summary"] = (f"logit diff {i['mean_logit_diff']:.2f} ± {i['std_logit_diff']:.2f}, accuracy "
                           f"{i['accuracy']:.1%}, corrupted {i['mean_corrupt_logit_diff']:.2f}")

    n = min(cfg.n_patch, int(ds.clean_tokens.shape[0]))
    if cfg.patch_prompts is None:  # the default never gives up alignment
        n = min(n, max(2, len(aligned_group(ds))))
    with steps.step("patching", f"activation and attribution patching on {n} prompts") as note:
        results["patching"] = patching_section(model, ds, clean_logits, corrupt_logits, n, progress=progress)
        c = results["patching"]["correlation"]["heads"]
        top = results["patching"]["top_heads"][0]
        note["summary"] = f"top head {top['head']} ({top['score']:.2f}); attribution vs activation (heads) r = {c if c is None else round(c, 3)}"

    if cfg.sae:
        from mechscope.report.sae import sae_section

        with steps.step("sae", f"sparse dictionaries: {len(cfg.sae)} folder(s)") as note:
            results["sae"] = sae_section(cfg.sae, model, progress=progress)
            note["summary"] = "; ".join(
                f"{e['name']}: FVU {e['eval']['fvu']:.3f} ({e['eval']['fvu_without_outliers']:.3f} without outliers), "
                f"CE recovered {e['eval']['ce_loss_recovered']:.3f}" for e in results["sae"]["dictionaries"])

    if cfg.circuit:
        from mechscope.report.circuit_section import circuit_section

        with steps.step("circuits", f"circuits: {len(cfg.circuit)} folder(s)") as note:
            results["circuits"] = circuit_section(cfg.circuit, model, progress=progress)
            faith = [(e["name"], e["evaluation"]["faithfulness"]["faithfulness"]) for e in results["circuits"]]
            note["summary"] = "; ".join(f"{name}: faithfulness {f['estimate']:.3f}" for name, f in faith)

    total = time.perf_counter() - steps.t0
    results["model"] = {**asdict(model.cfg), "n_params": n_params}
    results["run"] = {
        "date": started.isoformat(timespec="seconds"),
        "settings": {"model": cfg.model, "dtype": cfg.dtype, "n_prompts": cfg.n_prompts, "patch_prompts": n,
                     "seed": cfg.seed, "lens_prompt": cfg.lens_prompt, "lens_target": cfg.lens_target,
                     "head_seq_len": cfg.head_seq_len, "head_batch": cfg.head_batch,
                     "sae": [str(p) for p in cfg.sae], "circuit": [str(p) for p in cfg.circuit]},
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "timings_s": {**steps.timings},
        "total_s": total,
    }
    results["comparisons"] = _comparisons(results)
    return jsonable(results)


def write_report(results: dict, out: Path) -> ReportPaths:
    """Write ``results.json`` (atomically) and ``report.html`` into ``out``."""
    out = Path(out)
    paths = ReportPaths(html=out / "report.html", json=out / "results.json")
    t = time.perf_counter()
    html = render_html(results)
    results.setdefault("run", {}).setdefault("timings_s", {})["render"] = time.perf_counter() - t
    write_json_atomic(results, paths.json)
    write_text_atomic(html, paths.html)
    if results.get("circuits"):  # each circuit's own page beside the report
        from mechscope.report.circuit import write_circuit_page

        for entry in results["circuits"]:
            write_circuit_page(entry["evaluation"], out, entry["page"])
    return paths


def build_report(cfg: ReportConfig, *, console: Console | None = None, progress: bool = True) -> ReportPaths:
    """Compute every section and write the report. See :class:`ReportConfig`.

    Raises:
        ModelLoadError: the model cannot be loaded.
        InputError: bad settings (e.g. patch_prompts > n_prompts).
    """
    results = compute_results(cfg, console=console, progress=progress)
    paths = write_report(results, cfg.out)
    if console:
        console.print(Text(f"total {results['run']['total_s']:.1f} s; HTML {paths.html.stat().st_size / 1e6:.1f} MB"))
    return paths
