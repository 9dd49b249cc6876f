"""``mechscope audit CLAIMS.json``: grade interpretability claims on the published rubric
(:mod:`mechscope.safety.audit`, docs/safety/audit-rubric.md), print the table, and write an HTML page or JSON."""

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


@clean_errors
def audit(
    claims: Path | None = typer.Argument(None, help="claims JSON: one claim object, a list, or {\"claims\": [...]}"),
    circuit: list[Path] = typer.Option([], "--circuit", help="repeatable: a circuit folder (or its evaluation.json) "
                                       "of `mechscope circuit evaluate`, audited as a causal claim"),
    html: Path | None = typer.Option(None, "--html", help="also write a self-contained HTML page of the audit here"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the audit (rubric, grades, reasons) as JSON here"),
    rubric: bool = typer.Option(False, "--rubric", help="print the rubric: its criteria and grade definitions"),
    details: bool = typer.Option(False, "--details", help="print every criterion's reason for every claim"),
    max_rel_width: float = typer.Option(1.0, "--max-rel-width",
                                        help="widest (high - low) / |estimate - null| that counts as a narrow interval"),
) -> None:
    """Grade claims (causal or only correlational evidence, intervals, controls, held-out data) on the rubric."""
    from mechscope.core.errors import InputError
    from mechscope.core.io import write_json_atomic, write_text_atomic
    from mechscope.safety.audit import audit as run_audit
    from mechscope.safety.audit import audit_html, grades_table, rubric_table
    from mechscope.safety.claim_io import read_claims

    if not 0 < max_rel_width < float("inf"):
        raise InputError(f"--max-rel-width must be a positive number (1 = an interval as wide as the effect), got "
                         f"{max_rel_width}.")
    if claims is None and not circuit and not rubric:
        raise InputError("give a claims JSON file to audit (mechscope audit CLAIMS.json), --circuit DIR, or --rubric "
                         "to print the rubric.")
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


__all__ = ["audit"]
