"""Sparse dictionaries: SAEs and transcoders of every architecture, one registry, one on-disk format.

- :class:`DictionaryConfig` / :data:`ARCHITECTURES`: what a dictionary is (``cfg.json``).
- :class:`SparseDictionary`: the module (relu, topk, batchtopk, jumprelu; SAE or transcoder, with skip).
- :func:`save_dictionary` / :func:`load_dictionary`: mechscope's format; SAELens and sparsify folders
  are detected and converted (:mod:`mechscope.dictionaries.interop`).
- :class:`Splice`: the intervention that splices a dictionary into a model, its latents exposed as sites.
"""

from mechscope.dictionaries.config import ARCHITECTURES, DictionaryConfig
from mechscope.dictionaries.interop import load_saelens, load_sparsify, save_saelens, save_sparsify
from mechscope.dictionaries.io import save_dictionary
from mechscope.dictionaries.loader import load_dictionary
from mechscope.dictionaries.model import SparseDictionary
from mechscope.dictionaries.splice import Splice

__all__ = ["ARCHITECTURES", "DictionaryConfig", "SparseDictionary", "Splice", "load_dictionary", "save_dictionary",
           "load_saelens", "save_saelens", "load_sparsify", "save_sparsify"]
