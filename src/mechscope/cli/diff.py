"""``mechscope diff``: compare a base model with a tuned one (weights, activations, next-token KL, logit lens)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from mechscope.cli.common import (
    SplitLinesOpt,
    TextFieldOpt,
    check_corpora,
    check_model_dtype,
    check_out_dir,
    clean_errors,
    load_model,
    out,
    print_titled,
    set_threads,
)

OutOpt = typer.Option(Path("mechscope-diff"), "--out", "-o", help="folder for diff.json and diff.html (created if "
                      "missing)")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: the idle cores)")


def _preds(items: list[dict]) -> str:
    return ", ".join(f"{p['token']!r} {p['prob']:.2f}" for p in items[:2])


@clean_errors
def diff_cmd(
    base: str = typer.Argument(..., help="the base model: built-in alias, local folder, .gguf file or hub id"),
    tuned: str = typer.Argument(..., help="the tuned model (same architecture and tokenizer)"),
    texts: str = typer.Option("pydoc", "--texts", "-t", help="corpus name, .txt/.jsonl/.parquet file, folder or "
                              "hf:NAME[:CONFIG] whose documents are compared"),
    n: int = typer.Option(32, "--n", min=1, help="documents compared (the first N)"),
    out_dir: Path = OutOpt,
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
    max_len: int = typer.Option(128, "--max-len", min=2, help="tokens kept per document"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="documents per forward pass"),
    first_k: int = typer.Option(5, "--first-k", min=1, help="positions in the first-k window"),
    include_first: bool = typer.Option(False, "--include-first", help="count position 0 (the attention sink) in "
                                       "the activation windows"),
    top: int = typer.Option(10, "--top", min=1, help="rows per summary table (diff.json keeps 20 KL tokens or more)"),
    n_boot: int = typer.Option(1000, "--n-boot", min=10, help="bootstrap resamples of the KL interval"),
    mean_diff: bool = typer.Option(False, "--mean-diff", help="also write OUT/mean_diff.safetensors: the mean "
                                   "tuned - base activation per site (steering directions)"),
    text_field: str = TextFieldOpt,
    split_lines: bool = SplitLinesOpt,
    threads: int | None = ThreadsOpt,
    html: bool = typer.Option(True, "--html/--no-html", help="also write OUT/diff.html, a self-contained report"),
    dictionary: str | None = typer.Option(None, "--dictionary", help="also train a 'crosscoder' or a 'diff-sae' on "
                                          "both models' activations and list the latents the fine-tune added, with "
                                          "top contexts (saved in OUT/<kind>/)"),
    dict_layer: int | None = typer.Option(None, "--dict-layer", min=0, help="the dictionary's layer (its "
                                          "hook_resid_post; default: the middle layer)"),
    dict_n: int = typer.Option(512, "--dict-n", min=1, help="documents the dictionary trains on (the first N of "
                               "--texts; a dictionary needs far more tokens than the other comparisons)"),
    dict_size: int | None = typer.Option(None, "--dict-size", min=1, help="dictionary latents (default 4 x d_model)"),
    dict_k: int = typer.Option(32, "--dict-k", min=1, help="active latents per token"),
    dict_steps: int = typer.Option(1000, "--dict-steps", min=1, help="training steps (1,024 tokens each)"),
) -> None:
    """Diff a tuned model against its base: weight deltas, activation changes, next-token KL (and, with
    --dictionary, a crosscoder's or diff-SAE's tuned-specific latents); writes OUT/diff.json and (unless --no-html)
    OUT/diff.html."""
    from mechscope.core.errors import InputError
    from mechscope.core.io import save_safetensors_atomic
    from mechscope.data.sources import load_documents
    from mechscope.diff import DICTIONARY_KINDS, diff_models

    check_model_dtype(dtype)
    if dictionary is not None and dictionary not in DICTIONARY_KINDS:
        raise InputError(f"--dictionary {dictionary!r} is not a dictionary kind; use one of {', '.join(DICTIONARY_KINDS)}.")
    check_corpora([texts])
    check_out_dir(out_dir)
    set_threads(threads)
    all_docs = load_documents(texts, text_field=text_field, split_lines=split_lines)
    docs = all_docs[:n]
    if len(docs) < 2:
        raise InputError(f"--texts {texts} holds {len(docs)} document; the KL interval needs at least 2 (pass more "
                         "text, or --split-lines for a .txt file with one document per line).")
    mb = load_model(base, dtype)
    mt = load_model(tuned, dtype)
    if dict_layer is not None and dict_layer >= mb.cfg.n_layers:
        raise InputError(f"--dict-layer {dict_layer} is out of range; the model has layers 0..{mb.cfg.n_layers - 1}.")
    opts = {"site": dict_layer, "d_sae": dict_size, "k": dict_k, "n_steps": dict_steps, "top": max(20, top)}
    res = diff_models(mb, mt, docs, first_k=first_k, skip_first=not include_first, mean_diff=mean_diff,
                      top_n=max(20, top), n_boot=n_boot, batch_size=batch_size, max_len=max_len,
                      dictionary=dictionary, dictionary_texts=all_docs[:dict_n], dictionary_options=opts)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = res.save(out_dir / "diff.json")
    written = [path]
    if html:
        from mechscope.report.diff import render_diff_report

        written.append(render_diff_report(res, out_dir / "diff.html"))
    if res.dictionary is not None:
        written.append(res.dictionary.save_dictionary(out_dir / res.dictionary.kind))
    if mean_diff:
        save_safetensors_atomic({k: v.contiguous() for k, v in res.activations.mean_diff.items()},
                                out_dir / "mean_diff.safetensors")
    _summary(res, top)
    if mean_diff:
        written.append(out_dir / "mean_diff.safetensors")
    out.print(Text("wrote " + ", ".join(str(p) for p in written)), soft_wrap=True)


def _summary(res, top: int) -> None:
    w, a, kl = res.weights, res.activations, res.kl
    tot = w.total
    out.print(Text(f"{res.tuned} vs {res.base}: {res.n_texts} texts, {int(kl.n_tokens.sum())} tokens; weights "
                   f"changed in {len(w.changed())} of {len(w.params)} tensors, ||dW||/||W|| = {tot['relative']:.3g}"),
              soft_wrap=True)
    t = Table(title_justify="left")
    for c in ("layer", "||dW||/||W||", "||dW||", "most changed kind"):
        t.add_column(c, justify="left" if c in ("layer", "most changed kind") else "right")
    for L, rel in w.top_layers(top):
        kinds = w.by_layer_kind[L]
        kind = max(kinds, key=lambda k: kinds[k]["relative"]) if kinds else "-"
        t.add_row(f"layer {L}", f"{rel:.3g}", f"{w.by_layer[L]['delta']:.3g}",
                  f"{kind} ({kinds[kind]['relative']:.3g})" if kinds else "-")
    g = w.global_params
    if g.get("n_params"):
        t.add_row("embed/final/unembed", f"{g['relative']:.3g}", f"{g['delta']:.3g}", "")
    print_titled("Top layers by weight change", t)
    t = Table()
    k = a.first_k
    for c in ("layer", "rel. diff", "cosine", "norm ratio", f"rel. diff, first {k}"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    rd_k = a.per_layer("rel_diff", "first_k")
    cos, nr = a.per_layer("cosine"), a.per_layer("norm_ratio")
    for L, v in a.top_layers(top):
        t.add_row(f"layer {L}", f"{v:.3g}", f"{float(cos[L]):.4f}", f"{float(nr[L]):.3f}", f"{float(rd_k[L]):.3g}")
    print_titled(f"Top layers by activation change (hook_resid_post, mean over {a.n_tokens['all']} tokens"
                 f"{', position 0 left out' if a.skip_first else ''})", t)
    ci = f" (95% CI {kl.ci.low:.4g} to {kl.ci.high:.4g} over texts)" if kl.ci is not None else ""
    out.print(Text(f"mean KL(P_tuned || P_base) = {kl.mean:.4g} nats/token{ci}; through the logit lens, by layer: "
                   + " ".join(f"{float(v):.2g}" for v in res.lens.kl), style="bold"), soft_wrap=True)
    t = Table()
    for c in ("KL", "text:pos", "context", "next", "base predicts", "tuned predicts"):
        t.add_column(c, justify="right" if c == "KL" else "left")
    for item in kl.top[:top]:
        ctx = item["context"].replace("\n", "\\n")
        t.add_row(f"{item['kl']:.3g}", f"{item['text']}:{item['position']}", Text(ctx[-40:]),
                  Text(repr(item["next"]) if item["next"] is not None else "-"), Text(_preds(item["base_top"])),
                  Text(_preds(item["tuned_top"])))
    print_titled("Tokens whose next-token distribution changed most", t)
    if res.dictionary is not None:
        _dictionary_summary(res.dictionary, top)


def _dictionary_summary(dd, top: int) -> None:
    from mechscope.report.diff import dictionary_line

    out.print(Text(dictionary_line(dd.to_dict())), soft_wrap=True)  # the report's own summary of the dictionary
    t = Table()
    cols = (("latent", "r", "nu_eps", "active %", "top context") if dd.kind == "crosscoder"
            else ("latent", "mean contribution", "active %", "top context"))
    for c in cols:
        t.add_column(c, justify="left" if c in ("latent", "top context") else "right")
    for r in dd.latents[:top]:
        ctx = Text(r["contexts"][0]["text"].replace("\n", "\\n")[-50:]) if r["contexts"] else Text("-")
        lat = f"{r['latent']}{' (spurious)' if r.get('spurious') else ''}"
        if dd.kind == "crosscoder":
            t.add_row(lat, f"{r['relative_norm']:.3f}", f"{r.get('nu_eps', float('nan')):.2f}",
                      f"{100 * r['frequency']:.2g}", ctx)
        else:
            t.add_row(lat, f"{r['mean_contribution']:.3g}", f"{100 * r['frequency']:.2g}", ctx)
    title = "Tuned-specific latents" if dd.kind == "crosscoder" else "Diff-SAE latents, most difference written first"
    if not dd.latents:
        out.print(Text(f"{title}: none found"), soft_wrap=True)
        return
    print_titled(title, t)


__all__ = ["diff_cmd"]
