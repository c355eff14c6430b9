"""Models: Pattention, the TokenFormer block, the dense baseline block, and the language model around them."""
from tokenformer_jax.model.lm import LanguageModel, abstract_params, init_params, logical_axes
from tokenformer_jax.model.pattention import Pattention, normalize_scores, pattention

__all__ = ["LanguageModel", "abstract_params", "init_params", "logical_axes", "Pattention", "normalize_scores", "pattention"]
