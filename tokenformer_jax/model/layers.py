"""Pieces both architectures share: LayerNorm, rotary positions, multi-head attention (causal for language,
bidirectional for vision)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tokenformer_jax.config import ModelConfig

# Logical axes of the residual stream, for `nn.with_logical_constraint` (a no-op outside a sharding context).
ACTIVATION_AXES = ("batch", "length", "embed")
HEADS_AXES = ("batch", "length", "heads", None)
ATTENTION_NAME = "attention_out"   # the token-token attention's output, which remat="lean" keeps


# Keep only q, k, v for the backward pass, never the [batch, heads, T, T] probabilities.
@functools.partial(jax.checkpoint, static_argnums=(3,))
def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """softmax(q·kᵀ/√head_dim [, causal])·v over [batch, length, heads, head_dim]: the platform's fused kernel where
  JAX has one (cuDNN on GPU), else XLA's (float32 logits and softmax); the backward recomputes the scores."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def layer_norm(x: jax.Array, eps: float, scale: jax.Array | None = None, bias: jax.Array | None = None):
  """LayerNorm over the last axis, computed in float32 and returned in x's dtype."""
  y = x.astype(jnp.float32)
  y = y - jnp.mean(y, axis=-1, keepdims=True)
  y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with a learned scale and bias (the final norm; the dense baseline's block norms), or a bias only."""
  eps: float = 1e-5
  use_scale: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                       jnp.float32) if self.use_scale else None
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
    return layer_norm(x, self.eps, scale, bias)


def drop_path(module: nn.Module, branch: jax.Array, rate) -> jax.Array:
  """A residual branch [batch, ...] dropped per example with probability `rate` (a traced scalar: this layer's
  share of cfg.drop_path) and the kept ones scaled by 1/(1 - rate); unchanged without a "drop_path" rng (every
  evaluation) or a rate."""
  if rate is None or not module.has_rng("drop_path"):
    return branch
  keep = 1.0 - rate
  kept = jax.random.bernoulli(module.make_rng("drop_path"), keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  return branch * (kept / keep).astype(branch.dtype)


def block_norm(cfg: ModelConfig, name: str):
  """One of a block's LayerNorms, as cfg.norm_params says (paper Table 5): non-parametric, β only, or γ and β."""
  if cfg.norm_params == "none":
    return lambda x: layer_norm(x, cfg.layer_norm_eps)
  return LayerNorm(cfg.layer_norm_eps, use_scale=cfg.norm_params == "scale_bias", name=name)


def apply_rotary(x: jax.Array, rotary_dims: int, base: float, positions: jax.Array | None = None) -> jax.Array:
  """GPT-NeoX rotary embedding on the first `rotary_dims` of each head.  x: [batch, length, heads, head_dim].

  `positions`: the absolute position of each token, [batch, length] or [length]; default 0, 1, ..., length - 1.
  """
  half = rotary_dims // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if positions is None:
    positions = jnp.arange(x.shape[1])
  positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
  angles = positions[:, :, None] * inv_freq   # [batch, length, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dims].astype(jnp.float32), x[..., rotary_dims:]
  x1, x2 = rot[..., :half], rot[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Token-token attention (Eq. 8) with heads, and a causal mask unless the model is an image classifier
  (cfg.causal).  q, k, v, result: [batch, length, d]."""
  batch, length, d = q.shape
  # Heads are independent: under a sharding context they split over "tensor" like the parameter tokens.
  split = lambda t: nn.with_logical_constraint(t.reshape(batch, length, cfg.n_heads, cfg.head_dim), HEADS_AXES)
  q, k, v = split(q), split(k), split(v)
  if cfg.positions == "rotary":
    q = apply_rotary(q, cfg.rotary_dims, cfg.rotary_base)
    k = apply_rotary(k, cfg.rotary_dims, cfg.rotary_base)
  out = _fused_attention(q, k, v, cfg.causal)
  return checkpoint_name(out.reshape(batch, length, d), ATTENTION_NAME)


# Decoding with a KV cache -------------------------------------------------------------------------------
# One layer's cache: {"k", "v"}: [batch, heads, cache_length, head_dim], keys stored after the rotary. Heads before
# slots, so that each (row, head) block of slots is one contiguous [cache_length, head_dim] matrix: the attention's
# two products read it where it lies (a [batch, slots, heads, ...] layout makes XLA transpose every layer's cache
# into a copy on every step first).
CACHE_AXES = ("batch", "heads", "length", None)


def _write(cache: jax.Array, new_rows: jax.Array, positions: jax.Array) -> jax.Array:
  """cache [batch, heads, slots, head_dim] with new_rows [batch, new, heads, head_dim] stored at slots positions
  [batch, new] (a position past the end writes nothing: a finished row's, see `decode.generate`).

  The scatter goes through the [batch·heads, slots, head_dim] view of the same buffer, the shape XLA gives the
  attention's products: the updated view is then the products' operand itself. Written on the 4-d array, the
  view the products take of the result makes XLA's CPU fusion duplicate the write into a fresh buffer for them,
  and then copy the whole cache to keep the donated one (two copies of every layer's cache per token)."""
  batch, heads, slots, head_dim = cache.shape
  rows = jnp.arange(batch)[:, None, None] * heads + jnp.arange(heads)[None, :, None]   # [batch, heads, 1]
  flat = cache.reshape(batch * heads, slots, head_dim)
  flat = flat.at[rows, positions[:, None, :]].set(new_rows.transpose(0, 2, 1, 3).astype(cache.dtype), mode="drop")
  return nn.with_logical_constraint(flat.reshape(cache.shape), CACHE_AXES)


def cached_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: ModelConfig, cache: dict,
                          start: jax.Array) -> tuple[jax.Array, dict]:
  """Attention of new tokens at absolute positions start[b], start[b] + 1, ... over the cache and themselves.

  q, k, v: [batch, new, d] (new = the bucketed prompt length when prefilling, 1 per decode step); start: [batch]
  int32. The new keys and values are written into the cache at their positions (`_write`: in place when the
  cache is donated), and a query at position p sees the cache slots 0..p: with right-padded prompts every slot
  a query sees holds a real token, since a decode step writes slot p before it reads it. Returns (out [batch,
  new, d], the updated cache).
  """
  batch, new, d = q.shape
  split = lambda t: nn.with_logical_constraint(t.reshape(batch, new, cfg.n_heads, cfg.head_dim), HEADS_AXES)
  q, k, v = split(q), split(k), split(v)
  positions = start[:, None] + jnp.arange(new, dtype=start.dtype)[None, :]   # [batch, new]
  if cfg.positions == "rotary":
    q = apply_rotary(q, cfg.rotary_dims, cfg.rotary_base, positions)
    k = apply_rotary(k, cfg.rotary_dims, cfg.rotary_base, positions)
  cache = {name: _write(cache[name], new_rows, positions) for name, new_rows in (("k", k), ("v", v))}
  keys, values = cache["k"].astype(q.dtype), cache["v"].astype(v.dtype)
  # Keys as the first product's left operand, weights as the second's: the orientations in which XLA's CPU dots
  # read the cache where it lies (others transpose it, or take the softmax along a non-minor axis: the step's
  # attention ran 2-4x slower on a CPU).
  logits = jnp.einsum("bhkd,bqhd->bhkq", keys, q, preferred_element_type=jnp.float32).transpose(0, 1, 3, 2)
  logits = logits / jnp.sqrt(cfg.head_dim)
  visible = jnp.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]   # [batch, new, slots]
  logits = jnp.where(visible[:, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bhkd->bqhd", weights, values, preferred_element_type=jnp.float32).astype(v.dtype)
  return out.reshape(batch, new, d), cache
