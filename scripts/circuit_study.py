"""The IOI circuit of SmolLM2-135M-Instruct, found with mechscope's circuit tools and explained.

Every step uses the library only (no hand-picked heads):

1. IOI, ``--n`` prompts (default 192), split by template into train and held-out halves (``Task.split``).
2. EAP-IG (ig-inputs, m=5) and EAP score every edge on the train prompts.
3. Selection on the train prompts only: circuits of the top N edges by |EAP-IG score| (pruned to edges on
   a path from input to logits), greedy ones and signed ones, N on a grid; the smallest |score| circuit
   (top N or greedy) whose train faithfulness reaches ``--target`` (0.8, the bar of issue 15) is the circuit.
4. Its faithfulness on the held-out prompts with a 95% bootstrap interval, under every ablation x level.
5. MIB's CPR/CMD curves of EAP and EAP-IG on the held-out prompts, and ACDC at node level (KL) for several
   tau, its circuits evaluated on the same prompts: the three methods side by side.
6. Spearman correlation of EAP and EAP-IG with exact single-edge patching, per edge type (the edges each
   method puts first, and random edges), with bootstrap intervals over edges.
7. The circuit's heads classified by Wang et al.'s evidence (``ioi_roles``).

Writes ``docs/circuits/smollm2-ioi.json`` (every number), ``docs/circuits/smollm2-ioi.md`` (the tables)
and ``docs/circuits/smollm2-ioi-curves.png`` (the curves; the interactive page stays in ``--work``). Stages are cached in
``--work`` (scores as safetensors, results as JSON), so a rerun skips what is done; ``--fresh`` redoes all.

Usage: ``.venv/bin/python scripts/circuit_study.py [--n 192] [--work runs/circuit-study] [--page
runs/circ-ioi/circuit.html]`` (about 40 minutes on a 2-core CPU). The circuit page for ``--page`` comes from
the CLI on the same split: ``mechscope circuit discover --task ioi --n 192 --method eap-ig --edges 500 --out
runs/circ-ioi`` then ``mechscope circuit evaluate runs/circ-ioi --curve --robustness --roles``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import mechscope
from mechscope.circuits import (Circuit, EdgeScores, Graph, acdc, attribute, evaluate_circuit, faithfulness_curve,
                                robustness_table)
from mechscope.circuits.ablation import ablated_edges, measure
from mechscope.circuits.evaluate import faithfulness_of_means
from mechscope.circuits.ioi import ioi_roles
from mechscope.data import load_task

ROOT = Path(__file__).resolve().parents[1]
GRID = (50, 100, 150, 200, 250, 300, 400, 500, 700, 1000, 1500)
TAUS = (0.003, 0.01, 0.03)
KINDS = ("q", "k", "v", "mlp", "logits")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Cache:
    """JSON results and safetensors scores under one folder."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.file = path / "results.json"
        self.data = {} if fresh or not self.file.exists() else json.loads(self.file.read_text())

    def stage(self, name: str, fn):
        if name not in self.data:
            t0 = time.perf_counter()
            log(f"stage {name} ...")
            out = fn()
            out["seconds"] = round(time.perf_counter() - t0, 1)
            self.data[name] = out
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.file)
            log(f"stage {name} done in {out['seconds']} s")
        return self.data[name]

    def scores(self, name: str, graph: Graph, fn) -> EdgeScores:
        from safetensors.torch import load_file, save_file
        f = self.path / f"{name}.safetensors"
        if f.exists():
            t = load_file(f)
            return EdgeScores(graph, t["scores"], t["per_prompt"], name, steps=int(t["steps"]))
        t0 = time.perf_counter()
        s = fn()
        save_file({"scores": s.scores.contiguous(), "per_prompt": s.per_prompt.contiguous(),
                   "steps": torch.tensor(s.steps)}, str(f))
        self.data.setdefault("timings", {})[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {self.data['timings'][name]} s")
        return s


def edge_kind(graph: Graph) -> list[str]:
    """The receiver kind of every edge."""
    kinds = [r.kind for r in graph.receivers]
    return [kinds[int(r)] for r in graph.edge_receiver]


def train_faithfulness(model, task, circuits: list[Circuit]) -> list[float]:
    """Point estimates of f on ``task`` for many circuits, each a variant of the same forwards."""
    graph = circuits[0].graph
    masks = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool)] + [ablated_edges(c) for c in circuits])
    mM, (vals,) = measure(model, graph, task, [("corrupted", masks)], batch_size=16, rows_per_forward=96,
                          progress=True)
    return faithfulness_of_means(vals[1:].T[None], vals[0][None], mM[None])[0].tolist()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def spearman_ci(a: torch.Tensor, b: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = a.numel()
    boots = []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=g)
        r = spearman(a[i], b[i])
        if math.isfinite(r):
            boots.append(r)
    lo, hi = torch.tensor(boots, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"rho": spearman(a, b), "low": lo, "high": hi, "n_edges": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "circuit-study")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "circuits")
    ap.add_argument("--spearman-prompts", type=int, default=32)
    ap.add_argument("--spearman-edges", type=int, default=40)
    ap.add_argument("--acdc-prompts", type=int, default=16)
    ap.add_argument("--acdc-budget", type=float, default=900.0)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--page", type=Path, default=None, help="a circuit.html to screenshot into --out")
    args = ap.parse_args()
    torch.manual_seed(0)
    cache = Cache(args.work, args.fresh)
    model = mechscope.load("smollm2-135m", dtype="float32")
    graph = Graph.from_model(model)
    task = load_task("ioi", model, n=args.n, seed=0)
    train, test = task.split(0.5, 0)
    log(f"IOI: {len(train)} train / {len(test)} held-out prompts; graph {graph.n_sources} nodes, {graph.n_edges:,} edges")
    cache.data["setup"] = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "task": "ioi", "n": len(task),
                           "n_train": len(train), "n_test": len(test), "split": "by template, seed 0",
                           "n_nodes": graph.n_sources, "n_edges": graph.n_edges, "torch_threads": torch.get_num_threads()}

    eap_ig = cache.scores("eap-ig", graph, lambda: attribute(model, train, graph=graph, method="eap-ig", steps=5))
    eap = cache.scores("eap", graph, lambda: attribute(model, train, graph=graph, method="eap"))

    # 3. selection on the train prompts
    def select():
        cands = {}
        for n in GRID:
            cands[("top", n)] = Circuit.from_scores(eap_ig, top_n=n).prune()
            cands[("greedy", n)] = Circuit.greedy(eap_ig, n)
            cands[("signed", n)] = Circuit.from_scores(eap_ig, top_n=n, absolute=False).prune()
        keys = list(cands)
        f = train_faithfulness(model, train, [cands[k] for k in keys])
        rows = [{"name": f"{k}{n}", "kind": k, "selected": n, "n_edges": cands[k, n].n_edges,
                 "n_nodes": len(cands[k, n].nodes), "train_f": f[i]} for i, (k, n) in enumerate(keys)]
        # the circuit: the smallest by |score| (top N or greedy) reaching the target on the train prompts; signed
        # circuits are reported beside it, not chosen (they keep only edges that raise the metric, so they
        # overshoot f = 1 and leave out the components that work against the answer)
        ok = [r for r in rows if r["kind"] != "signed" and r["train_f"] >= args.target]
        best = (min(ok, key=lambda r: (r["n_edges"], -r["train_f"])) if ok else
                max((r for r in rows if r["kind"] != "signed"), key=lambda r: r["train_f"]))
        return {"target": args.target, "rule": "smallest |score| circuit (top N pruned, or greedy) with train f >= "
                "target", "rows": rows, "chosen": best["name"], "chosen_kind": best["kind"],
                "chosen_n": best["selected"]}
    sel = cache.stage("selection", select)
    kind, n_sel = sel["chosen_kind"], sel["chosen_n"]
    circuit = (Circuit.from_scores(eap_ig, top_n=n_sel).prune() if kind == "top" else Circuit.greedy(eap_ig, n_sel))
    circuit.save(args.work / "circuit.json")
    log(f"chosen {sel['chosen']}: {circuit.n_edges} edges, {len(circuit.nodes)} nodes")

    # 4. held-out faithfulness, every ablation x level
    def held_out():
        ev = evaluate_circuit(model, test, circuit, progress=True)
        rob = robustness_table(model, test, circuit, progress=True)
        heads = [n for n in circuit.nodes if n.startswith("a")]
        return {"circuit": sel["chosen"], "n_edges": circuit.n_edges, "nodes": circuit.nodes, "heads": heads,
                "evaluation": ev.to_dict(), "robustness": rob.to_dict(), "edges": circuit.edge_names()}
    ho = cache.stage("held_out", held_out)

    # 5. curves: EAP, EAP-IG (MIB sizes), ACDC node level at several tau
    def curves():
        out = {}
        for name, s in (("eap-ig", eap_ig), ("eap", eap)):
            for k in ("cpr", "cmd"):
                c = faithfulness_curve(model, test, s, kind=k, progress=True)
                out[f"{name}/{k}"] = c.to_dict()
                log(str(c))
        # the same sizes as the selection grid, |score|, for the side-by-side plot with ACDC
        for name, s in (("eap-ig", eap_ig), ("eap", eap)):
            cs = [Circuit.from_scores(s, top_n=n).prune() for n in GRID]
            f = []
            for c in cs:
                e = evaluate_circuit(model, test, c)
                f.append(e.faithfulness.to_dict() | {"n_edges": c.n_edges})
            out[f"{name}/grid"] = f
        return out
    cache.stage("curves", curves)

    def acdc_runs():
        sub = train.subset(slice(0, args.acdc_prompts))
        runs = []
        for tau in TAUS:
            r = acdc(model, sub, tau=tau, level="node", metric="kl", batch_size=args.acdc_prompts, variants=8,
                     time_budget_s=args.acdc_budget, graph=graph)
            log(str(r))
            c = r.circuit()
            e = evaluate_circuit(model, test, c) if c.n_edges else None
            runs.append({"tau": tau, "n_prompts": len(sub), "complete": r.complete, "untested": r.untested,
                         "n_forwards": r.n_forwards, "seconds": r.seconds, "kept_nodes": r.kept_node_names(),
                         "n_edges": c.n_edges, "held_out": e.faithfulness.to_dict() if e else None})
        return {"runs": runs}
    cache.stage("acdc", acdc_runs)

    # 6. Spearman against exact single-edge patching
    def rank_check():
        sub = train.subset(slice(0, args.spearman_prompts))
        kinds = edge_kind(graph)
        g = torch.Generator().manual_seed(0)
        a_ig = eap_ig.per_prompt[:len(sub)].mean(0)
        a_eap = eap.per_prompt[:len(sub)].mean(0)
        k = args.spearman_edges
        picks = {}
        for kd in KINDS:
            idx = torch.tensor([i for i, x in enumerate(kinds) if x == kd])
            half = k // 2
            top = set(idx[a_ig[idx].abs().topk(min(half, idx.numel())).indices].tolist())
            top |= set(idx[a_eap[idx].abs().topk(min(half, idx.numel())).indices].tolist())
            rand = idx[torch.randperm(idx.numel(), generator=g)[:k]].tolist()
            picks[kd] = (sorted(top), rand)
        every = sorted({e for t, r in picks.values() for e in t + r})
        ex = attribute(model, sub, graph=graph, method="exact", edges=torch.tensor(every), batch_size=16)
        out = {}
        for kd, (top, rand) in picks.items():
            for which, ids in (("top", top), ("random", rand)):
                i = torch.tensor(ids)
                out[f"{kd}/{which}"] = {"eap": spearman_ci(a_eap[i], ex.scores[i]),
                                        "eap-ig": spearman_ci(a_ig[i], ex.scores[i])}
        return {"n_prompts": len(sub), "per_kind": out}
    cache.stage("spearman", rank_check)

    # 7. roles
    def roles():
        r = ioi_roles(model, test.subset(slice(0, min(64, len(test)))), ho["heads"])
        return r.to_dict()
    cache.stage("roles", roles)

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {k: cache.data[k] for k in ("setup", "timings", "selection", "held_out", "curves", "acdc", "spearman", "roles")
           if k in cache.data}
    doc["generated_by"] = "scripts/circuit_study.py"
    (args.out / "smollm2-ioi.json").write_text(json.dumps(doc, indent=1))
    write_markdown(doc, args.out / "smollm2-ioi.md")
    write_plot(doc, args.work / "smollm2-ioi-curves.html")  # interactive, plotly inlined (4.8 MB): kept out of git
    screenshot(args.work / "smollm2-ioi-curves.html", args.out / "smollm2-ioi-curves.png", 900, 520)
    if args.page:  # a circuit page (mechscope circuit evaluate's circuit.html) for the README
        screenshot(args.page, args.out / "circuit-page.png", 1280, 900, selector="#graph")
    log(f"wrote {args.out}")


def _ci(d: dict, fmt: str = ".3f") -> str:
    return f"{d['estimate']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def write_markdown(doc: dict, path: Path) -> None:
    s, ho = doc["setup"], doc["held_out"]
    L = ["# The IOI circuit of SmolLM2-135M-Instruct", "",
         f"Generated by `scripts/circuit_study.py` (fp32, CPU). IOI: {s['n_train']} train and {s['n_test']} held-out "
         f"prompts, split {s['split']}; graph of {s['n_nodes']} nodes and {s['n_edges']:,} edges (GQA native).", "",
         ("Wall time on this run's machine: EAP-IG " + f"{doc['timings']['eap-ig']:.0f} s, EAP {doc['timings']['eap']:.0f} s; "
          + ", ".join(f"{k} {doc[k]['seconds']:.0f} s" for k in ("selection", "held_out", "curves", "acdc", "spearman",
                                                                 "roles") if k in doc) + "."), "",
         "## Selection (train prompts, corrupted ablation, edge level)", "",
         "| circuit | edges after pruning | nodes | train f |", "|---|---|---|---|"]
    for r in doc["selection"]["rows"]:
        mark = " **chosen**" if r["name"] == doc["selection"]["chosen"] else ""
        L.append(f"| {r['name']}{mark} | {r['n_edges']} | {r['n_nodes']} | {r['train_f']:.3f} |")
    L += ["", f"## The circuit on the held-out prompts ({ho['n_edges']} edges, {len(ho['nodes'])} nodes, "
          f"{len(ho['heads'])} heads)", "", "| ablation | level | f [95% CI] | per-prompt median (IQR) |", "|---|---|---|---|"]
    for r in ho["robustness"]["rows"]:
        p = r["per_prompt"]
        L.append(f"| {r['ablation']} | {r['level']} | {_ci(r['faithfulness'])} | {p['median']:.3f} ({p['iqr']:.3f}) |")
    L += ["", "## Curves (held-out prompts)", "", "| scores | CPR [95% CI] | CMD [95% CI] |", "|---|---|---|"]
    for m in ("eap-ig", "eap"):
        L.append(f"| {m} | {_ci(doc['curves'][m + '/cpr']['area'])} | {_ci(doc['curves'][m + '/cmd']['area'])} |")
    L += ["", "MIB's sizes (percent of the 70,651 edges; edges kept after pruning; f with its 95% interval):", "",
          "| % | EAP-IG signed (CPR) | EAP-IG \\|score\\| (CMD) | EAP signed (CPR) | EAP \\|score\\| (CMD) |",
          "|---|---|---|---|---|"]
    cv = doc["curves"]
    for i, pc in enumerate(cv["eap-ig/cpr"]["percents"]):
        cells = []
        for key in ("eap-ig/cpr", "eap-ig/cmd", "eap/cpr", "eap/cmd"):
            c, f = cv[key], cv[key]["faithfulness"]
            cells.append(f"{c['n_kept'][i]:,}: {f['estimate'][i]:.3f} [{f['low'][i]:.3f}, {f['high'][i]:.3f}]")
        L.append(f"| {pc:g} | " + " | ".join(cells) + " |")

    L += ["", "| top N by \\|score\\| | EAP-IG edges | EAP-IG f | EAP edges | EAP f |", "|---|---|---|---|---|"]
    for i, n in enumerate(GRID):
        a, b = doc["curves"]["eap-ig/grid"][i], doc["curves"]["eap/grid"][i]
        L.append(f"| {n} | {a['n_edges']} | {_ci(a)} | {b['n_edges']} | {_ci(b)} |")
    if "acdc" in doc:
        L += ["", "| ACDC (node level, KL) tau | train prompts | kept nodes | edges | held-out f | forwards | seconds | complete |",
              "|---|---|---|---|---|---|---|---|"]
        for r in doc["acdc"]["runs"]:
            f = _ci(r["held_out"]) if r["held_out"] else "—"
            L.append(f"| {r['tau']:g} | {r['n_prompts']} | {len(r['kept_nodes'])} | {r['n_edges']:,} | {f} | "
                     f"{r['n_forwards']} | {r['seconds']:.0f} | {r['complete']} |")
    if "spearman" in doc:
        sp = doc["spearman"]
        L += ["", f"## Spearman with exact single-edge patching ({sp['n_prompts']} train prompts)", "",
              "| receiver | edges | EAP ρ [95% CI] | EAP-IG ρ [95% CI] |", "|---|---|---|---|"]
        for k, v in sp["per_kind"].items():
            e, g = v["eap"], v["eap-ig"]
            L.append(f"| {k} | {e['n_edges']} | {e['rho']:.2f} [{e['low']:.2f}, {e['high']:.2f}] | "
                     f"{g['rho']:.2f} [{g['low']:.2f}, {g['high']:.2f}] |")
    if "roles" in doc:
        rl = doc["roles"]
        order = ["name mover", "negative name mover", "s suppression", "s-inhibition", "induction", "duplicate token",
                 "previous token", "unclassified"]
        heads = sorted(rl["heads"], key=lambda h: (order.index(h["role"]), -abs(h["dla"]["estimate"])))
        counts = {r: sum(h["role"] == r for h in heads) for r in order}
        shown = [h for h in heads if h["role"] != "unclassified" or abs(h["dla"]["estimate"]) >= 0.1
                 or ("s_inhibition" in h and abs(h["s_inhibition"]["estimate"]) >= 0.1)]
        L += ["", f"## Head classes ({rl['n_prompts']} held-out prompts; clean logit difference "
              f"{rl['clean_logit_diff']:+.2f})", "",
              f"{len(heads)} heads in the circuit: " + ", ".join(f"{n} {r}" for r, n in counts.items() if n) + ". "
              "Shown: every classified head, and unclassified heads with a direct effect or an S-inhibition "
              "path-patching effect of at least 0.1 nats.", "",
              "| head | class | direct effect on logit(IO) − logit(S) (nats) | END→IO | evidence |", "|---|---|---|---|---|"]
        for h in shown:
            why = h["why"] or ("path patching into the name movers' queries " + _ci(h["s_inhibition"], "+.2f")
                               if "s_inhibition" in h else "")
            L.append(f"| {h['head']} | {h['role']} | {_ci(h['dla'], '+.2f')} | "
                     f"{h['attention']['END->IO']['estimate']:.2f} | {why} |")
    path.write_text("\n".join(L) + "\n")


def write_plot(doc: dict, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for m, colour in (("eap-ig", "#1f77b4"), ("eap", "#ff7f0e")):
        pts = doc["curves"][f"{m}/grid"]
        x = [p["n_edges"] for p in pts]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=[p["high"] for p in pts] + [p["low"] for p in pts][::-1],
                                 fill="toself", line={"width": 0}, fillcolor=colour, opacity=0.2,
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=[p["estimate"] for p in pts], mode="lines+markers", name=f"{m.upper()} top N",
                                 line={"color": colour}))
    if "acdc" in doc:
        runs = [r for r in doc["acdc"]["runs"] if r["held_out"]]
        fig.add_trace(go.Scatter(
            x=[r["n_edges"] for r in runs], y=[r["held_out"]["estimate"] for r in runs], mode="markers+text",
            name="ACDC (node level)", text=[f"τ={r['tau']:g}" for r in runs], textposition="top center",
            marker={"color": "#2ca02c", "size": 10},
            error_y={"type": "data", "symmetric": False,
                     "array": [r["held_out"]["high"] - r["held_out"]["estimate"] for r in runs],
                     "arrayminus": [r["held_out"]["estimate"] - r["held_out"]["low"] for r in runs]}))
    fig.update_layout(title="SmolLM2-135M-Instruct IOI: held-out faithfulness by circuit size (corrupted ablation, edges)",
                      xaxis={"title": "edges in the circuit (after pruning)", "type": "log"},
                      yaxis={"title": "faithfulness f (95% bootstrap CI)"}, template="plotly_white",
                      width=900, height=520)
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.add_hline(y=0.8, line_dash="dash", line_color="#d62728", annotation_text="0.8")
    fig.write_html(path, include_plotlyjs=True, full_html=True)


def screenshot(html: Path, png: Path, width: int, height: int, selector: str | None = None) -> None:
    """A PNG of a local HTML file (or of its element ``selector``) in headless Chromium (Playwright); skipped
    with a line when there is no Chromium."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        log(f"no chromium: {png} not written")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_timeout(1500)
        (page.locator(selector).first if selector else page).screenshot(path=str(png))
        browser.close()
    log(f"wrote {png}")


if __name__ == "__main__":
    main()
