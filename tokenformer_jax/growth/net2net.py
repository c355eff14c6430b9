"""Net2Net widening of the dense Transformer baseline (Chen et al. 2015; the paper's §4.3 comparison).

Every unit is duplicated the same number of times, k = d_new / d_old: a feature vector v becomes
tile(v, k) (k copies side by side). Uniform duplication keeps LayerNorm's mean and variance, so the widened
network computes the same function exactly:

    linear      W' = tile(W, (k, k)) / k,  b' = tile(b)        (tiled input → tiled output)
    LayerNorm   scale' = tile(scale), bias' = tile(bias)
    embedding   E' = tile(E)                                  (tiled residual stream)
    heads       n_heads' = k · n_heads, head_dim unchanged     (head h + c·H is a copy of head h)
    final norm  scale and bias ÷ k, so the tied logits y'·E'ᵀ = k·(y·Eᵀ) come out unchanged

Copies get identical gradients, so `noise` (a fraction of each tensor's std) breaks the symmetry, as
Net2Net recommends; noise=0 is exactly function-preserving.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tokenformer_jax.config import ModelConfig

_SAME_FIELDS = ("vocab_size", "vocab_multiple", "n_layers", "mlp_ratio", "mlp", "positions", "rotary_base",
                "final_norm_params", "logits_divide_by_sqrt_d", "layer_norm_eps")


def widening_factor(old: ModelConfig, new: ModelConfig) -> int:
  """k such that new = old widened k times; ValueError naming what does not fit."""
  for cfg in (old, new):
    if cfg.architecture != "transformer":
      raise ValueError(f"Net2Net widens dense Transformers; {cfg.name} is a {cfg.architecture}")
    if cfg.vision is not None or cfg.norm_params != "scale_bias":
      raise ValueError(f"Net2Net here widens the dense language model with its parametric norms; {cfg.name} is "
                       f"{'an image classifier' if cfg.vision is not None else 'one with other block norms'}")
  for field in _SAME_FIELDS:
    if getattr(old, field) != getattr(new, field):
      raise ValueError(f"cannot widen {old.name} into {new.name}: {field} is {getattr(old, field)!r} in the old "
                       f"model and {getattr(new, field)!r} in the new one; Net2Net here only widens d and heads")
  k, rest = divmod(new.d_model, old.d_model)
  if rest or k < 1:
    raise ValueError(f"cannot widen d_model {old.d_model} to {new.d_model} exactly: LayerNorm stays unchanged "
                     "only when every unit is copied the same number of times, so d_new must be a multiple of d_old")
  if new.n_heads != k * old.n_heads or new.rotary_dims != old.rotary_dims:
    raise ValueError(f"widening d by {k} needs n_heads {k * old.n_heads} (head_dim unchanged), "
                     f"got n_heads={new.n_heads}")
  return k


def net2net_widen(params: dict, old: ModelConfig, new: ModelConfig, *, noise: float = 0.0,
                  rng: jax.Array | None = None) -> dict:
  k = widening_factor(old, new)
  tile_vector = lambda x: jnp.tile(x, (1,) * (x.ndim - 1) + (k,))                 # [..., d] → [..., k·d]
  tile_matrix = lambda w: jnp.tile(w, (1,) * (w.ndim - 2) + (k, k)) / k           # [..., i, o] → [..., k·i, k·o]
  logit_factor = math.sqrt(k) if old.logits_divide_by_sqrt_d else 1.0              # sqrt(d) grows by sqrt(k)

  def widen(path, x):
    names = [p.key for p in path]
    if names == ["embedding"]:
      return tile_vector(x)
    if names[0] == "final_norm":
      return tile_vector(x) * logit_factor / k
    if names[-1] == "kernel":
      return tile_matrix(x)
    return tile_vector(x)                                                          # biases, norm scales

  widened = jax.tree_util.tree_map_with_path(widen, params)
  if not noise:
    return widened
  leaves, tree = jax.tree.flatten(widened)
  keys = jax.random.split(rng if rng is not None else jax.random.key(0), len(leaves))
  noisy = [x + noise * jnp.std(x) * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)]
  return jax.tree.unflatten(tree, noisy)
