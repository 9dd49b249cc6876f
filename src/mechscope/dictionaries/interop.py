"""Converters between mechscope dictionaries and the on-disk formats of SAELens and EleutherAI sparsify.

Both directions are exact: a converted dictionary gives the peer's latents and reconstruction on the
same input (up to float rounding where a fold multiplies weights). What a format cannot represent is
refused with an :class:`InputError` naming the architecture and what is supported; nothing is dropped
silently. Peer libraries are never imported here: the formats are read and written from their specs.

SAELens (>= 6; folder with ``cfg.json`` + ``sae_weights.safetensors``; weights already in mechscope's
orientation, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, except ``W_skip [d_out, d_in]``):

=============================  =================================================================
SAELens ``architecture``       mechscope
=============================  =================================================================
``standard``                   ``relu`` SAE
``topk``                       ``topk``; ``rescale_acts_by_decoder_norm=True`` is folded into the
                               weights (``W_enc, b_enc *= |W_dec|``, ``W_dec /= |W_dec|``), exact
``jumprelu``                   ``jumprelu``; or ``batchtopk`` (threshold mode) when its metadata says
                               it was trained as BatchTopK with an integer ``k`` (SAELens saves
                               BatchTopK for inference as JumpReLU with the learnt threshold)
``batchtopk``                  ``batchtopk`` (a SAELens *training* checkpoint: scalar ``topk_threshold``)
``transcoder``                 ``relu`` transcoder
``skip_transcoder``            ``relu`` skip transcoder (``W_skip`` transposed)
``jumprelu_transcoder``        ``jumprelu`` transcoder
``jumprelu_skip_transcoder``   ``jumprelu`` skip transcoder
=============================  =================================================================

SAELens's JumpReLU computes ``relu(pre) * (pre > threshold)``, mechscope's ``pre * (pre > threshold)``;
they agree for ``threshold >= 0``, and SAELens's equals mechscope's with the threshold clamped at 0, which
is what loading does. Saving refuses a negative threshold. Saving writes mechscope's own config into
``metadata["mechscope"]`` (SAELens keeps unknown metadata keys), so a mechscope -> SAELens -> mechscope
round trip restores the config exactly; SAELens-native fields win where both exist.

sparsify (eai-sparsify >= 1; folder with ``cfg.json`` + ``sae.safetensors``): TopK only. The encoder is
an ``nn.Linear`` (``encoder.weight [d_sae, d_in]``, transposed here), ``W_dec [d_sae, d_in]``, ``b_dec``,
``W_skip [d_out, d_in]`` (transposed). Sparsify subtracts ``b_dec`` from an SAE's input (never a
transcoder's) and takes the top k of ``relu(pre)``, where mechscope takes the top k of ``pre`` and then
applies ReLU: the latents are the same. A sparsify folder records no hook name; ``hook=``, then mechscope's
own note (``cfg.json["mechscope"]``, written by :func:`save_sparsify`), then the folder name (a canonical
hook name, or a sparsify hookpoint, see :func:`hook_from_sparsify_name`) supply it.

References:
    SAELens, ``sae_lens/saes/*.py`` (v6 ``SAE.save_model`` / ``SAE.load_from_disk``); EleutherAI sparsify,
    ``sparsify/sparse_coder.py`` (``SparseCoder.save_to_disk`` / ``load_from_disk``), ``fused_encoder.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mechscope.core.errors import CorruptFileError, HookNameError, InputError
from mechscope.core.io import load_safetensors, save_safetensors_atomic, write_folder_atomic, write_json_atomic
from mechscope.core.names import parse
from mechscope.dictionaries.config import DictionaryConfig
from mechscope.dictionaries.io import CFG, from_tensors, read_cfg_json
from mechscope.dictionaries.model import SparseDictionary

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

#: SAELens architecture -> (mechscope architecture, transcoder, skip)
SAELENS_ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("batchtopk", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
#: The SAELens format version written (>= 6.0 makes SAELens read the nested ``metadata`` as is).
SAELENS_FORMAT_VERSION = "6.0.0"

_SPARSIFY_KEYS = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                  "skip_connection", "transcode", "d_in", "mechscope"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


# -- shared helpers ----------------------------------------------------------------------------------
def _check_hook(name: str, what: str) -> str:
    try:
        parse(name)
    except HookNameError as e:
        raise InputError(f"{what} {name!r} is not a mechscope hook name: {e}. Pass hook='blocks.L.hook_...' "
                         "(for a transcoder 'IN->OUT').") from None
    return name


def _split_hook(hook: str | None) -> tuple[str | None, str | None]:
    """``"IN->OUT"`` -> (IN, OUT); ``"NAME"`` -> (NAME, None); None -> (None, None)."""
    if hook is None:
        return None, None
    if "->" in hook:
        a, b = (s.strip() for s in hook.split("->", 1))
        return a, b
    return hook, None


def _dtype_name(t: torch.Tensor) -> str:
    return _DTYPE_NAMES.get(t.dtype, "float32")


def _float_tensors(tensors: dict[str, torch.Tensor], dtype_name: str) -> dict[str, torch.Tensor]:
    dt = getattr(torch, dtype_name)
    return {k: v.to(dt) for k, v in tensors.items()}


def _mechscope_note(d: SparseDictionary) -> dict[str, Any]:
    return d.cfg.to_dict()


def _restore(cfg: DictionaryConfig, note: Any, fields: tuple[str, ...]) -> DictionaryConfig:
    """Take ``fields`` from a ``mechscope`` note (our config, saved beside a foreign one) where valid."""
    if not isinstance(note, dict):
        return cfg
    changes = {f: note[f] for f in fields if f in note}
    if "metadata" in changes and not isinstance(changes["metadata"], dict):
        changes.pop("metadata")
    try:
        return cfg.replace(**changes)
    except (InputError, TypeError):
        return cfg  # a stale or edited note: the foreign fields stand


# -- SAELens -----------------------------------------------------------------------------------------
def _saelens_cfg_v6(raw: dict[str, Any]) -> dict[str, Any]:
    """A SAELens cfg.json in the v6 layout; flat pre-6.0 configs (``hook_point``, ``activation_fn_str``)
    are lifted to it, as SAELens itself does."""
    meta = raw.get("metadata")
    version = (meta or {}).get("sae_lens_version") if isinstance(meta, dict) else None
    version = version or raw.get("sae_lens_version")
    if isinstance(meta, dict) and version and not str(version).startswith(("0.", "1.", "2.", "3.", "4.", "5.")):
        return raw
    cfg = dict(raw)
    meta = dict(meta) if isinstance(meta, dict) else {}
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index")):
        if old in cfg:
            cfg[new] = cfg.pop(old)
    for key in ("model_name", "hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out"):
        if key in cfg:
            meta.setdefault(key, cfg[key])
    act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if "architecture" not in cfg:
        cfg["architecture"] = "topk" if act == "topk" else "standard"
    if act not in ("relu", "topk") and cfg["architecture"] == "standard":
        raise InputError(f"this SAELens (< 6) file uses activation_fn={act!r}; mechscope reads 'relu' and 'topk'.")
    if cfg["architecture"] == "topk" and "k" not in cfg:
        cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    cfg["metadata"] = meta
    return cfg


def _saelens_hooks(cfg_dict, meta, transcoder: bool, hook: str | None, folder: Path) -> tuple[str, str]:
    h_in, h_out = _split_hook(hook)
    h_in = h_in or meta.get("hook_name") or cfg_dict.get("hook_name")
    if not h_in:
        raise InputError(f"the SAELens cfg in {folder} records no hook name; pass hook='blocks.L.hook_...'.")
    if transcoder:
        h_out = h_out or meta.get("hook_name_out") or cfg_dict.get("hook_name_out")
        if not h_out:
            raise InputError(f"the SAELens transcoder in {folder} records no output hook (metadata.hook_name_out); "
                             "pass hook='IN->OUT', e.g. 'blocks.3.ln2.hook_normalized->blocks.3.hook_mlp_out'.")
    else:
        h_out = h_out or h_in
    return _check_hook(h_in, "the input hook"), _check_hook(h_out, "the output hook")


def load_saelens(folder: str | Path, *, device=None, hook: str | None = None) -> SparseDictionary:
    """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) as a :class:`SparseDictionary`.

    Args:
        folder: the folder SAELens's ``save_model`` / ``save_inference_model`` wrote (v6; older flat
            configs are lifted as SAELens does).
        device: where the weights go.
        hook: overrides the recorded hook name (``"IN->OUT"`` for a transcoder's two hooks).

    Returns:
        The dictionary in eval mode; latents equal SAELens's ``encode`` and the output its ``forward``
        (``decode`` plus the skip connection) on the same input.

    Raises:
        InputError: an architecture mechscope lacks (gated, abstopk, matching pursuit, temporal, ...), an
            input normalisation that cannot be folded (``normalize_activations`` other than ``"none"``),
            a per-head SAE (``hook_head_index``), a non-integer BatchTopK ``k``, or no usable hook name.
        CorruptFileError: a truncated weights file or tensors that do not match the cfg.
    """
    folder = Path(folder)
    cfg_dict = _saelens_cfg_v6(read_cfg_json(folder))
    arch = cfg_dict.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise InputError(f"SAELens architecture {arch!r} (in {folder}) has no mechscope equivalent; mechscope "
                         f"reads {sorted(SAELENS_ARCHITECTURES)}.")
    kind, transcoder, skip = SAELENS_ARCHITECTURES[arch]
    meta = cfg_dict.get("metadata") or {}
    norm = cfg_dict.get("normalize_activations", "none")
    if norm != "none":
        raise InputError(
            f"{folder} has normalize_activations={norm!r}: its inputs are rescaled at run time by a factor the "
            "folder does not hold ('expected_average_only_in') or per token ('constant_norm_rescale', "
            "'layer_norm'), which mechscope cannot fold into the weights. Fold it in SAELens "
            "(sae.fold_activation_norm_scaling_factor(factor); sae.save_model(folder)) or use an SAE trained "
            "with normalize_activations='none'.")
    if meta.get("hook_head_index") is not None:
        raise InputError(f"{folder} is an SAE of one attention head (hook_head_index={meta['hook_head_index']}); "
                         "mechscope dictionaries read whole sites (hook_z flattened over heads).")
    if cfg_dict.get("finetuning_scaling_factor"):
        raise InputError(f"{folder} uses a finetuning_scaling_factor (SAELens < 6); re-save it with SAELens >= 6.")
    t = load_safetensors(folder / SAELENS_WEIGHTS, what="SAELens weights")
    weights = {k: t.pop(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k in t}
    if "W_skip" in t:
        weights["W_skip"] = t.pop("W_skip").T.contiguous()  # SAELens [d_out, d_in] -> [d_in, d_out]
    if "threshold" in t:
        weights["threshold"] = t.pop("threshold")
    elif "log_threshold" in t:
        weights["threshold"] = t.pop("log_threshold").exp()
    elif "topk_threshold" in t:  # BatchTopK training checkpoint: one scalar threshold
        weights["threshold"] = t.pop("topk_threshold").to(weights["b_enc"].dtype).expand(cfg_dict["d_sae"]).clone()
    if t:
        raise CorruptFileError(f"{folder / SAELENS_WEIGHTS} holds tensors {sorted(t)} that a SAELens {arch!r} "
                               "does not have; it may be another architecture than its cfg.json says.")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if name not in weights:
            raise CorruptFileError(f"{folder / SAELENS_WEIGHTS} has no {name}; it is not a complete SAELens SAE.")
    dtype = _dtype_name(weights["W_enc"])
    weights = _float_tensors(weights, dtype)

    if kind in ("topk", "batchtopk") and cfg_dict.get("rescale_acts_by_decoder_norm", False):
        with torch.no_grad():  # SAELens ranks pre * |W_dec_i| and decodes acts / |W_dec_i|: fold it
            n = weights["W_dec"].norm(dim=-1).clamp_min(1e-8)
            weights["W_enc"] = weights["W_enc"] * n
            weights["b_enc"] = weights["b_enc"] * n
            weights["W_dec"] = weights["W_dec"] / n[:, None]
    if "threshold" in weights:
        weights["threshold"] = weights["threshold"].clamp_min(0)  # relu(pre)*(pre>t) == pre*(pre>max(t,0))

    note = meta.get("mechscope") if isinstance(meta.get("mechscope"), dict) else None
    details = meta.get("training_architecture_details") or {}
    k = None
    if kind == "topk":
        k = cfg_dict.get("k")
    elif kind == "batchtopk":
        k = cfg_dict.get("k")
    elif kind == "jumprelu" and meta.get("training_architecture") == "batchtopk":
        k = details.get("k") if isinstance(details, dict) else None
        if isinstance(k, (int, float)) and float(k).is_integer():
            kind = "batchtopk"
    if kind in ("topk", "batchtopk"):
        if not isinstance(k, (int, float)) or not float(k).is_integer():
            raise InputError(f"{folder}: a SAELens {arch} with k={k!r}; mechscope's {kind} needs an integer k.")
        k = int(k)
    else:
        k = None
    h_in, h_out = _saelens_hooks(cfg_dict, meta, transcoder, hook, folder)
    if h_in == h_out and skip:
        raise InputError(f"{folder}: a skip transcoder reading and writing the same hook {h_in}; mechscope's "
                         "skip connection is for transcoders (hook_out != hook_in).")
    bandwidth = details.get("jumprelu_bandwidth", 0.05) if isinstance(details, dict) else 0.05
    try:
        cfg = DictionaryConfig(
            architecture=kind, d_in=int(cfg_dict["d_in"]), d_sae=int(cfg_dict["d_sae"]), hook_in=h_in, hook_out=h_out,
            d_out=int(cfg_dict.get("d_out", cfg_dict["d_in"])), k=k, skip=skip,
            apply_b_dec_to_input=bool(cfg_dict.get("apply_b_dec_to_input", True)) and not transcoder,
            jumprelu_bandwidth=float(bandwidth) if kind == "jumprelu" else 0.05,
            model_name=str(meta.get("model_name") or ""), dtype=dtype,
            metadata={"source": "saelens", "saelens_architecture": arch})
    except KeyError as e:
        raise InputError(f"the SAELens cfg.json in {folder} has no {e.args[0]!r}.") from None
    if note is not None:
        fields = ["jumprelu_bandwidth", "metadata", "model_name"]
        if transcoder:
            fields.append("apply_b_dec_to_input")  # meaningless for transcoders; keep the saved value
        cfg = _restore(cfg, note, tuple(fields))
    return from_tensors(cfg, weights, source=str(folder / SAELENS_WEIGHTS), device=device)


def save_saelens(d: SparseDictionary, folder: str | Path) -> Path:
    """Save a dictionary as a SAELens (v6) folder that ``SAE.load_from_disk`` reads, atomically.

    relu -> ``standard``; topk -> ``topk`` (``rescale_acts_by_decoder_norm=False``); jumprelu ->
    ``jumprelu``; batchtopk -> ``jumprelu`` with its inference threshold (SAELens's own convention,
    ``metadata.training_architecture="batchtopk"``); transcoders -> ``transcoder`` / ``skip_transcoder`` /
    ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``. mechscope's config goes in ``metadata["mechscope"]``.

    Raises:
        InputError: a topk transcoder (SAELens has no TopK transcoder), or a negative JumpReLU/BatchTopK
            threshold (SAELens's JumpReLU zeroes negative pre-activations, so the latents would change).
        DiskFullError: the disk filled up; an earlier folder is left intact.
    """
    cfg = d.cfg
    kind = cfg.architecture
    thresholded = kind in ("jumprelu", "batchtopk")
    if cfg.is_sae:
        arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[kind]
    else:
        if kind == "topk":
            raise InputError("SAELens has no TopK transcoder (its transcoders are relu and jumprelu); save this one "
                             "with mechscope.dictionaries.save_dictionary or save_sparsify.")
        arch = ("jumprelu_" if thresholded else "") + ("skip_transcoder" if cfg.skip else "transcoder")
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if thresholded:
        if (d.threshold < 0).any():
            raise InputError(f"this {kind} dictionary has negative thresholds (min {d.threshold.min().item():.3g}); "
                             "SAELens computes relu(pre) * (pre > threshold), so latents with pre in (threshold, 0] "
                             "would change. Clamp them first: d.threshold.data.clamp_(min=0).")
        tensors["threshold"] = d.threshold
    if cfg.skip:
        tensors["W_skip"] = d.W_skip.T  # [d_in, d_out] -> SAELens [d_out, d_in]
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "model_name": cfg.model_name or None, "hook_name": cfg.hook_in, "hook_head_index": None,
        "mechscope": _mechscope_note(d),
    }
    if not cfg.is_sae:
        metadata["hook_name_out"] = cfg.hook_out
    if kind == "batchtopk":
        metadata["training_architecture"] = "batchtopk"
        metadata["training_architecture_details"] = {"k": cfg.k}
    elif kind == "jumprelu":
        metadata["training_architecture"] = "jumprelu"
        metadata["training_architecture_details"] = {"jumprelu_bandwidth": cfg.jumprelu_bandwidth}
    out: dict[str, Any] = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input and cfg.is_sae),
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook_in.endswith("attn.hook_z") and cfg.is_sae else "none",
        "metadata": metadata, "architecture": arch,
    }
    if kind == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if not cfg.is_sae:
        out["d_out"] = cfg.d_out

    def write(tmp: Path):
        save_safetensors_atomic(tensors, tmp / SAELENS_WEIGHTS, metadata={"format": "pt"})
        write_json_atomic(out, tmp / CFG)

    return write_folder_atomic(folder, write)


# -- sparsify ----------------------------------------------------------------------------------------
_LAYER_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def hook_from_sparsify_name(name: str, transcoder: bool) -> tuple[str, str] | None:
    """mechscope hooks ``(hook_in, hook_out)`` for a sparsify hookpoint folder name, or None.

    Sparsify names folders by the module it hooked (``layers.6``, ``model.layers.6.mlp``,
    ``gpt_neox.layers.6``, ``h.6.mlp``). An SAE reads the module's output; a transcoder maps the module's
    input to its output:

    =========================  ============================  ==============================================
    hookpoint                  SAE                           transcoder
    =========================  ============================  ==============================================
    ``...layers.L``            ``blocks.L.hook_resid_post``  ``blocks.L.hook_resid_pre -> ...hook_resid_post``
    ``...layers.L.mlp``        ``blocks.L.hook_mlp_out``     ``blocks.L.ln2.hook_normalized -> ...hook_mlp_out``
    ``...layers.L.self_attn``  ``blocks.L.hook_attn_out``    (no single-tensor input: pass ``hook=``)
    =========================  ============================  ==============================================

    A canonical mechscope hook name is taken as is. For models with a norm after the MLP (Gemma 2/3)
    ``hook_mlp_out`` is after that norm while sparsify's ``mlp`` output is before it: pass ``hook=``.
    """
    try:
        parse(name)
        return (name, name) if not transcoder else None
    except HookNameError:
        pass
    m = _LAYER_HOOKPOINT.match(name)
    if not m:
        return None
    layer, sub = m.group(1), m.group(2)
    if sub is None:
        pair = (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post")
    elif sub == "mlp":
        pair = (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
    else:
        if transcoder:
            return None
        pair = (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_attn_out")
    return pair if transcoder else (pair[1], pair[1])


def load_sparsify(folder: str | Path, *, device=None, hook: str | None = None) -> SparseDictionary:
    """Load an EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``) as a topk dictionary.

    Args:
        folder: one hookpoint's folder (``SparseCoder.save_to_disk`` output).
        device: where the weights go.
        hook: the hook it reads (``"IN->OUT"`` for a transcoder); default: what :func:`save_sparsify`
            noted in the cfg, else the folder name (see :func:`hook_from_sparsify_name`).

    Returns:
        A ``topk`` dictionary; its dense latents equal sparsify's ``encode`` (``top_acts`` scattered at
        ``top_indices``), its output sparsify's ``decode`` (+ ``x @ W_skip.T``).

    Raises:
        InputError: ``activation="groupmax"``, an SAE with a skip connection, unknown cfg keys, no hook.
        CorruptFileError: a truncated weights file, a missing decoder, or tensors that do not match the cfg.
    """
    folder = Path(folder)
    raw = read_cfg_json(folder)
    unknown = sorted(set(raw) - _SPARSIFY_KEYS)
    if unknown:
        raise InputError(f"the sparsify cfg.json in {folder} has keys {unknown} that mechscope does not know; "
                         f"known: {sorted(_SPARSIFY_KEYS)}. It may be a newer sparsify format.")
    act = raw.get("activation", "topk")
    if act != "topk":
        raise InputError(f"sparsify activation={act!r} (in {folder}) has no mechscope equivalent; mechscope reads "
                         "sparsify's 'topk'.")
    transcoder = bool(raw.get("transcode", False))
    skip = bool(raw.get("skip_connection", False))
    if skip and not transcoder:
        raise InputError(f"{folder} is a sparsify SAE with a skip connection; mechscope has skip connections only "
                         "for transcoders (hook_out != hook_in).")
    if "d_in" not in raw or "k" not in raw:
        raise InputError(f"the sparsify cfg.json in {folder} lacks 'd_in' or 'k'.")
    t = load_safetensors(folder / SPARSIFY_WEIGHTS, what="sparsify weights")
    if "W_dec" not in t:
        raise CorruptFileError(f"{folder / SPARSIFY_WEIGHTS} has no decoder (W_dec); it was saved with "
                               "decoder=False and cannot reconstruct.")
    try:
        weights = {"W_enc": t.pop("encoder.weight").T.contiguous(), "b_enc": t.pop("encoder.bias"),
                   "W_dec": t.pop("W_dec"), "b_dec": t.pop("b_dec")}
    except KeyError as e:
        raise CorruptFileError(f"{folder / SPARSIFY_WEIGHTS} has no {e.args[0]!r}; not a sparsify SparseCoder.") from None
    if "W_skip" in t:
        weights["W_skip"] = t.pop("W_skip").T.contiguous()  # nn.Linear (out, in) -> [d_in, d_out]
    if t:
        raise CorruptFileError(f"{folder / SPARSIFY_WEIGHTS} holds unexpected tensors {sorted(t)}.")
    dtype = _dtype_name(weights["W_enc"])
    weights = _float_tensors(weights, dtype)
    d_in = int(raw["d_in"])
    d_sae = int(weights["W_enc"].shape[1])
    expected = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
    if d_sae != expected:
        raise CorruptFileError(f"{folder}: the encoder has {d_sae} latents but cfg.json implies {expected}.")
    note = raw.get("mechscope") if isinstance(raw.get("mechscope"), dict) else {}
    h_in, h_out = _split_hook(hook)
    if h_in is None and note.get("hook_in"):
        h_in, h_out = note["hook_in"], note.get("hook_out")
    if h_in is None:
        pair = hook_from_sparsify_name(folder.name, transcoder)
        if pair is None:
            raise InputError(
                f"a sparsify folder records no hook name, and the folder name {folder.name!r} is neither a "
                "mechscope hook name nor a sparsify hookpoint like 'layers.6' or 'layers.6.mlp'. Pass "
                "hook='blocks.6.hook_resid_post' (for a transcoder 'IN->OUT').")
        h_in, h_out = pair
    if transcoder and h_out is None:
        raise InputError(f"{folder} is a sparsify transcoder: pass hook='IN->OUT', e.g. "
                         "'blocks.6.ln2.hook_normalized->blocks.6.hook_mlp_out'.")
    h_out = h_out or h_in
    _check_hook(h_in, "the input hook")
    _check_hook(h_out, "the output hook")
    if transcoder and h_in == h_out:
        raise InputError(f"{folder} is a sparsify transcoder (it does not subtract b_dec) but hook_in == hook_out "
                         f"== {h_in}; give distinct hooks 'IN->OUT'.")
    cfg = DictionaryConfig(
        architecture="topk", d_in=d_in, d_sae=d_sae, hook_in=h_in, hook_out=h_out,
        d_out=int(weights["W_dec"].shape[1]), k=int(raw["k"]), skip=skip,
        apply_b_dec_to_input=not transcoder, dtype=dtype,
        metadata={"source": "sparsify", "sparsify_cfg": {k: v for k, v in raw.items() if k != "mechscope"}})
    fields = ["model_name", "metadata", "jumprelu_bandwidth"] + (["apply_b_dec_to_input"] if transcoder else [])
    cfg = _restore(cfg, note, tuple(fields))
    if not transcoder and note.get("apply_b_dec_to_input") is False:  # undo save_sparsify's fold
        weights["b_enc"] = weights["b_enc"] - weights["b_dec"] @ weights["W_enc"]
        cfg = cfg.replace(apply_b_dec_to_input=False)
    return from_tensors(cfg, weights, source=str(folder / SPARSIFY_WEIGHTS), device=device)


def save_sparsify(d: SparseDictionary, folder: str | Path) -> Path:
    """Save a topk dictionary as a sparsify folder that ``SparseCoder.load_from_disk`` reads, atomically.

    The encoder is written in ``nn.Linear`` orientation. An SAE with ``apply_b_dec_to_input=False`` is
    written with ``b_enc + b_dec @ W_enc`` as its encoder bias, since sparsify always subtracts ``b_dec``
    (exact up to rounding). mechscope's config goes in ``cfg.json["mechscope"]`` (sparsify drops extra keys).

    Raises:
        InputError: an architecture other than topk (sparsify has TopK only), or a transcoder with
            ``d_out != d_in`` (sparsify's transcoders keep the width).
        DiskFullError: the disk filled up; an earlier folder is left intact.
    """
    cfg = d.cfg
    if cfg.architecture != "topk":
        raise InputError(f"sparsify has TopK sparse coders only; this dictionary is {cfg.architecture!r}. Save it "
                         "with save_saelens or mechscope.dictionaries.save_dictionary.")
    if not cfg.is_sae and cfg.d_out != cfg.d_in:
        raise InputError(f"sparsify transcoders have d_out == d_in; this one maps {cfg.d_in} -> {cfg.d_out}.")
    with torch.no_grad():
        b_enc = d.b_enc.detach()
        if cfg.is_sae and not cfg.apply_b_dec_to_input:
            b_enc = b_enc + d.b_dec.detach() @ d.W_enc.detach()  # sparsify subtracts b_dec: compensate
        tensors = {"encoder.weight": d.W_enc.T, "encoder.bias": b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
        if cfg.skip:
            tensors["W_skip"] = d.W_skip.T
        unit = bool(torch.allclose(d.W_dec.norm(dim=-1).float(), torch.ones(cfg.d_sae), atol=1e-4))
    out = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": unit,
           "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
           "transcode": not cfg.is_sae, "d_in": cfg.d_in, "mechscope": _mechscope_note(d)}

    def write(tmp: Path):
        save_safetensors_atomic(tensors, tmp / SPARSIFY_WEIGHTS, metadata={"format": "pt"})
        write_json_atomic(out, tmp / CFG)

    return write_folder_atomic(folder, write)


# -- dispatch ----------------------------------------------------------------------------------------
def load_foreign(folder: str | Path, fmt: str, device=None, hook: str | None = None) -> SparseDictionary:
    """Load a ``"saelens"`` or ``"sparsify"`` folder (what :func:`mechscope.dictionaries.io.detect_format` says).

    Raises:
        InputError: an unknown ``fmt``, or what :func:`load_saelens` / :func:`load_sparsify` raise.
    """
    if fmt == "saelens":
        return load_saelens(folder, device=device, hook=hook)
    if fmt == "sparsify":
        return load_sparsify(folder, device=device, hook=hook)
    raise InputError(f"unknown dictionary format {fmt!r}; interop reads 'saelens' and 'sparsify'.")


__all__ = ["SAELENS_ARCHITECTURES", "hook_from_sparsify_name", "load_foreign", "load_saelens", "load_sparsify",
           "save_saelens", "save_sparsify"]
