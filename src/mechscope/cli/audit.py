"""``mechscope audit CLAIMS.json``: grade interpretability claims on the published rubric
(:mod:`mechscope.safety.audit`, docs/safety/audit-rubric.md), print the table, and write an HTML page or JSON.

``mechscope audit --model TUNED --base BASE``: scan a tuned model against its base (diff, trigger search, defection
probe, localisation and removal: :func:`mechscope.forensics.scan.scan_models`), grade every finding as a claim, and
write OUT/scan.html with OUT/scan.json, OUT/claims.json and OUT/diff.json."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from mechscope.cli.common import (
    check_out_file,
    clean_errors,
    out,
    print_titled,
)

_CLAIMS = typer.Argument(None, help="claims JSON: one claim object, a list, or {\"claims\": [...]}")
_CIRCUIT = typer.Option([], "--circuit", help="repeatable: a circuit folder (or its evaluation.json) "
                        "of `mechscope circuit evaluate`, audited as a causal claim")
_HTML = typer.Option(None, "--html", help="also write a self-contained HTML page of the audit here")
_JSON_OUT = typer.Option(None, "--json", help="also write the audit (rubric, grades, reasons) as JSON here")
_RUBRIC = typer.Option(False, "--rubric", help="print the rubric: its criteria and grade definitions")
_DETAILS = typer.Option(False, "--details", help="print every criterion's reason for every claim")
_MAX_REL_WIDTH = typer.Option(1.0, "--max-rel-width",
                              help="widest (high - low) / |estimate - null| that counts as a narrow interval")
_MODEL = typer.Option(None, "--model", help="scan this tuned model (with --base): alias, folder or "
                      "hub id")
_BASE = typer.Option(None, "--base", help="the model --model was tuned from (same architecture and "
                     "tokenizer)")
_OUT_DIR = typer.Option(Path("mechscope-scan"), "--out", "-o", help="scan: folder for scan.html, scan.json, "
                        "claims.json and diff.json (created if missing)")
_N_TEXTS = typer.Option(16, "--n-texts", min=2, help="scan: ordinary texts for the diff and perplexity")
_N_PROBES = typer.Option(48, "--n-probes", min=8, help="scan: ordinary instructions as probe messages "
                         "(split in four)")
_PROBES = typer.Option(None, "--probes", help="scan: a .txt file of probe messages, one per line "
                       "(default: built-in ordinary instructions)")
_TEXTS = typer.Option("pydoc", "--texts", help="scan: corpus name or file of ordinary texts")
_DTYPE = typer.Option("float32", "--dtype", help="scan: float32 or bfloat16")
_N_SHORTLIST = typer.Option(64, "--n-shortlist", min=1, help="scan: tokens of the trigger search's gradient scan "
                            "scored exactly (fewer: faster)")
_MAX_SPAN = typer.Option(3, "--max-span", min=1, help="scan: longest span the beam search grows (1: single tokens)")
_N_LEAK = typer.Option(64, "--leak-samples", min=0, help="scan: samples from a bare user turn for the leaked-"
                       "completion search (0: off)")
_THREADS = typer.Option(None, "--threads", min=1, help="scan: torch CPU threads (default: the idle "
                        "cores)")


@clean_errors
def audit(
    claims: Path | None = _CLAIMS,
    circuit: list[Path] = _CIRCUIT,
    html: Path | None = _HTML,
    json_out: Path | None = _JSON_OUT,
    rubric: bool = _RUBRIC,
    details: bool = _DETAILS,
    max_rel_width: float = _MAX_REL_WIDTH,
    model: str | None = _MODEL,
    base: str | None = _BASE,
    out_dir: Path = _OUT_DIR,
    n_texts: int = _N_TEXTS,
    n_probes: int = _N_PROBES,
    probes: Path | None = _PROBES,
    texts: str = _TEXTS,
    dtype: str = _DTYPE,
    threads: int | None = _THREADS,
    n_shortlist: int = _N_SHORTLIST,
    max_span: int = _MAX_SPAN,
    leak_samples: int = _N_LEAK,
) -> None:
    """Grade claims (causal or only correlational evidence, intervals, controls, held-out data) on the rubric; or,
    with --model and --base, scan a tuned model for a backdoor and grade every finding."""
    from mechscope.core.errors import InputError
    from mechscope.core.io import write_json_atomic, write_text_atomic
    from mechscope.safety.audit import audit as run_audit
    from mechscope.safety.audit import audit_html, grades_table, rubric_table
    from mechscope.safety.claim_io import read_claims

    if not 0 < max_rel_width < float("inf"):
        raise InputError(f"--max-rel-width must be a positive number (1 = an interval as wide as the effect), got "
                         f"{max_rel_width}.")
    if (model is None) != (base is None):
        given, missing = ("--model", "--base") if base is None else ("--base", "--model")
        raise InputError(f"{given} needs {missing}: a scan compares a tuned model with the model it was tuned from "
                         "(mechscope audit --model TUNED --base BASE).")
    if model is not None:
        if claims is not None or circuit:
            raise InputError("--model/--base run a scan and grade its own findings; audit a claims file or --circuit "
                             "in a separate call.")
        _scan(model, base, out_dir, n_texts, n_probes, probes, texts, dtype, threads, max_rel_width,
              {"n_shortlist": n_shortlist, "max_span": max_span, "n_leak_samples": leak_samples})
        return
    if claims is None and not circuit and not rubric:
        raise InputError("give a claims JSON file to audit (mechscope audit CLAIMS.json), --circuit DIR, --model "
                         "TUNED --base BASE to scan a model, or --rubric to print the rubric.")
    for path, option, example in ((html, "--html", "audit.html"), (json_out, "--json", "audit.json")):
        if path is not None:
            check_out_file(path, option, example)
    if rubric:
        print_titled("rubric: criteria", rubric_table())
        print_titled("rubric: grades", grades_table())
    if claims is None and not circuit:
        return
    items = read_claims(claims) if claims is not None else []
    if circuit:
        from mechscope.circuits.runs import read_evaluation
        from mechscope.safety.claims_from import claim_from_circuit

        items += [claim_from_circuit(read_evaluation(c)) for c in circuit]
    result = run_audit(items, max_rel_width=max_rel_width)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    sources = ", ".join(str(p) for p in ([claims] if claims is not None else []) + list(circuit))
    print_titled(f"audit of {len(result.grades)} claim(s) from {sources}: {counts or 'none'}", result.table())
    if details:
        print_titled("reasons", result.reasons_table())
    if html is not None:
        write_text_atomic(audit_html(result), html)
        out.print(Text(f"wrote {html}"), soft_wrap=True)
    if json_out is not None:
        write_json_atomic(result.to_dict(), json_out)
        out.print(Text(f"wrote {json_out}"), soft_wrap=True)


def _scan(model: str, base: str, out_dir: Path, n_texts: int, n_probes: int, probes: Path | None, texts: str,
          dtype: str, threads: int | None, max_rel_width: float, search: dict) -> None:
    from mechscope.cli.common import (
        check_corpora,
        check_model_dtype,
        check_out_dir,
        load_model,
        set_threads,
    )
    from mechscope.core.errors import InputError
    from mechscope.data.sources import load_documents
    from mechscope.forensics.scan import scan_models
    from mechscope.report.scan import render_scan_report
    from mechscope.safety.audit import audit as run_audit

    check_model_dtype(dtype)
    check_corpora([texts])
    check_out_dir(out_dir)
    msgs = None
    if probes is not None:
        if not probes.is_file():
            raise InputError(f"--probes {probes} is not a file; pass a .txt file with one user message per line.")
        msgs = [ln.strip() for ln in probes.read_text(encoding="utf-8").splitlines() if ln.strip()][:n_probes]
    docs = load_documents(texts)[:n_texts]
    set_threads(threads)
    mb, mt = load_model(base, dtype), load_model(model, dtype)
    res = scan_models(mb, mt, probes=msgs, texts=docs, n_probes=n_probes, out_dir=out_dir, **search)
    page = render_scan_report(res, out_dir / "scan.html")
    result = run_audit(res.claims, max_rel_width=max_rel_width)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    out.print(Text(f"suspected trigger {res.trigger!r} -> {res.defection_text!r}"), soft_wrap=True)
    for s in res.skipped:
        out.print(Text(f"skipped {s}"), soft_wrap=True)
    print_titled(f"scan of {model} against {base}: {len(result.grades)} finding(s): {counts or 'none'}", result.table())
    out.print(Text(f"wrote {page}, {out_dir / 'scan.json'}, {out_dir / 'claims.json'}, {out_dir / 'diff.json'}"),
              soft_wrap=True)


__all__ = ["audit"]
