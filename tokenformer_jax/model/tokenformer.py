"""The TokenFormer block (paper Eq. 5-10): every linear projection is a Pattention.

    X_inter = X + Pattention_O(Attention(Pattention_Q(LN X), Pattention_K(LN X), Pattention_V(LN X)))
    X_out   = X_inter + Pattention_FFN(LN X_inter)

LayerNorms inside the block have no scale or bias (paper Table 5), unless model.block_norm gives them a bias, or
a scale and a bias (layers.block_norm).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax

from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model.layers import (ACTIVATION_AXES, block_norm, cached_self_attention, causal_self_attention,
                                          drop_path)
from tokenformer_jax.model.pattention import Pattention, pattention
from tokenformer_jax.model.pattention_lean import lean_pattention
from tokenformer_jax.model.pattention_pallas import DEFAULT_TOKEN_BLOCK, pallas_pattention
from tokenformer_jax.model.pattention_parallel import tensor_parallel_pattention


def init_stds(cfg: ModelConfig, projection: str) -> tuple[float, float]:
  """(key std, value std) of one projection's parameter tokens (every projection here has d_in = d_model)."""
  if cfg.init == "neox":
    return 0.02, 2.0 / (cfg.n_layers * math.sqrt(cfg.d_model))
  return 1.0 / math.sqrt(cfg.d_model), 1.0 / math.sqrt(cfg.tokens(projection))


def pattention_function(cfg: ModelConfig) -> Callable:
  """The Eq. 4 function a model's Pattentions call: cfg.pattention_kernel ("plain" | "lean" | "pallas", with
  cfg.pattention_block rows per block and, for "pallas", cfg.pattention_token_block tokens) in
  cfg.pattention_impl's form ("auto" | "shard_map"; "pallas" is always in the shard_map form)."""
  return _kernel(cfg.pattention_kernel, cfg.pattention_impl, cfg.pattention_block, cfg.pattention_token_block,
                 cfg.unroll_layers)


@functools.cache   # one object per choice, so that modules built from equal configs compare equal
def _kernel(kernel: str, impl: str, block: int, token_block: int, unroll: bool) -> Callable:
  if kernel == "pallas":
    # A Pallas call is opaque to the partitioner: under any mesh it runs per device inside the shard_map (the batch
    # split as the mesh says, K_P / V_P all-gathered unless split over "tensor"); without one, directly.
    function = functools.partial(pallas_pattention, block=block, token_block=token_block or DEFAULT_TOKEN_BLOCK)
    return functools.partial(tensor_parallel_pattention, kernel=function, check_vma=False)
  # unroll_layers asks for loop-free code (the plan's cost compile): unroll the blocks too.
  function = pattention if kernel == "plain" else functools.partial(lean_pattention, block=block, unroll=unroll)
  if impl == "shard_map":
    return functools.partial(tensor_parallel_pattention, kernel=function)
  return function


def make_pattention(cfg: ModelConfig, projection: str) -> Pattention:
  key_std, value_std = init_stds(cfg, projection)
  return Pattention(
      n_tokens=cfg.tokens(projection), n_storage=cfg.storage_tokens(projection), d_out=cfg.d_model,
      n_scale=cfg.scale_tokens(projection), normalization=cfg.normalization,
      approximate_gelu=cfg.approximate_gelu, key_std=key_std, value_std=value_std,
      dtype=cfg.dtype, kernel=pattention_function(cfg), name=projection)


class TokenFormerBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None = None, start: jax.Array | None = None, drop_rate=None):
    """x → (x, None); decoding (layers.cached_self_attention): x, this layer's KV cache, start → (x, cache).
    `drop_rate`: this layer's stochastic depth (layers.drop_path; training an image classifier)."""
    cfg = self.cfg
    h = block_norm(cfg, "attention_norm")(x)
    q, k, v = (make_pattention(cfg, p)(h) for p in ("query", "key", "value"))
    if cache is None:
      attended = causal_self_attention(q, k, v, cfg)
    else:
      attended, cache = cached_self_attention(q, k, v, cfg, cache, start)
    x = x + drop_path(self, make_pattention(cfg, "output")(attended), drop_rate)
    x = x + drop_path(self, make_pattention(cfg, "ffn")(block_norm(cfg, "ffn_norm")(x)), drop_rate)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), cache
