"""The feature database: every latent's statistics, examples, logit effects, co-activation and labels.

Why DuckDB: one file to copy or serve; columnar storage with compression and zone maps, and ART indexes
on ``latent_id``, so one latent's rows are read without loading the rest (100k+ latents stay on disk);
SQL for search and listing; reads and writes Parquet (``COPY examples TO 'x.parquet'``) for other
tools; any number of read-only connections (one per web-server worker) when no process holds it open
for writing. SQLite would do the point lookups but stores lists as blobs and scans text slowly; Parquet
alone has no indexes and no in-place label updates.

Tables (one row per item; ``latent_id`` orders every table, so each latent's rows are contiguous):

- ``meta(key, value)``: JSON values: model, source (dictionary path, weight hash, hook), corpus,
  tokens fingerprint, n_tokens, config, notes, created, format_version.
- ``latents(id, density, max_act, mean_act, n_fired, histogram INTEGER[], quantile_edges FLOAT[])``.
- ``contexts(context_id, token_ids INTEGER[], str_tokens VARCHAR[], text, offsets INTEGER[])``: only the
  contexts that examples use, decoded once at build time so readers need no tokenizer. ``text`` is the
  whole context decoded at once (exact: emoji, combining accents, right-to-left and zero-width characters
  kept), ``offsets`` the code-point offset where each token's span of ``text`` starts, and ``str_tokens``
  those spans (they join to ``text``; a token holding only leading bytes of a character has an empty
  span, see :mod:`mechscope.data.detokenize`).
- ``examples(latent_id, kind 'top'|'quantile', bin, rank, context_id, max_pos, max_token, max_act,
  acts FLOAT[])``: ``acts`` are the latent's activations at every position of the context (BOS: 0);
  ``max_token`` is the text of the token at ``max_pos`` (its span, or for a byte fragment its label).
- ``logit_effects(latent_id, direction 'up'|'down', rank, token_id, token_str, value)``: ``token_str``
  is the token's label (:func:`~mechscope.data.detokenize.token_label`: byte fragments as escapes).
- ``coactivation(latent_id, other_id, rank, count, jaccard)``.
- ``labels(latent_id, label, score, score_kind, explainer, prompt, date, n_scored)``: written later by
  auto-interpretation (:meth:`FeatureDB.add_label`).

Strings are stored exactly as decoded (``<script>`` stays ``<script>``): escaping is the job of
whatever renders them. Format 1 (before exact text) is still read: its spans are per-token decodes, with
U+FFFD for split characters; rebuild to get the exact text.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mechscope.core.errors import CorruptFileError, DiskFullError, InputError
from mechscope.data.detokenize import decode_spans, token_labels

FORMAT_VERSION = 2
#: Formats this version reads (1: per-token decodes, no ``offsets`` column).
READABLE_VERSIONS = (1, 2)

SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE latents (id INTEGER, density DOUBLE, max_act FLOAT, mean_act FLOAT, n_fired BIGINT,
                      histogram INTEGER[], quantile_edges FLOAT[]);
CREATE TABLE contexts (context_id INTEGER, token_ids INTEGER[], str_tokens VARCHAR[], text VARCHAR,
                       offsets INTEGER[]);
CREATE TABLE examples (latent_id INTEGER, kind VARCHAR, bin SMALLINT, rank SMALLINT, context_id INTEGER,
                       max_pos SMALLINT, max_token VARCHAR, max_act FLOAT, acts FLOAT[]);
CREATE TABLE logit_effects (latent_id INTEGER, direction VARCHAR, rank SMALLINT, token_id INTEGER,
                            token_str VARCHAR, value FLOAT);
CREATE TABLE coactivation (latent_id INTEGER, other_id INTEGER, rank SMALLINT, count BIGINT, jaccard FLOAT);
CREATE TABLE labels (latent_id INTEGER, label VARCHAR, score DOUBLE, score_kind VARCHAR, explainer VARCHAR,
                     prompt VARCHAR, date VARCHAR, n_scored INTEGER);
"""
INDEXES = """
CREATE UNIQUE INDEX latents_id ON latents(id);
CREATE UNIQUE INDEX contexts_id ON contexts(context_id);
CREATE INDEX examples_latent ON examples(latent_id);
CREATE INDEX logit_effects_latent ON logit_effects(latent_id);
CREATE INDEX coactivation_latent ON coactivation(latent_id);
CREATE INDEX labels_latent ON labels(latent_id);
"""
TABLES = ("latents", "contexts", "examples", "logit_effects", "coactivation")
ORDERS = {"id": "id", "density": "density DESC, id", "max_act": "max_act DESC, id",
          "density_asc": "density, id"}


def _list_array(values_2d: np.ndarray, pa_type):
    """A pyarrow list column from a dense ``[rows, width]`` array (one list per row)."""
    import pyarrow as pa

    rows, width = values_2d.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values_2d.reshape(-1), type=pa_type))


def write_feature_db(path: str | Path, tables: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a feature database atomically from column tables (a killed build leaves no file at ``path``).

    Args:
        path: the ``.duckdb`` file to create or replace.
        tables: table name -> a pyarrow Table (or anything DuckDB can scan) whose columns are named as in
            :data:`SCHEMA` (matched by name; a column left out is NULL); each should be sorted by latent id.
            Missing tables stay empty.
        meta: JSON-able values for the ``meta`` table.

    Raises:
        InputError: an unknown table name.
        DiskFullError: the disk filled up (the old file at ``path``, if any, is intact).
    """
    import duckdb

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(tables) - set(TABLES) - {"labels"}
    if unknown:
        raise InputError(f"unknown feature-database tables {sorted(unknown)}; known: {TABLES}.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".building")
    os.close(fd)
    os.unlink(tmp)  # duckdb refuses to open an empty non-database file
    try:
        con = duckdb.connect(tmp)
        try:
            con.execute(SCHEMA)
            meta = {**meta, "format_version": FORMAT_VERSION}
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v, ensure_ascii=False)) for k, v in meta.items()])
            for name, table in tables.items():
                con.register("_src", table)
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _src")
                con.unregister("_src")
            con.execute(INDEXES)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException as e:
        for p in (tmp, tmp + ".wal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if isinstance(e, OSError) and getattr(e, "errno", None) in (28, 122):
            raise DiskFullError(f"the disk filled up while writing {path}; the old file is intact. "
                                "Free some space and re-run.") from e
        raise
    return path


def stats_tables(final, tokens, tokenizer) -> dict[str, Any]:
    """The database tables of :class:`~mechscope.features.stats.FinalStats` as pyarrow Tables.

    Args:
        final: the finalised statistics.
        tokens: ``[n_contexts, context_len]`` the token ids the statistics were computed on.
        tokenizer: decodes the contexts and token labels; None writes ``"#<id>"``.
    """
    import pyarrow as pa

    N = final.density.shape[0]
    P = tokens.shape[1]
    ids = np.arange(N, dtype=np.int32)
    latents = pa.table({
        "id": ids, "density": final.density.numpy(), "max_act": final.act_max.float().numpy(),
        "mean_act": final.act_mean.numpy(), "n_fired": final.fired.numpy(),
        "histogram": _list_array(final.hist.numpy().astype(np.int32), pa.int32()),
        "quantile_edges": _list_array(final.quant["edges"].numpy().astype(np.float32), pa.float32())})
    # examples: top then quantile, per latent
    parts = []
    for kind, d, has_bin in (("top", final.top, False), ("quantile", final.quant, True)):
        ctx = d["ctx"].numpy()
        S = ctx.shape[1]
        lat = np.repeat(ids, S)
        rank = np.tile(np.arange(S, dtype=np.int16), N)
        keep = ctx.reshape(-1) >= 0
        parts.append(dict(latent_id=lat[keep], kind=np.full(keep.sum(), kind, dtype=object),
                          bin=(d["bin"].numpy().reshape(-1)[keep].astype(np.int16) if has_bin
                               else np.full(keep.sum(), -1, dtype=np.int16)),
                          rank=rank[keep], context_id=ctx.reshape(-1)[keep].astype(np.int32),
                          max_pos=d["pos"].numpy().reshape(-1)[keep].astype(np.int16),
                          max_act=d["val"].numpy().reshape(-1)[keep].astype(np.float32),
                          acts=d["acts"].numpy().reshape(-1, P)[keep].astype(np.float32)))
    ex = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((ex["rank"], ex["bin"], ex["kind"] != "top", ex["latent_id"]))
    ex = {k: v[order] for k, v in ex.items()}
    used = np.unique(ex["context_id"])
    tok_np = tokens.numpy()
    ctx_tok = tok_np[used]
    decoded = decode_spans(tokenizer, ctx_tok.tolist())
    str_rows = [d.pieces for d in decoded]
    label_ids = set(np.unique(ctx_tok).tolist())
    logit_tables = None
    if final.logits is not None:
        up_v, up_i, down_v, down_i = (x.numpy() for x in final.logits)
        label_ids |= set(np.unique(up_i).tolist()) | set(np.unique(down_i).tolist())
    labels = token_labels(tokenizer, label_ids)
    contexts = pa.table({"context_id": used.astype(np.int32), "token_ids": _list_array(ctx_tok.astype(np.int32), pa.int32()),
                         "str_tokens": pa.array(str_rows, type=pa.list_(pa.string())),
                         "text": pa.array([d.text for d in decoded], type=pa.string()),
                         "offsets": pa.array([list(d.starts) for d in decoded], type=pa.list_(pa.int32()))})
    row_of = {int(c): r for r, c in enumerate(used.tolist())}
    max_token = [_shown_token(str_rows[row_of[c]][p], labels[int(ctx_tok[row_of[c], p])])
                 for c, p in zip(ex["context_id"].tolist(), ex["max_pos"].astype(np.int64).tolist())]
    examples = pa.table({"latent_id": ex["latent_id"], "kind": pa.array(ex["kind"].tolist(), type=pa.string()),
                         "bin": ex["bin"], "rank": ex["rank"], "context_id": ex["context_id"], "max_pos": ex["max_pos"],
                         "max_token": pa.array(max_token, type=pa.string()),
                         "max_act": ex["max_act"], "acts": _list_array(ex["acts"], pa.float32())})
    out = {"latents": latents, "contexts": contexts, "examples": examples}
    if final.logits is not None:
        n = up_v.shape[1]
        lat = np.repeat(ids, 2 * n)
        direction = np.tile(np.array(["up"] * n + ["down"] * n, dtype=object), N)
        rank = np.tile(np.concatenate([np.arange(n), np.arange(n)]).astype(np.int16), N)
        tid = np.concatenate([up_i, down_i], axis=1).reshape(-1).astype(np.int32)
        val = np.concatenate([up_v, down_v], axis=1).reshape(-1).astype(np.float32)
        logit_tables = pa.table({"latent_id": lat, "direction": pa.array(direction.tolist(), type=pa.string()),
                                 "rank": rank, "token_id": tid,
                                 "token_str": pa.array([labels[t] for t in tid.tolist()], type=pa.string()), "value": val})
        out["logit_effects"] = logit_tables
    if final.coact is not None:
        oid = final.coact["ids"].numpy()
        C = oid.shape[1]
        keep = oid.reshape(-1) >= 0
        out["coactivation"] = pa.table({
            "latent_id": np.repeat(ids, C)[keep], "other_id": oid.reshape(-1)[keep].astype(np.int32),
            "rank": np.tile(np.arange(C, dtype=np.int16), N)[keep],
            "count": final.coact["count"].numpy().reshape(-1)[keep].astype(np.int64),
            "jaccard": final.coact["jaccard"].numpy().reshape(-1)[keep].astype(np.float32)})
    return out


def _shown_token(span: str, label: str) -> str:
    """The text a token stands for in a list: its span of the context, unless that is empty or blank while
    the token alone is more (a byte fragment such as ``' \\xd7'``): then its label."""
    return span if span.strip() or span == label else label


class FeatureDB:
    """A feature database file (see the module docstring for the tables).

    Args:
        path: the ``.duckdb`` file.
        read_only: open without write access (many processes may read at once); ``False`` is needed for
            :meth:`add_label`.

    Raises:
        InputError: no file at ``path`` (or a folder), or another process holds the file open for writing.
        CorruptFileError: the file is truncated, is not a DuckDB file, is not a mechscope feature database,
            or has a format this version does not read; the message gives its size and the fix.
    """

    def __init__(self, path: str | Path, read_only: bool = True):
        import duckdb

        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder, not" if self.path.is_dir() else "does not exist; expected"
            raise InputError(f"{self.path} {what} a feature database (.duckdb). Build one with `mechscope features "
                             "build DICTIONARY --out FILE.duckdb`, or check the path.")
        size = self.path.stat().st_size
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as e:
            if "lock" in str(e).lower():
                raise InputError(f"cannot open {self.path}: another process holds it open for writing ({e}). A "
                                 "writer (FeatureDB(path, read_only=False), e.g. `mechscope features explain`) "
                                 "excludes every other connection; wait for it to finish or stop it.") from e
            raise CorruptFileError(f"{self.path} ({size:,} bytes) is not a readable DuckDB file: {e}. It may be "
                                   "truncated (an interrupted copy or download) or another kind of file; copy it "
                                   "again or rebuild it with `mechscope features build`.") from e
        try:
            rows = self.con.execute("SELECT key, value FROM meta").fetchall()
            self.meta = {k: json.loads(v) for k, v in rows}
            version = self.meta.get("format_version")
            if version not in READABLE_VERSIONS:
                raise CorruptFileError(f"{self.path} has feature-database format {version!r}; this mechscope reads "
                                       f"{list(READABLE_VERSIONS)}. Rebuild it with `mechscope features build`.")
            self.format_version = int(version)
            self.n_latents = int(self.con.execute("SELECT count(*) FROM latents").fetchone()[0])
        except (duckdb.Error, json.JSONDecodeError, TypeError, ValueError) as e:
            self.con.close()
            if isinstance(e, CorruptFileError):
                raise
            raise CorruptFileError(f"{self.path} ({size:,} bytes) is a DuckDB file but not a readable mechscope "
                                   f"feature database ({type(e).__name__}: {e}); rebuild it with `mechscope features "
                                   "build`.") from e
        except BaseException:
            self.con.close()
            raise

    @classmethod
    def create(cls, path: str | Path, final, tokens, tokenizer, meta: dict[str, Any]) -> "FeatureDB":
        """Build the database from finalised statistics (atomically) and open it read-only.

        Args:
            path: destination ``.duckdb`` file (replaced if it exists).
            final: :class:`~mechscope.features.stats.FinalStats`.
            tokens: ``[n_contexts, context_len]`` int64 the statistics were computed on.
            tokenizer: the model's tokenizer (None: token strings are ``"#<id>"``).
            meta: provenance for the ``meta`` table (JSON-able).
        """
        meta = {"n_tokens": final.n_tokens, "n_contexts": int(tokens.shape[0]), "context_len": int(tokens.shape[1]),
                "hist_edges": final.hist_edges, "notes": final.notes,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
        write_feature_db(path, stats_tables(final, tokens, tokenizer), meta)
        return cls(path)

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- queries ---------------------------------------------------------------------------------------
    def _check_id(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= int(i) < self.n_latents:
            raise InputError(f"latent {i!r} does not exist; this database has latents 0..{self.n_latents - 1}.")
        return int(i)

    def feature(self, i: int) -> dict[str, Any]:
        """Everything about latent ``i`` as plain JSON types.

        Returns:
            dict with ``id, density, max_act, mean_act, n_fired, histogram {edges (log10 act), counts},
            quantile_edges, top [..], quantiles [..]`` (each example: ``context_id, max_pos, max_token,
            max_act, text`` (the exact context), ``tokens [str]`` (each token's span of ``text``; they join
            to it), ``acts [float]``, quantile examples also ``bin``), ``logits {up, down}`` (each
            ``token, token_id, value``), ``coactivation [{id, count, jaccard}]``, ``labels [..]``.

        Raises:
            InputError: no such latent.
        """
        i = self._check_id(i)
        c = self.con.cursor()
        row = c.execute("SELECT density, max_act, mean_act, n_fired, histogram, quantile_edges FROM latents "
                        "WHERE id = ?", [i]).fetchone()
        ex = c.execute("SELECT kind, bin, rank, context_id, max_pos, max_token, max_act, acts FROM examples "
                       "WHERE latent_id = ? ORDER BY kind DESC, bin, rank", [i]).fetchall()
        ctx_ids = sorted({r[3] for r in ex})
        ctx = {r[0]: r[1:] for r in c.execute("SELECT context_id, str_tokens, text FROM contexts WHERE context_id IN "
                                              f"({','.join(map(str, ctx_ids))})").fetchall()} if ctx_ids else {}
        logits = c.execute("SELECT direction, token_str, token_id, value FROM logit_effects WHERE latent_id = ? "
                           "ORDER BY direction DESC, rank", [i]).fetchall()
        coact = c.execute("SELECT other_id, count, jaccard FROM coactivation WHERE latent_id = ? ORDER BY rank",
                          [i]).fetchall()
        labels = c.execute("SELECT label, score, score_kind, explainer, prompt, date, n_scored FROM labels "
                           "WHERE latent_id = ? ORDER BY date", [i]).fetchall()
        c.close()

        def example(r):
            d = {"context_id": r[3], "max_pos": r[4], "max_token": r[5], "max_act": r[6], "text": ctx[r[3]][1],
                 "tokens": ctx[r[3]][0], "acts": r[7]}
            if r[0] == "quantile":
                d["bin"] = r[1]
            return d

        return {
            "id": i, "density": row[0], "max_act": row[1], "mean_act": row[2], "n_fired": row[3],
            "histogram": {"edges": self.meta.get("hist_edges"), "counts": row[4]}, "quantile_edges": row[5],
            "top": [example(r) for r in ex if r[0] == "top"],
            "quantiles": [example(r) for r in ex if r[0] == "quantile"],
            "logits": {d: [{"token": t, "token_id": tid, "value": v} for dd, t, tid, v in logits if dd == d]
                       for d in ("up", "down")},
            "coactivation": [{"id": o, "count": n, "jaccard": j} for o, n, j in coact],
            "labels": [dict(zip(("label", "score", "score_kind", "explainer", "prompt", "date", "n_scored"), r))
                       for r in labels],
        }

    def _ids(self, sql: str, params: list, limit: int) -> list[int]:
        if not isinstance(limit, int) or limit <= 0:
            raise InputError(f"limit must be a positive int, got {limit!r}.")
        return [r[0] for r in self.con.cursor().execute(sql + " LIMIT ?", [*params, limit]).fetchall()]

    def search_tokens(self, token: str, limit: int = 50) -> list[int]:
        """Latents whose top examples peak on ``token`` or that promote it, most matches first.

        Tokens compare after stripping surrounding whitespace (``" the"`` matches ``"the"``).
        """
        q = token.strip()
        return self._ids(
            "SELECT latent_id FROM (SELECT latent_id, count(*) AS n FROM examples WHERE kind = 'top' AND "
            "trim(max_token) = ? GROUP BY latent_id UNION ALL SELECT latent_id, count(*) AS n FROM logit_effects "
            "WHERE direction = 'up' AND trim(token_str) = ? GROUP BY latent_id) GROUP BY latent_id "
            "ORDER BY sum(n) DESC, latent_id", [q, q], limit)

    def search_text(self, text: str, limit: int = 50) -> list[int]:
        """Latents whose top contexts contain ``text`` (case-insensitive substring), most contexts first."""
        return self._ids(
            "SELECT e.latent_id FROM examples e JOIN (SELECT context_id FROM contexts WHERE "
            "contains(lower(text), lower(?))) c USING (context_id) WHERE e.kind = 'top' "
            "GROUP BY e.latent_id ORDER BY count(*) DESC, e.latent_id", [text], limit)

    def search_labels(self, text: str, limit: int = 50) -> list[int]:
        """Latents with a label containing ``text`` (case-insensitive), best score first."""
        return self._ids("SELECT latent_id FROM labels WHERE contains(lower(label), lower(?)) GROUP BY latent_id "
                         "ORDER BY max(score) DESC NULLS LAST, latent_id", [text], limit)

    def list_latents(self, order_by: str = "id", offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """A page of latents (``id, density, max_act, mean_act, n_fired, label``) in the given order.

        Args:
            order_by: ``id``, ``density`` (densest first), ``density_asc`` or ``max_act`` (largest first).

        Raises:
            InputError: an unknown order, a negative offset or a non-positive limit.
        """
        if order_by not in ORDERS:
            raise InputError(f"order_by={order_by!r} is unknown; use one of {sorted(ORDERS)}.")
        if not isinstance(offset, int) or offset < 0 or not isinstance(limit, int) or limit <= 0:
            raise InputError(f"need offset >= 0 and limit > 0, got offset={offset!r}, limit={limit!r}.")
        rows = self.con.cursor().execute(
            f"SELECT id, density, max_act, mean_act, n_fired FROM latents ORDER BY {ORDERS[order_by]} "
            "LIMIT ? OFFSET ?", [limit, offset]).fetchall()
        labels = {}
        if rows:
            ids = ",".join(str(r[0]) for r in rows)
            labels = dict(self.con.cursor().execute(
                f"SELECT latent_id, arg_max(label, score) FROM labels WHERE latent_id IN ({ids}) GROUP BY latent_id"
            ).fetchall())
        return [dict(id=r[0], density=r[1], max_act=r[2], mean_act=r[3], n_fired=r[4], label=labels.get(r[0]))
                for r in rows]

    # -- writing labels ----------------------------------------------------------------------------------
    def add_label(self, latent_id: int, label: str, *, score: float | None = None, score_kind: str | None = None,
                  explainer: str | None = None, prompt: str | None = None, date: str | None = None,
                  n_scored: int | None = None) -> None:
        """Add a label of latent ``latent_id`` (e.g. from auto-interpretation); earlier labels are kept.

        Args:
            label: the explanation text. score: its score (e.g. detection accuracy), None if unscored.
            score_kind: what ``score`` measures. explainer: model that wrote it. prompt: the prompt used.
            date: ISO date (default: now, UTC). n_scored: examples the score is computed on.

        Raises:
            InputError: no such latent, an empty label, or a database opened read-only.
        """
        i = self._check_id(latent_id)
        if not isinstance(label, str) or not label.strip():
            raise InputError("a label must be a non-empty string.")
        date = date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        import duckdb

        try:
            self.con.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [i, label, score, score_kind, explainer, prompt, date, n_scored])
        except duckdb.InvalidInputException as e:
            if "read-only" in str(e).lower() or "read only" in str(e).lower():
                raise InputError(f"{self.path} is open read-only; open it with FeatureDB(path, read_only=False) "
                                 "to add labels (no other process may have it open then).") from e
            raise

    def table(self, name: str):
        """A whole table as a pandas DataFrame (for tests and export; large for big databases)."""
        if name not in (*TABLES, "labels", "meta"):
            raise InputError(f"unknown table {name!r}; tables: {(*TABLES, 'labels', 'meta')}.")
        order = {"meta": "key", "latents": "id", "contexts": "context_id",
                 "examples": "latent_id, kind DESC, bin, rank", "logit_effects": "latent_id, direction DESC, rank",
                 "coactivation": "latent_id, rank", "labels": "latent_id, date"}[name]
        return self.con.cursor().execute(f"SELECT * FROM {name} ORDER BY {order}").df()
