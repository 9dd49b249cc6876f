"""The canonical hook-name vocabulary (TransformerLens-compatible) and its parser.

One table, :data:`SITES`, holds every site with the axes of its tensor. Axis names follow
STYLE.md: ``batch pos kv_pos d_model d_vocab n_heads n_kv_heads d_head d_mlp``.

Names are either global (``hook_embed``) or per layer (``blocks.{L}.attn.hook_z``); the template
form uses ``{L}`` for the layer index.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable

from mechscope.core.errors import HookNameError

#: template -> (axes, description). Axes are space-separated names from the shared vocabulary.
SITES: dict[str, tuple[str, str]] = {
    "hook_embed": ("batch pos d_model", "token embedding (as the model scales it)"),
    "hook_pos_embed": ("batch pos d_model", "learned positional embedding (GPT-2 only)"),
    "blocks.{L}.hook_resid_pre": ("batch pos d_model", "residual stream entering block L"),
    "blocks.{L}.ln1.hook_normalized": ("batch pos d_model", "normalised input of attention"),
    "blocks.{L}.attn.hook_q": ("batch pos n_heads d_head", "queries as attention uses them (after RoPE)"),
    "blocks.{L}.attn.hook_k": ("batch kv_pos n_kv_heads d_head", "keys as attention uses them (after RoPE; n_kv_heads, GQA kept native)"),
    "blocks.{L}.attn.hook_v": ("batch kv_pos n_kv_heads d_head", "values (n_kv_heads, GQA kept native)"),
    "blocks.{L}.attn.hook_attn_scores": ("batch n_heads pos kv_pos", "pre-softmax scores, scaled, soft-capped, masked with -inf"),
    "blocks.{L}.attn.hook_pattern": ("batch n_heads pos kv_pos", "attention probabilities"),
    "blocks.{L}.attn.hook_z": ("batch pos n_heads d_head", "per-head mix of values, input of the output projection"),
    "blocks.{L}.attn.hook_result": ("batch pos n_heads d_model", "per-head output z_h @ W_O[h] (sums over heads, plus b_O, to the output projection)"),
    "blocks.{L}.hook_attn_out": ("batch pos d_model", "attention branch added to the residual stream"),
    "blocks.{L}.hook_resid_mid": ("batch pos d_model", "residual stream between attention and MLP"),
    "blocks.{L}.ln2.hook_normalized": ("batch pos d_model", "normalised input of the MLP"),
    "blocks.{L}.mlp.hook_pre": ("batch pos d_mlp", "MLP pre-activation (gate projection for gated MLPs)"),
    "blocks.{L}.mlp.hook_pre_linear": ("batch pos d_mlp", "linear (up) projection of a gated MLP"),
    "blocks.{L}.mlp.hook_post": ("batch pos d_mlp", "MLP hidden activation, input of the down projection"),
    "blocks.{L}.hook_mlp_out": ("batch pos d_model", "MLP branch added to the residual stream"),
    "blocks.{L}.hook_resid_post": ("batch pos d_model", "residual stream leaving block L"),
    "ln_final.hook_normalized": ("batch pos d_model", "output of the final norm, input of the unembedding"),
}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

#: Sites of a dictionary spliced in at a hook ``S`` (named ``S.sae.<sub>``), with their axes. They exist
#: only while a dictionary is spliced there (``run(..., saes=[...])``). ``d_in`` is the site's feature
#: width (hook_z flattened to n_heads*d_head); ``d_out`` the reconstructed site's.
SAE_SITES: dict[str, tuple[str, str]] = {
    "hook_sae_input": ("batch pos d_in", "the activation the dictionary reads"),
    "hook_sae_acts_pre": ("batch pos d_sae", "latent pre-activations"),
    "hook_sae_acts_post": ("batch pos d_sae", "latent activations (the features)"),
    "hook_sae_recons": ("batch pos d_out", "the reconstruction"),
    "hook_sae_error": ("batch pos d_out", "activation minus reconstruction (only with error_term=True)"),
    "hook_sae_output": ("batch pos d_out", "what is written back: reconstruction (+ error)"),
}


def split_sae(name: str) -> tuple[str, str] | None:
    """``(base site, sub-site)`` for a spliced-dictionary site name ``<base>.sae.<sub>``, else None."""
    base, sep, sub = name.rpartition(".sae.")
    if sep and sub in SAE_SITES:
        return base, sub
    return None


def parse(name: str) -> tuple[str, int | None]:
    """Split a concrete hook name into (template, layer).

    Raises:
        HookNameError: if the name matches no template (message lists the closest templates).
    """
    sae = split_sae(name)
    if sae is not None:
        template, layer = parse(sae[0])
        return f"{template}.sae.{sae[1]}", layer
    m = _LAYER_RE.match(name)
    if m:
        template = "blocks.{L}." + m.group(2)
        if template in SITES:
            return template, int(m.group(1))
    elif name in SITES:
        return name, None
    close = difflib.get_close_matches(name, list(SITES), n=3, cutoff=0.5)
    raise HookNameError(f"{name!r} is not a hook name. Closest templates: {close or list(SITES)[:5]}")


def axes(name: str) -> tuple[str, ...]:
    """Axis names of the tensor at a hook (concrete name or template)."""
    sae = split_sae(name)
    if sae is not None:
        return tuple(SAE_SITES[sae[1]][0].split())
    template = name if name in SITES else parse(name)[0]
    return tuple(SITES[template][0].split())


def expand(templates: Iterable[str], n_layers: int) -> list[str]:
    """All concrete names of the given templates, in forward order of layers."""
    out = []
    per_layer = [t for t in templates if "{L}" in t]
    out += [t for t in templates if "{L}" not in t and t != "ln_final.hook_normalized"]
    for layer in range(n_layers):
        out += [t.format(L=layer) for t in per_layer]
    out += [t for t in templates if t == "ln_final.hook_normalized"]
    return out


def resolve(patterns: str | Iterable[str], valid: list[str]) -> list[str]:
    """Resolve names and glob patterns (``blocks.*.hook_resid_post``) against the valid names.

    Returns the matches in forward order, without duplicates.

    Raises:
        HookNameError: for a name or pattern that matches nothing; lists the closest valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for p in patterns:
        if any(c in p for c in "*?["):
            hits = fnmatch.filter(valid, p)
        else:
            hits = [p] if p in valid else []
        if not hits:
            close = difflib.get_close_matches(p, valid, n=5, cutoff=0.6)
            hint = f" Closest valid names: {close}." if close else ""
            raise HookNameError(
                f"{p!r} matches no hook point of this model.{hint} "
                "See model.hook_names() for the full table."
            )
        chosen.update(hits)
    return [n for n in valid if n in chosen]
