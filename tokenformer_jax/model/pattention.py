"""Pattention: cross-attention from input tokens to learnable key/value parameter tokens (paper Eq. 4).

    A = X · K_Pᵀ                       scores against the n key parameter tokens   [..., n]
    O = Θ(A) · V_P                     weighted sum of the n value parameter tokens [..., d_out]

Θ normalises over the n parameter tokens:
    l2_norm_gelu   gelu(A / ‖A‖₂ · sqrt(n_scale))       the default, used by every released model
    gelu_l2_norm   g = gelu(A);  g / ‖g‖₂ · sqrt(n_scale)
    gelu_l1_norm   g = gelu(A);  g / Σ|g| · n_scale      (paper Table 4's middle row: softmax's L1, GeLU's shape)
    softmax        softmax(A) · n_scale                  (stable: the max is subtracted)
    gelu           gelu(A), no normalisation: a two-layer MLP without biases (the "just an FFN?" control)

`n_scale` is a constant: with it fixed, appending tokens whose keys are zero leaves O unchanged
(paper App. B). The authors' code uses the live row count instead, which breaks that (REFERENCE.md).

Rows past `n_valid` are storage padding. With zero keys and zero values they add nothing to ‖A‖₂ or O
and get zero gradient under the L2 and L1 variants (gelu(0) = 0); softmax, where exp(0) ≠ 0, masks them
explicitly.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tokenformer_jax.config import NORMALIZATIONS

# A floor on ‖A‖₂² (not an added epsilon): any non-degenerate score vector is normalised exactly, and an
# all-zero one maps to zero instead of NaN.
MIN_SUM_OF_SQUARES = 1e-12
MIN_SUM_OF_ABS = 1e-6   # the same floor on Σ|g| (gelu_l1_norm)

PARAM_TOKENS_AXIS = "param_tokens"
EMBED_AXIS = "embed"
SCORES_AXES = ("batch", "length", PARAM_TOKENS_AXIS)
OUTPUT_NAME = "pattention_out"   # for remat="projections", which saves exactly these


def _global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Sum over the parameter-token axis, across shards when the tokens are split over `axis_name`."""
  local = jnp.sum(x, axis=-1, keepdims=True)
  return local if axis_name is None else jax.lax.psum(local, axis_name)


def _l2_normalize(x: jax.Array, n_scale: float, axis_name: str | None) -> jax.Array:
  sum_of_squares = _global_sum(jnp.square(x), axis_name)
  return x * (math.sqrt(n_scale) * jax.lax.rsqrt(jnp.maximum(sum_of_squares, MIN_SUM_OF_SQUARES)))


def normalize_scores(scores: jax.Array, *, normalization: str = "l2_norm_gelu", n_scale: float,
                     n_valid: int | None = None, approximate_gelu: bool = False,
                     axis_name: str | None = None) -> jax.Array:
  """Θ of Eq. 4, in float32 whatever the input dtype (bf16 norms made the authors' loss NaN).

  `axis_name`: the mesh axis the parameter tokens are split over inside a shard_map; the sums (and the
  softmax max) then become collectives over it, and everything else stays local.
  """
  scores = scores.astype(jnp.float32)
  gelu = lambda x: jax.nn.gelu(x, approximate=approximate_gelu)
  if normalization == "l2_norm_gelu":
    return gelu(_l2_normalize(scores, n_scale, axis_name))
  if normalization == "gelu_l2_norm":
    return _l2_normalize(gelu(scores), n_scale, axis_name)
  if normalization == "gelu_l1_norm":
    g = gelu(scores)
    # |g| as g·sign(g): its derivative is sign(g), 0 at g = 0, so zero-key rows get no gradient (jnp.abs's is 1).
    return g * (n_scale / jnp.maximum(_global_sum(g * jnp.sign(g), axis_name), MIN_SUM_OF_ABS))
  if normalization == "gelu":
    return gelu(scores)
  if normalization == "softmax":
    if n_valid is not None:
      local_rows = scores.shape[-1]
      row = jnp.arange(local_rows)
      if axis_name is not None:
        row = row + jax.lax.axis_index(axis_name) * local_rows
      scores = jnp.where(row < n_valid, scores, -jnp.inf)
    local_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))   # a shift: no gradient
    row_max = local_max if axis_name is None else jax.lax.pmax(local_max, axis_name)
    exp = jnp.exp(scores - row_max)
    return exp * (n_scale / _global_sum(exp, axis_name))
  raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def pattention(x: jax.Array, key_param_tokens: jax.Array, value_param_tokens: jax.Array, *,
               normalization: str = "l2_norm_gelu", n_scale: float | None = None, n_valid: int | None = None,
               approximate_gelu: bool = False, axis_name: str | None = None) -> jax.Array:
  """Eq. 4: Θ(x · K_Pᵀ) · V_P.  x: [..., d_in]; key_param_tokens: [n, d_in]; value_param_tokens: [n, d_out].

  Matmuls run in x's dtype with float32 accumulation; Θ runs in float32. `n_scale=None` means the number of
  rows of `key_param_tokens`. Under a shard_map that splits the rows over `axis_name`, pass the global
  `n_scale`; the result is then this shard's partial sum of O (the caller reduces it).
  """
  if n_scale is None:
    n_scale = key_param_tokens.shape[0]
  scores = jnp.einsum("...i,ni->...n", x, key_param_tokens.astype(x.dtype), preferred_element_type=jnp.float32)
  if axis_name is None and scores.ndim == len(SCORES_AXES):
    # Under a sharding context (sharding.activation_sharding) the scores keep the batch split and split their
    # parameter-token axis like the tokens; elsewhere a no-op.
    scores = nn.with_logical_constraint(scores, SCORES_AXES)
  weights = normalize_scores(scores, normalization=normalization, n_scale=n_scale, n_valid=n_valid,
                             approximate_gelu=approximate_gelu, axis_name=axis_name)
  return jnp.einsum("...n,no->...o", weights.astype(x.dtype), value_param_tokens.astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def rows_then_zeros(init, n_valid: int):
  """An initializer for [n_storage, d] that draws from `init` and zeroes the padding rows past n_valid."""
  def initializer(key, shape, dtype=jnp.float32):
    values = init(key, shape, dtype)
    return values * (jnp.arange(shape[0]) < n_valid)[:, None].astype(dtype)
  return initializer


class Pattention(nn.Module):
  """A Pattention layer with `n_tokens` logical parameter tokens stored as `n_storage` rows.

  Parameters (float32): key_param_tokens [n_storage, d_in], value_param_tokens [n_storage, d_out], with
  logical axes ("param_tokens", "embed") for the sharding table.
  """
  n_tokens: int
  d_out: int
  n_storage: int | None = None     # None: n_tokens
  n_scale: float | None = None     # None: n_tokens
  normalization: str = "l2_norm_gelu"
  approximate_gelu: bool = False
  key_std: float | None = None     # None: 1/sqrt(d_in)
  value_std: float | None = None   # None: 1/sqrt(n_tokens)
  dtype: jnp.dtype = jnp.float32
  # The function computing Eq. 4 with `pattention`'s signature: `pattention` itself, the blocked
  # `lean_pattention` (pattention_lean.py), or either in the explicit tensor-parallel form (pattention_parallel.py).
  # The model picks it from its config (tokenformer.pattention_function).
  kernel: Callable = pattention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_storage = self.n_storage or self.n_tokens
    if n_storage < self.n_tokens:
      raise ValueError(f"{self.name}: n_storage={n_storage} is smaller than n_tokens={self.n_tokens}")
    d_in = x.shape[-1]
    key_std = self.key_std if self.key_std is not None else 1.0 / math.sqrt(d_in)
    value_std = self.value_std if self.value_std is not None else 1.0 / math.sqrt(self.n_tokens)
    axes = (PARAM_TOKENS_AXIS, EMBED_AXIS)
    keys = self.param(
        "key_param_tokens",
        nn.with_logical_partitioning(rows_then_zeros(jax.nn.initializers.normal(key_std), self.n_tokens), axes),
        (n_storage, d_in), jnp.float32)
    values = self.param(
        "value_param_tokens",
        nn.with_logical_partitioning(rows_then_zeros(jax.nn.initializers.normal(value_std), self.n_tokens), axes),
        (n_storage, self.d_out), jnp.float32)
    out = self.kernel(
        x.astype(self.dtype), keys, values, normalization=self.normalization, n_scale=self.n_scale or self.n_tokens,
        n_valid=self.n_tokens if n_storage > self.n_tokens else None, approximate_gelu=self.approximate_gelu)
    return checkpoint_name(out, OUTPUT_NAME)
