"""Sparse dictionaries: SAEs and transcoders of every architecture, one registry, one on-disk format.

- :class:`DictionaryConfig` / :data:`ARCHITECTURES`: what a dictionary is (``cfg.json``).
- :class:`SparseDictionary`: the module (relu, topk, batchtopk, jumprelu; SAE or transcoder, with skip).
- :func:`save_dictionary` / :func:`load_dictionary`: mechscope's format; SAELens and sparsify folders
  are detected and converted (:mod:`mechscope.dictionaries.interop`).
- :class:`Splice`: the intervention that splices a dictionary into a model, its latents exposed as sites.
- :class:`Crosscoder`: one dictionary over two models' activations (model diffing), with
  :mod:`~mechscope.dictionaries.crosscoder_analysis` (relative decoder norms, Latent Scaling, top contexts).
"""

from mechscope.dictionaries.config import ARCHITECTURES, DictionaryConfig
from mechscope.dictionaries.interop import load_saelens, load_sparsify, save_saelens, save_sparsify
from mechscope.dictionaries.io import save_dictionary
from mechscope.dictionaries.loader import load_dictionary
from mechscope.dictionaries.model import SparseDictionary
from mechscope.dictionaries.splice import Splice
from mechscope.dictionaries.crosscoder import (Crosscoder, CrosscoderConfig, load_crosscoder, save_crosscoder,
                                               stack_models)
from mechscope.dictionaries.crosscoder_analysis import (LatentScaling, classify_latents, decoder_cosines,
                                                        latent_scaling, relative_norms, scaling_betas)

__all__ = ["ARCHITECTURES", "DictionaryConfig", "SparseDictionary", "Splice", "load_dictionary", "save_dictionary",
           "load_saelens", "save_saelens", "load_sparsify", "save_sparsify"]
__all__ += ["Crosscoder", "CrosscoderConfig", "load_crosscoder", "save_crosscoder", "stack_models", "LatentScaling",
            "classify_latents", "decoder_cosines", "latent_scaling", "relative_norms", "scaling_betas"]
