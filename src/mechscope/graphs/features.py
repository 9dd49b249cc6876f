"""A feature database for every transcoder of a set, from one pass of the model over real text.

The databases sit in the set's folder, ``features/L00.duckdb`` ... (one per layer, the format of
``mechscope features build``): the graph viewer reads a feature node's top contexts, logit effects and label
from the database of its layer. :func:`build_set_features` computes all of them from one streaming pass
(:func:`mechscope.features.multi.build_feature_dbs`); :func:`open_set_features` opens them and refuses a
database that was built from other weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mechscope.core.errors import InputError
from mechscope.features.stats import StatsConfig
from mechscope.graphs.transcoders import TranscoderSet, layer_folder

FEATURES_DIR = "features"


def feature_db_path(folder: str | Path, layer: int) -> Path:
    """``<set folder>/features/L{layer:02d}.duckdb``."""
    return Path(folder) / FEATURES_DIR / f"{layer_folder(layer)}.duckdb"


def build_set_features(model, transcoders: TranscoderSet, tokens: Tensor, *, folder: str | Path | None = None,
                       layers: list[int] | None = None, cfg: StatsConfig | None = None, resume: bool = False,
                       meta: dict | None = None, encode_dtype: str = "float32",
                       progress: bool = True, dist=None) -> dict[int, Path]:
    """Build the feature database of each transcoder of ``transcoders`` in one pass over ``tokens``.

    Args:
        model: the HookedModel the set was trained on. transcoders: the set.
        tokens: ``[n_contexts, context_len]`` int64 contexts (BOS first), e.g. ``corpus_tokens(...).tokens``.
        folder: the set's folder (default: the folder it was loaded from); databases go to ``folder/features/``.
        layers: only these layers (default: all).
        cfg: :class:`~mechscope.features.stats.StatsConfig`; the default keeps 10 top and 10 quantile examples
            per latent (``top_k=10, per_bin=2``) so that 30 layers' running state fits a few GB.
        resume: continue an interrupted build (layers already written are kept).
        meta: provenance written into every database (corpus, split, ...).
        encode_dtype: ``float32`` (exact) or ``bfloat16`` (the encoder matmul in bf16, as ``features build``
            does for a bf16 model).
        dist: a :class:`~mechscope.scale.dist.DistInfo` (torchrun): the batches split over ranks, rank 0 writes
            (:func:`~mechscope.features.multi.build_feature_dbs`).

    Returns:
        ``{layer: path}`` of the databases.

    Raises:
        InputError: the set is not of this model; no folder; a layer the set does not have; as
            :func:`~mechscope.features.multi.build_feature_dbs`.
    """
    from mechscope.features.multi import build_feature_dbs
    from mechscope.features.sources import FeatureSource

    transcoders.check_model(model)
    folder = folder if folder is not None else transcoders.source
    if folder is None:
        raise InputError("the transcoder set was not loaded from a folder; pass folder= (where features/ goes).")
    layers = list(range(transcoders.n_layers)) if layers is None else list(layers)
    bad = [L for L in layers if not 0 <= L < transcoders.n_layers]
    if bad or not layers:
        raise InputError(f"layers {bad or layers} are not layers of the set (0..{transcoders.n_layers - 1}).")
    cfg = cfg or StatsConfig(top_k=10, per_bin=2)
    folder = Path(folder)
    (folder / FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    sources = [FeatureSource(model, dictionary=transcoders[L], dictionary_path=str(folder.resolve() / layer_folder(L)),
                             encode_dtype=encode_dtype) for L in layers]
    outs = [feature_db_path(folder, L) for L in layers]
    build_feature_dbs(sources, tokens, outs, cfg, resume=resume, metas=[{"layer": L, **(meta or {})} for L in layers],
                      progress=progress, dist=dist)
    return dict(zip(layers, outs))


def open_set_features(folder: str | Path, transcoders: TranscoderSet | None = None) -> dict:
    """Open the feature databases of a set's folder, read-only: ``{layer: FeatureDB}`` (layers without one are
    absent; an empty dict when the set has none).

    Raises:
        InputError: a database built from another transcoder than the set's one of its layer (checked when
            ``transcoders`` is given: latent count, hook and decoder hash).
    """
    from mechscope.features.db import FeatureDB
    from mechscope.features.sources import check_database_matches

    layers = range(transcoders.n_layers) if transcoders is not None else sorted(
        int(p.stem[1:]) for p in (Path(folder) / FEATURES_DIR).glob("L*.duckdb") if p.stem[1:].isdigit())
    out = {}
    try:
        for L in layers:
            p = feature_db_path(folder, L)
            if p.exists():
                out[L] = FeatureDB(p)
                if transcoders is not None:
                    check_database_matches(out[L], transcoders[L])
    except InputError:
        for db in out.values():
            db.close()
        raise
    return out
