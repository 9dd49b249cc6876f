"""Splicing a dictionary into a model's forward pass, with its latents exposed as hook sites.

``model.run(tokens, saes=[sae])`` replaces ``sae.cfg.hook_out`` with the dictionary's reconstruction.
While spliced, the sites ``<hook_out>.sae.hook_sae_input``, ``.hook_sae_acts_pre``,
``.hook_sae_acts_post``, ``.hook_sae_recons``, ``.hook_sae_error`` (with ``error_term=True``) and
``.hook_sae_output`` can be cached, patched, ablated and given gradients like any other site, in the
same call (``cache=["blocks.6.hook_resid_post.sae.hook_sae_acts_post"]``).

With ``error_term=True`` the written value is ``reconstruction + error``, where the error
``activation - reconstruction`` is computed without gradient: the model's output is unchanged (up to
float rounding), an edit of the latents propagates downstream, and gradients reach the latents
only through the decoder (Marks et al. 2024, "Sparse Feature Circuits", section 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechscope.core.errors import InputError, ShapeError
from mechscope.core.names import SAE_SITES, axes
from mechscope.hooks.interventions import Selector, _Intervention


def site_width(model, site: str) -> int:
    """Feature width of a site of ``model`` as a dictionary sees it (hook_z/per-head sites flattened)."""
    c = model.cfg
    sizes = {"d_model": c.d_model, "d_mlp": c.d_mlp, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
             "d_head": c.d_head}
    names = axes(site)
    feat = [a for a in names if a not in ("batch", "pos", "kv_pos")]
    if not feat or any(a not in sizes for a in feat) or "kv_pos" in names or names[:2] != ("batch", "pos"):
        raise InputError(f"a dictionary cannot read {site} (axes {names}); use a [batch, pos, features] site "
                         "such as hook_resid_post, hook_mlp_out, mlp.hook_post or attn.hook_z.")
    w = 1
    for a in feat:
        w *= sizes[a]
    return w


def _width_terms(model, site: str) -> str:
    """How a site's width is made, e.g. ``d_model=576`` or ``n_heads*d_head=9*64``."""
    c = model.cfg
    feat = [a for a in axes(site) if a not in ("batch", "pos")]
    return "*".join(feat) + "=" + "*".join(str(getattr(c, a)) for a in feat)


def check_fits(model, dictionary) -> None:
    """Check that ``model`` has the hooks a dictionary reads and writes, at the widths it was trained on.

    Raises:
        InputError: a hook the model lacks (closest valid names), or a width that differs; the message names
            the dictionary's cfg.json (when it was loaded from a folder), its width, the hook, the model's
            width, and the fix: the model the dictionary was trained on, or a dictionary of this model.
    """
    from pathlib import Path

    from mechscope.core.errors import MechscopeError

    cfg = dictionary.cfg
    source = getattr(dictionary, "source", None)
    where = str(Path(source) / "cfg.json") if source else "the dictionary's config"
    trained = f" ({cfg.model_name})" if cfg.model_name else ""
    fix = (f"Fix: pass the model the dictionary was trained on{trained} (--model on the command line), or a "
           f"dictionary trained on {model.cfg.name}.")
    for hook, d, what in ((cfg.hook_in, cfg.d_in, "d_in"), (cfg.hook_out, cfg.d_out, "d_out")):
        try:
            model.resolve([hook])
        except MechscopeError as e:  # an unknown name, a layer past the last, a site this family lacks
            raise InputError(f"{where} says the dictionary reads {hook}, which {model.cfg.name} does not have "
                             f"({str(e).rstrip('.')}). {fix}") from None
        w = site_width(model, hook)
        if w != d:
            raise InputError(f"{where} says {what}={d}, but {hook} of {model.cfg.name} is {w} wide "
                             f"({_width_terms(model, hook)}): the dictionary was trained on another model or hook. {fix}")


@dataclass(frozen=True, eq=False)
class Splice:
    """Replace a dictionary's output site with its reconstruction (an intervention).

    Attributes:
        dictionary: a :class:`SparseDictionary` (SAE: reads and writes ``hook_in``; transcoder: reads
            ``hook_in`` and writes ``hook_out``).
        error_term: add back the reconstruction error (computed without gradient), so the model's
            output is unchanged and only edits of the latents have an effect.
        positions, batch: where the output is written back (elsewhere the activation is untouched);
            the latents are computed, and their sites fire, for every position.

    Raises (when used):
        InputError: a hook the model lacks, or a dictionary width that does not match the hook.
    """

    dictionary: Any
    error_term: bool = False
    positions: Selector = None
    batch: Selector = None
    _inputs: dict = field(default_factory=dict, repr=False)

    emits = True  # tells the hook runtime to pass emit=site() so the latents are hook sites

    @property
    def site(self) -> str:
        return self.dictionary.cfg.hook_out

    def sub_sites(self) -> list[str]:
        return [f"{self.site}.sae.{s}" for s in SAE_SITES if self.error_term or s != "hook_sae_error"]

    def check_model(self, model) -> None:
        cfg = self.dictionary.cfg
        model.resolve([cfg.hook_in, cfg.hook_out])
        check_fits(model, self.dictionary)

    def captures(self) -> dict[str, Callable[[Tensor], None]]:
        """For transcoders: a hook at ``hook_in`` that keeps the input for the output site."""
        cfg = self.dictionary.cfg
        if cfg.is_sae:
            return {}

        def keep(value: Tensor) -> None:
            self._inputs["x"] = value

        return {cfg.hook_in: keep}

    def apply(self, value: Tensor, emit: Callable[[str, Tensor], Tensor] | None = None) -> Tensor:
        emit = emit or (lambda name, v: v)
        d = self.dictionary
        s = self.site
        shape = value.shape
        flat = lambda t: t.reshape(*t.shape[:2], -1)  # noqa: E731 - hook_z: heads flattened
        if d.cfg.is_sae:
            x = flat(value)
        else:
            if "x" not in self._inputs:
                raise InputError(f"the transcoder's input {d.cfg.hook_in} did not fire before {s}.")
            x = flat(self._inputs.pop("x"))
        x0 = x
        x = emit(f"{s}.sae.hook_sae_input", x)
        pre0 = d.encode_pre(x)
        pre = emit(f"{s}.sae.hook_sae_acts_pre", pre0)
        acts0 = d.activate(pre)
        acts = emit(f"{s}.sae.hook_sae_acts_post", acts0)
        recons = emit(f"{s}.sae.hook_sae_recons", d.decode(acts, x))
        out = recons
        if self.error_term:
            with torch.no_grad():  # the error of the *unedited* dictionary: edits of the latents must show
                clean = recons if (x is x0 and pre is pre0 and acts is acts0) else d(x0)
                err = flat(value).to(recons.dtype) - clean.detach()
            out = recons + emit(f"{s}.sae.hook_sae_error", err)
        out = emit(f"{s}.sae.hook_sae_output", out)
        out = out.reshape(shape).to(value.dtype)
        # where to write back: the same batch x positions selection every intervention uses
        mask = _Intervention(s, positions=self.positions, batch=self.batch).mask(value)
        if out.shape != value.shape:  # pragma: no cover - guarded by check_model
            raise ShapeError(f"the dictionary's output {tuple(out.shape)} does not fit {s} {tuple(value.shape)}.")
        return out if mask is None else torch.where(mask, out, value)
