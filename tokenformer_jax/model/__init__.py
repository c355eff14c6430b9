"""Models: Pattention, the TokenFormer block, the dense baseline block, and the language model around them.

The pure functions `pattention` and `normalize_scores` live in `tokenformer_jax.model.pattention` and are not
re-exported here, so that name keeps meaning the submodule.
"""
from tokenformer_jax.model.lm import LanguageModel, abstract_params, init_params, logical_axes
from tokenformer_jax.model.pattention import Pattention

__all__ = ["LanguageModel", "Pattention", "abstract_params", "init_params", "logical_axes"]
