"""Models: Pattention, the TokenFormer block, the dense baseline block, and the language model and the image
classifier around them (`network(cfg)` picks the one a config describes: model.vision set or not).

The pure functions `pattention` and `normalize_scores` live in `tokenformer_jax.model.pattention` and are not
re-exported here, so that name keeps meaning the submodule.
"""
import functools

import flax.linen as nn
import jax

from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model import lm, vision
from tokenformer_jax.model.lm import LanguageModel
from tokenformer_jax.model.pattention import Pattention
from tokenformer_jax.model.vision import VisionModel

__all__ = ["LanguageModel", "Pattention", "VisionModel", "abstract_params", "init_params", "logical_axes", "network"]


def network(cfg: ModelConfig) -> tuple[nn.Module, jax.Array]:
  """(the Flax module of `cfg`, the smallest input its `init` takes): a VisionModel when model.vision is set,
  else a LanguageModel."""
  module = lm if cfg.vision is None else vision
  return (LanguageModel if cfg.vision is None else VisionModel)(cfg), module.example_input(cfg)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Fresh float32 parameters (a plain nested dict; logical-axis metadata stripped)."""
  module, example = network(cfg)
  return nn.meta.unbox(module.init(rng, example)["params"])


def abstract_params(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of the parameters, computed without allocating them (works for any size)."""
  return nn.meta.unbox(_boxed_shapes(cfg))


def logical_axes(cfg: ModelConfig) -> dict:
  """The logical axis names of every parameter, as a tree of PartitionSpecs."""
  return nn.get_partition_spec(_boxed_shapes(cfg))


@functools.lru_cache(maxsize=64)
def _boxed_shapes(cfg: ModelConfig) -> dict:
  """The parameters' shapes with their logical axes, from one abstract trace of `init` per config (a run's set-up
  asks for both, several times; each trace of the model costs a few tenths of a second)."""
  module, example = network(cfg)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), example))["params"]
