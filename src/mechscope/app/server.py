"""``mechscope serve``: a local web app over a model, a dictionary and its feature database.

Pages (thin HTML shells; the browser fetches JSON and renders every string with ``textContent``, never
as HTML, so token strings such as ``<script>`` are shown as text):

- ``/`` feature browser: list and search (by token, by text, by label);
- ``/feature/{i}`` one latent: top contexts with per-token highlighting, activation histogram, logit
  effects, co-activating latents, its label with score and provenance;
- ``/inspect`` prompt inspector: which latents fire on each token, logit lens, attention per head;
- ``/patching`` the patching results of a ``mechscope report`` run (its results.json);
- ``/steer`` steering playground: generate with latents added or clamped, beside the unsteered text;
- ``/circuit`` a circuit evaluated by ``mechscope circuit evaluate`` (its evaluation.json): the layered graph
  (click a node for its edges and role), faithfulness with its interval, MIB's curves, robustness and roles;
- ``/probe`` linear probes' per-token scores on a typed prompt, and a generation under a runtime monitor
  (``mechscope serve --probe DIR``; routes in :mod:`mechscope.app.probe_routes`);
- ``/graph`` an attribution graph (``mechscope serve --graph DIR [--transcoders DIR]``): click a feature for its
  contexts and label, pin nodes, steer features alone or together (routes in :mod:`mechscope.app.graph_routes`).

JSON API under ``/api`` (its OpenAPI schema at ``/openapi.json``). A malformed request gets a 4xx whose
``detail`` is readable text, never a 500 (:mod:`mechscope.app.web`): validation 422, an unknown latent 404,
a mechscope error 400. The model is used by one request at a time (a lock); database reads use their own
cursor per request. Pages carry a Content-Security-Policy and load their scripts from ``/static``; assets
are cached by versioned URL. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Request  # at module level: route signatures are resolved here (postponed annotations)
from pydantic import BaseModel, Field, field_validator

from mechscope.core.errors import InputError

PAGES = ("index", "feature", "inspect", "patching", "steer", "circuit", "probe", "graph")
MAX_INT32 = 2**31 - 1  # bound of every id and offset: DuckDB's INTEGER, and far past any dictionary
N_TOP_TOKENS = 5  # tokens shown per latent in lists
_STEER_LINK = re.compile(r'(<a id="steer-link"[^>]*\bhref=")/steer(")')


@dataclass
class AppState:
    """What the app serves. Any part may be None; pages that need it say so.

    Attributes:
        model: the HookedModel (prompt inspector, steering).
        dictionary: the SparseDictionary whose latents the database describes.
        db: a read-only FeatureDB.
        report: the results.json of a ``mechscope report`` run (patching page).
        circuit: the evaluation.json of ``mechscope circuit evaluate`` (circuit page).
        graph: an attribution graph's JSON (``neuronpedia.json`` of ``mechscope graph``; graph page).
        graph_transcoders: the graph's :class:`~mechscope.graphs.TranscoderSet` (steering on the graph page).
        graph_features: ``{layer: FeatureDB}`` of that set (:func:`mechscope.graphs.features.open_set_features`).
        graph_cache: what the graph routes keep between requests (the prompt's replacement state).
        steer: ``fn(prompt, latents, max_new_tokens) -> dict`` used by the steering endpoint.
        probes: :class:`~mechscope.app.probe_routes.ServedProbe` (a loaded probe, its display name and threshold)
            for the probe page; :func:`~mechscope.app.probe_routes.load_probes` makes them.
    """

    model: Any = None
    dictionary: Any = None
    db: Any = None
    report: dict | None = None
    circuit: dict | None = None
    graph: dict | None = None
    graph_transcoders: Any = None
    graph_features: dict = field(default_factory=dict)
    graph_cache: dict = field(default_factory=dict)
    steer: Any = None
    probes: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class InspectBody(BaseModel):
    """POST /api/inspect: a prompt, the layer whose attention to return (None: the middle), top latents per token.

    Numbers in request bodies are strict: ``true`` or ``"3"`` is refused rather than read as 1 or 3.
    """

    text: str = Field(..., min_length=1, max_length=2000)
    layer: int | None = Field(None, strict=True)
    top: int = Field(5, ge=1, le=20, strict=True)


class LatentSteerBody(BaseModel):
    """One steered latent: its id (required: there is no default latent), the value, add or clamp."""

    id: int = Field(..., ge=0, le=MAX_INT32, strict=True)  # strict: true/false/1.5/"3" are not latent ids
    value: float = Field(..., ge=-1e4, le=1e4, allow_inf_nan=False, strict=True)
    mode: Literal["add", "clamp"] = "add"


class SteerBody(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=2000)
    latents: list[LatentSteerBody] = Field(..., min_length=1, max_length=16)
    max_new_tokens: int = Field(30, ge=1, le=128, strict=True)

    @field_validator("latents")
    @classmethod
    def _each_latent_once(cls, latents: list[LatentSteerBody]) -> list[LatentSteerBody]:
        seen = set()
        for s in latents:
            if s.id in seen:  # a second entry would silently replace the first
                raise ValueError(f"latent {s.id} is given twice; give each latent once, with one value")
            seen.add(s.id)
        return latents


def inspect_prompt(model, dictionary, text: str, *, top: int = 5, layer: int | None = None,
                   max_tokens: int = 128) -> dict:
    """Per-token firing latents, the logit lens at the last position, and one layer's attention patterns.

    Returns JSON-ready lists: ``text`` (the prompt's tokens decoded at once, BOS included), ``tokens`` [pos]
    (each token's span of ``text``: they join to it, and a token holding only leading bytes of a character
    has an empty span; see :mod:`mechscope.data.detokenize`), ``labels`` [pos] (each token shown alone, byte
    fragments as escapes); ``features`` [pos][top] of {id, act} (none at BOS, a
    position dictionaries are not trained on); ``lens`` {labels,
    top_tokens [n_layers][5], top_probs}; ``attention`` {layer, n_heads, pattern [n_heads][pos][pos]}.

    Raises:
        InputError: empty text, or longer than ``max_tokens`` tokens.
    """
    from mechscope.analysis import logit_lens
    from mechscope.dictionaries import Splice

    if not text or not text.strip():
        raise InputError("the prompt is empty; type some text.")
    tokens = model.to_tokens(text, prepend_bos=True)
    if tokens.shape[1] > max_tokens:
        raise InputError(f"the prompt has {tokens.shape[1]} tokens; the inspector takes at most {max_tokens}.")
    n_layers = model.cfg.n_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise InputError(f"layer must be in 0..{n_layers - 1}, got {layer}.")
    from mechscope.data.detokenize import decode_spans, token_labels

    (decoded,) = decode_spans(model.tokenizer, tokens.tolist())
    labels = token_labels(model.tokenizer, tokens[0].tolist())
    out: dict[str, Any] = {"text": decoded.text, "tokens": decoded.pieces,
                           "labels": [labels[int(i)] for i in tokens[0].tolist()]}
    cache_sites = [f"blocks.{layer}.attn.hook_pattern"]
    saes = []
    if dictionary is not None:
        site = f"{dictionary.cfg.hook_out}.sae.hook_sae_acts_post"
        cache_sites.append(site)
        saes = [Splice(dictionary, error_term=True)]
    with torch.no_grad():
        _, cache = model.run(tokens, cache=cache_sites, saes=saes)
    if dictionary is not None:
        acts = cache[site][0].float()
        vals, idx = acts.topk(min(top, acts.shape[-1]), dim=-1)
        out["features"] = [[{"id": int(i), "act": round(float(v), 4)} for v, i in zip(vr, ir) if v > 0]
                           for vr, ir in zip(vals, idx)]
        bos = getattr(model.tokenizer, "bos_token_id", None)
        if bos is not None and int(tokens[0, 0]) == bos:
            out["features"][0] = []  # dictionaries are trained without the BOS position: its latents mean nothing
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float()
    out["attention"] = {"layer": layer, "n_heads": int(pattern.shape[0]),
                        "pattern": [[[round(float(x), 4) for x in row] for row in head] for head in pattern]}
    lens = logit_lens(model, tokens, k=5)
    out["lens"] = {"labels": lens.labels, "top_tokens": lens.top_tokens,
                   "top_probs": [[round(float(p), 4) for p in row] for row in lens.top_probs]}
    return out


def make_steer(model, dictionary, *, n_targets: int = 3):
    """The steering endpoint's function: unsteered and steered greedy continuations, and the measured effect.

    The effect is measured, not only shown, on the next-token distribution at the prompt's last position:
    KL(steered || unsteered) in nats; the ``n_targets`` tokens whose probability steering raised most;
    and the change in log-probability (nats) of the ``n_targets`` tokens the first steered latent's
    decoder direction promotes most through the direct path (its logit weights). For a latent far from
    the unembedding (an early layer) the direct-path tokens are often not the ones that move, which is
    why the first two are reported too.
    """
    from mechscope.features.generation import generate
    from mechscope.features.steering import decoder_direction, measure_steering, promoted_tokens, steer_latents

    def steer(prompt: str, latents: list[dict], max_new_tokens: int) -> dict:
        by_mode: dict[str, dict[int, float]] = {}
        for s in latents:
            by_mode.setdefault(s["mode"], {})[int(s["id"])] = float(s["value"])
        steers = [steer_latents(dictionary, lat, mode=mode) for mode, lat in by_mode.items()]
        plain = generate(model, prompt, max_new_tokens=max_new_tokens)
        steered = generate(model, prompt, interventions=steers, max_new_tokens=max_new_tokens)
        first = int(latents[0]["id"])
        targets = promoted_tokens(model, decoder_direction(dictionary, first), k=n_targets)
        effect = measure_steering(model, [prompt], steers, [t[0] for t in targets], n_raised=n_targets)
        measured = [{"token": tok, "delta_logprob": round(float(dl), 4)}
                    for (_, tok, _), dl in zip(targets, effect.mean_delta_logprob)]
        raised = [{"token": model.tokenizer.decode([int(i)]), "delta_prob": round(float(dp), 4)}
                  for i, dp in zip(effect.raised_ids[0], effect.raised_delta_prob[0])]
        kl = float(effect.kl[0])
        summary = "; ".join(f"{m['token']!r} {m['delta_logprob']:+.2f}" for m in measured)
        up = "; ".join(f"{r['token']!r} {r['delta_prob']:+.3f}" for r in raised)
        text = (f"next token: KL(steered || unsteered) {kl:.3f} nats · probability rose most for {up} · "
                f"change in log-probability of the tokens latent #{first} promotes most (direct path): {summary} nats")
        return {"unsteered": plain.text, "steered": steered.text, "measured": measured, "raised": raised,
                "kl": round(kl, 5), "effect": text}

    return steer


def _summaries(db, ids: list[int] | None = None, *, order: str = "id", offset: int = 0, limit: int = 50) -> list[dict]:
    """Latents' rows for lists, from one query: id, density, max and mean activation, the best label with its
    score and provenance, and the first distinct tokens their top examples peak on.

    Args:
        db: a FeatureDB.
        ids: these latents, in this order (unknown ids are left out); None: a page of all latents in ``order``
            (``id``, ``density``, ``density_asc``, ``max_act``), from ``offset``, ``limit`` rows.
    """
    from mechscope.app.web import best_label
    from mechscope.features.db import ORDERS

    sql = ("SELECT l.id, l.density, l.max_act, l.mean_act, l.n_fired, "
           "(SELECT list(e.max_token ORDER BY e.rank) FROM examples e WHERE e.latent_id = l.id AND e.kind = 'top'), "
           "(SELECT list({'label': b.label, 'score': b.score, 'score_kind': b.score_kind, 'explainer': b.explainer, "
           "'date': b.date}) FROM labels b WHERE b.latent_id = l.id) FROM latents l ")
    c = db.con.cursor()
    try:
        if ids is None:
            rows = c.execute(sql + f"ORDER BY {ORDERS[order]} LIMIT ? OFFSET ?", [limit, offset]).fetchall()
        else:
            found = {r[0]: r for r in c.execute(sql + "WHERE l.id IN (SELECT unnest(?::INTEGER[]))", [ids]).fetchall()}
            rows = [found[i] for i in ids if i in found]
    finally:
        c.close()
    return [{"id": i, "density": density, "max_act": max_act, "mean_act": mean_act, "n_fired": n_fired,
             **best_label({"labels": labels}), "top_tokens": list(dict.fromkeys(tops or []))[:N_TOP_TOKENS]}
            for i, density, max_act, mean_act, n_fired, tops, labels in rows]


def create_app(state: AppState):
    """The FastAPI application for ``state`` (see the module docstring)."""
    from fastapi import FastAPI, HTTPException, Path as PathParam, Query

    from mechscope.app import web

    app = FastAPI(title="mechscope", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(web.SecurityHeaders)
    app.mount("/static", web.make_static_files(), name="static")
    web.install_error_handlers(app, pages="/, /feature/<id>, /inspect, /steer, /patching, /circuit, /probe, /graph")

    def need(what: str, value):
        if value is None:
            raise HTTPException(status_code=404, detail=f"this server was started without {what}.")
        return value

    def need_db():
        return need("a feature database (--features)", state.db)

    def check_latent(db, latent: int) -> int:
        if latent >= db.n_latents:
            raise HTTPException(status_code=404, detail=f"latent {latent} does not exist; this database has latents "
                                                        f"0..{db.n_latents - 1}.")
        return latent

    Latent = PathParam(..., ge=0, le=MAX_INT32, description="a latent id")

    # -- pages -------------------------------------------------------------------------------
    for name in PAGES:
        if name == "feature":
            continue
        route = "/" if name == "index" else f"/{name}"

        def page(name=name):
            return web.page_response(web.page_html(name))

        app.get(route, include_in_schema=False)(page)

    @app.get("/feature/{latent}", include_in_schema=False)
    def feature_page(latent: int = Latent):
        html = web.page_html("feature")  # the steering link carries the id, so it works without the page script
        return web.page_response(_STEER_LINK.sub(rf"\g<1>/steer?latent={latent}\g<2>", html))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # none, said without a 404 in every browser console
        from fastapi.responses import Response

        return Response(status_code=204, headers={"Cache-Control": web.IMMUTABLE})

    @app.get("/plotly.min.js", include_in_schema=False)
    def plotly_js(request: Request):
        return web.plotly_response(request)

    # -- API ---------------------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        m, d = state.model, state.dictionary
        return {"model": m.cfg.name if m else None, "n_layers": m.cfg.n_layers if m else None,
                "dictionary": None if d is None else {"hook": d.cfg.hook_out, "d_sae": d.cfg.d_sae,
                                                       "architecture": d.cfg.architecture, "k": d.cfg.k},
                "n_latents": state.db.n_latents if state.db is not None else None,
                "has_report": state.report is not None, "has_circuit": state.circuit is not None,
                "can_steer": state.steer is not None}

    @app.get("/api/features")
    def features(offset: int = Query(0, ge=0, le=MAX_INT32, description="rows to skip; past the end: an empty page"),
                 limit: int = Query(50, ge=1, le=500),
                 order: Literal["id", "density", "density_asc", "max_act"] = "id"):
        db = need_db()
        return {"latents": _summaries(db, order=order, offset=offset, limit=limit), "total": db.n_latents,
                "offset": offset, "limit": limit, "order": order}

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=200),
               by: Literal["token", "text", "label"] = "token", limit: int = Query(50, ge=1, le=500)):
        db = need_db()
        fn = {"token": db.search_tokens, "text": db.search_text, "label": db.search_labels}[by]
        return {"query": q, "by": by, "latents": _summaries(db, fn(q, limit=limit))}

    @app.get("/api/feature/{latent}")
    def feature(latent: int = Latent):
        db = need_db()
        return db.feature(check_latent(db, latent))

    @app.get("/api/feature/{latent}/summary")
    def feature_summary(latent: int = Latent):
        """One latent's list row (density, max and mean activation, label, top tokens): the steering page's scale."""
        db = need_db()
        return _summaries(db, [check_latent(db, latent)])[0]

    @app.post("/api/inspect")
    def inspect(body: InspectBody):
        model = need("a model", state.model)
        with state.lock:
            return inspect_prompt(model, state.dictionary, body.text, top=body.top, layer=body.layer)

    @app.get("/api/patching")
    def patching():
        rep = need("a report (--report results.json)", state.report)
        return {"model": rep.get("model", {}).get("name"), "patching": rep.get("patching"), "ioi": {
            k: rep.get("ioi", {}).get(k) for k in ("n_prompts", "mean_logit_diff", "accuracy")}}

    @app.get("/api/circuit")
    def circuit():
        """The circuit page's view (figures, node details, tables) and the evaluation it was drawn from."""
        from mechscope.report.circuit_view import circuit_view

        ev = need("a circuit evaluation (--circuit evaluation.json)", state.circuit)
        return {"view": circuit_view(ev), "evaluation": ev}

    @app.post("/api/steer")
    def steer(body: SteerBody):
        fn = need("steering (a model and a dictionary)", state.steer)
        d_sae = state.dictionary.cfg.d_sae
        for s in body.latents:
            if s.id >= d_sae:
                raise HTTPException(status_code=404, detail=f"latent {s.id} does not exist; the dictionary has "
                                                            f"latents 0..{d_sae - 1}.")
        with state.lock:
            return fn(body.prompt, [s.model_dump() for s in body.latents], body.max_new_tokens)

    from mechscope.app.graph_routes import add_graph_routes
    from mechscope.app.probe_routes import add_probe_routes

    add_graph_routes(app, state)
    add_probe_routes(app, state)
    return app


def load_report(path: str | Path | None) -> dict | None:
    """A report's results.json (or its folder), or None."""
    import json

    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise InputError(f"{p} does not exist; pass the results.json written by `mechscope report`.")
    return json.loads(p.read_text(encoding="utf-8"))
