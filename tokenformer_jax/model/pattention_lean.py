"""Memory-lean Pattention: Eq. 4 over blocks of parameter tokens, never holding the [..., n] score matrix.

The plain `pattention` keeps its scores A = x·K_Pᵀ (and Θ(A)) for the backward pass: at n = 34,480 FFN tokens
that is 45× the width of the model. This one is a `jax.custom_vjp` whose forward and backward loop
(`lax.scan`) over blocks of the stored K_P / V_P rows, so only one [..., block] tile of scores exists at a
time. Per row it keeps statistics, and the backward recomputes each block's scores (as flash attention does).
With g = dO·V_Pᵀ (per block) and M = K_Pᵀ·K_P [d_in, d_in]:

  l2_norm_gelu   forward:  ss = ‖A‖² = x·M·xᵀ (float32, no scores needed), then O = Σ_blocks gelu(c·A_blk)·V_blk
                           with c = √n_scale/√ss
                 backward: dA = c·h − β·A with h = g·gelu'(c·A), β = c·S/ss, S = Σ_j h_j·A_j. The β term is rank
                           one: its share of dx is −β·x·M and of dK_P is −K_P·Σ_tokens β·x·xᵀ, added after the loop
  gelu_l2_norm   forward:  O = c·Σ_blocks gelu(A_blk)·V_blk, with Σ gelu(A)² accumulated in the same loop
                 backward: dA = gelu'(A)·c·(g − gelu(A)·S/ss), with S = Σ_j g_j·gelu(A_j) = dO·O / c
  softmax        forward:  online (running max and sum, as flash attention); saves L = max + log Σ exp
                 backward: W = n_scale·exp(A − L), dA = W·(g − D), with D = dO·O / n_scale

So each direction is one loop over the blocks. Residuals: x, K_P, V_P (already live), the per-row statistics
[..., 1] and, for gelu_l2_norm and softmax, the float32 output [..., d_out]: nothing of width n. The price is
FLOPs: the backward recomputes the scores, 7 matmuls of n·d per token instead of 6 (plus d_in² per token for
M under l2_norm_gelu).

Storage rows are split into ceil(n / block) equal blocks (rounded up to a multiple of 128, or of 8 below 128);
rows added to fill the last block are zero keys and zero values, inert like storage padding (softmax masks them
by index). Under a shard_map that splits the rows over `axis_name` (pattention_parallel.py), each device loops
over its own rows; the per-row sums (and the softmax max) become one collective each, in the forward and once
more in the backward. `unroll=True` unrolls the block loops, for XLA's cost analysis (it counts a loop body once).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tokenformer_jax.config import round_up
from tokenformer_jax.model.pattention import MIN_SUM_OF_SQUARES, PARAM_TOKENS_AXIS

DEFAULT_BLOCK = 2048
LEAN_NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")   # Θ with a normalisation over the rows
STATS_NAME = "pattention_stats"   # the per-row statistics (and M or the float32 output) kept for the backward
BLOCK_AXES = (None, PARAM_TOKENS_AXIS, None)   # K_P, V_P as [blocks, rows, d]


def block_rows(n: int, block: int) -> int:
  """Rows per block. The largest multiple of 8 that divides n, is ≤ block and > block / 2 (then K_P and V_P are
  only reshaped, not copied); else n split into ceil(n / block) equal blocks rounded up to a multiple of 128
  (8 if smaller), the last one filled with inert rows. n ≤ block: one block."""
  if n <= block:
    return round_up(n, 8)
  for rows in range(min(block, n) // 8 * 8, block // 2, -8):
    if n % rows == 0:
      return rows
  blocks = -(-n // block)
  rows = -(-n // blocks)
  return round_up(rows, 128 if rows >= 128 else 8)


class _Static(NamedTuple):
  normalization: str
  n_scale: float
  n_valid: int | None
  approximate_gelu: bool
  axis_name: str | None
  n_local: int          # rows of K_P / V_P this call was given (before filling the last block)
  unroll: bool


def lean_pattention(x: jax.Array, key_param_tokens: jax.Array, value_param_tokens: jax.Array, *,
                    normalization: str = "l2_norm_gelu", n_scale: float | None = None, n_valid: int | None = None,
                    approximate_gelu: bool = False, axis_name: str | None = None, block: int = DEFAULT_BLOCK,
                    unroll: bool = False) -> jax.Array:
  """`pattention`'s contract (same arguments, dtypes and result) computed over blocks of `block` rows."""
  if normalization not in LEAN_NORMALIZATIONS:
    raise ValueError(f"the lean kernel computes normalization {', '.join(LEAN_NORMALIZATIONS)}; got {normalization!r}")
  if block < 1:
    raise ValueError(f"block must be positive, got {block}")
  n = key_param_tokens.shape[0]
  static = _Static(normalization, float(n if n_scale is None else n_scale), n_valid, approximate_gelu, axis_name, n,
                   unroll)
  rows = block_rows(n, block)
  blocks = -(-n // rows)
  fill = ((0, blocks * rows - n), (0, 0))
  pad = (lambda t: jnp.pad(t, fill)) if blocks * rows > n else (lambda t: t)
  keys = pad(key_param_tokens).reshape(blocks, rows, -1)
  values = pad(value_param_tokens).reshape(blocks, rows, -1)
  if axis_name is None:
    # Under a sharding context (sharding.activation_sharding) the rows of a block split like the parameter
    # tokens of the plain version's scores and the loop runs over whole blocks; elsewhere a no-op.
    keys, values = (nn.with_logical_constraint(t, BLOCK_AXES) for t in (keys, values))
  # Under a shard_map: x is the same on every tensor shard and K_P, V_P on every batch shard. Made "varying" over
  # the same mesh axes, each shard's partial cotangents are summed over the others by pcast's transpose, as
  # autodiff of the plain version does.
  x, keys, values = _same_mesh_axes(x, keys, values)
  return _lean(x, keys, values, static)


def _varying_axes(value: jax.Array) -> frozenset:
  """The shard_map mesh axes over which `value` varies (empty outside a shard_map)."""
  aval = jax.typeof(value)
  if hasattr(aval, "vma"):   # newer jax
    return frozenset(aval.vma)
  return frozenset(getattr(getattr(aval, "manual_axis_type", None), "varying", ()))


def _same_mesh_axes(*values: jax.Array) -> tuple[jax.Array, ...]:
  axes = frozenset().union(*map(_varying_axes, values))
  cast = lambda v: jax.lax.pcast(v, tuple(sorted(axes - _varying_axes(v))), to="varying")
  return tuple(cast(v) if axes - _varying_axes(v) else v for v in values)


# Pieces shared by the passes -------------------------------------------------------------------------------
def _gelu(static: _Static, u: jax.Array) -> jax.Array:
  return jax.nn.gelu(u, approximate=static.approximate_gelu)


def _gelu_and_slope(static: _Static, u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """gelu(u) and gelu'(u), elementwise (the slope from JAX's own derivative of its gelu)."""
  return jax.jvp(functools.partial(_gelu, static), (u,), (jnp.ones_like(u),))


def _scores(x: jax.Array, keys: jax.Array) -> jax.Array:
  return jnp.einsum("...i,ni->...n", x, keys.astype(x.dtype), preferred_element_type=jnp.float32)


def _mix(weights: jax.Array, values: jax.Array, dtype) -> jax.Array:
  """Θ-weights [..., rows] · V [rows, d_out], in the compute dtype with float32 accumulation."""
  return jnp.einsum("...n,no->...o", weights.astype(dtype), values.astype(dtype), preferred_element_type=jnp.float32)


def _global(total: jax.Array, static: _Static, reduce=jax.lax.psum) -> jax.Array:
  return total if static.axis_name is None else reduce(total, static.axis_name)


def _zeros(shape: tuple[int, ...], like: jax.Array) -> jax.Array:
  """float32 zeros for a loop carry. Under a shard_map a carry must keep its type through the loop, where it
  gets `like`'s contributions: `zeros_like` makes zeros varying over the same mesh axes as `like`."""
  return jnp.zeros_like(like, jnp.float32, shape=shape)


def _valid(static: _Static, index: jax.Array, rows: int) -> jax.Array | None:
  """Softmax only: which rows of block `index` are real (not filling, not storage padding past n_valid)."""
  local = index * rows + jnp.arange(rows)
  valid = local < static.n_local
  if static.n_valid is not None:
    offset = 0 if static.axis_name is None else jax.lax.axis_index(static.axis_name) * static.n_local
    valid = valid & (local + offset < static.n_valid)
  return valid


def _scan(static: _Static, body, init, xs):
  blocks = jax.tree.leaves(xs)[0].shape[0]
  return jax.lax.scan(body, init, xs, unroll=blocks if static.unroll else 1)


def _inverse_norm(static: _Static, sum_of_squares: jax.Array) -> jax.Array:
  """c = √n_scale / ‖·‖, with the floor on the sum of squares of `pattention`."""
  return math.sqrt(static.n_scale) * jax.lax.rsqrt(jnp.maximum(sum_of_squares, MIN_SUM_OF_SQUARES))


def _gram(keys: jax.Array, dtype) -> jax.Array:
  """M = K_Pᵀ·K_P [d_in, d_in] in float32 (of the keys as the scores see them, in the compute dtype), so that
  Σ_j A_j² = x·M·xᵀ and Σ_j A_j·K_j = x·M: per token d_in² work instead of n·d_in."""
  k = keys.astype(dtype).astype(jnp.float32)
  return jnp.einsum("bri,brj->ij", k, k, precision=jax.lax.Precision.HIGHEST)


def _named(x, keys, values, stat, extra):
  """The residuals, the per-row statistics and the extra one named for remat policies (remat="lean" keeps them,
  so that the backward does not rerun the forward's loop)."""
  name = lambda t: None if t is None else checkpoint_name(t, STATS_NAME)
  return x, keys, values, name(stat), name(extra)


# Forward ---------------------------------------------------------------------------------------------------
def _forward(x, keys, values, static: _Static):
  """(output in x's dtype, residuals). keys, values: [blocks, rows, d]."""
  blocks, rows, d_out = values.shape
  index = jnp.arange(blocks)
  lead = x.shape[:-1]
  zeros_row, zeros_out = _zeros((*lead, 1), x), _zeros((*lead, d_out), x)

  if static.normalization == "softmax":
    def online(carry, block):
      row_max, total, acc = carry
      k, v, i = block
      s = jnp.where(_valid(static, i, rows), _scores(x, k), -jnp.inf)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1, keepdims=True))
      safe = jnp.where(new_max == -jnp.inf, 0.0, new_max)   # a row with no valid score yet: nothing to shift
      rescale, p = jnp.exp(row_max - safe), jnp.exp(s - safe)
      return (new_max, total * rescale + jnp.sum(p, axis=-1, keepdims=True),
              acc * rescale + _mix(p, v, x.dtype)), None

    (row_max, total, acc), _ = _scan(static, online, (zeros_row - jnp.inf, zeros_row, zeros_out),
                                     (keys, values, index))
    global_max = _global(row_max, static, jax.lax.pmax)
    shift = jnp.exp(row_max - global_max)   # this shard's part, on the global max (0 for a shard with no rows)
    total = _global(total * shift, static)
    out = acc * (shift * static.n_scale / total)
    log_sum = global_max + jnp.log(total)
    return out.astype(x.dtype), _named(x, keys, values, log_sum, out)

  if static.normalization == "gelu_l2_norm":
    # The norm is one factor per row: accumulate Σ gelu(A)·V and Σ gelu(A)² together, then scale.
    def accumulate(carry, block):
      acc, squares = carry
      k, v = block
      q = _gelu(static, _scores(x, k))
      return (acc + _mix(q, v, x.dtype), squares + jnp.sum(jnp.square(q), axis=-1, keepdims=True)), None

    (acc, sum_of_squares), _ = _scan(static, accumulate, (zeros_out, zeros_row), (keys, values))
    sum_of_squares = _global(sum_of_squares, static)
    out = acc * _inverse_norm(static, sum_of_squares)
    return out.astype(x.dtype), _named(x, keys, values, sum_of_squares, out)

  # l2_norm_gelu: gelu(c·A) needs c = √n_scale/‖A‖ first; ‖A‖² = x·M·xᵀ comes from the Gram matrix, exactly in
  # float32 (HIGHEST precision), so the scores are computed once.
  x32, gram = x.astype(jnp.float32), _gram(keys, x.dtype)
  projected = jnp.einsum("...i,ij->...j", x32, gram, precision=jax.lax.Precision.HIGHEST)
  sum_of_squares = _global(jnp.sum(projected * x32, axis=-1, keepdims=True), static)
  c = _inverse_norm(static, sum_of_squares)

  def mix(acc, block):
    k, v = block
    return acc + _mix(_gelu(static, c * _scores(x, k)), v, x.dtype), None

  out, _ = _scan(static, mix, zeros_out, (keys, values))
  return out.astype(x.dtype), _named(x, keys, values, sum_of_squares, gram)   # M [d_in, d_in] for the backward


# Backward --------------------------------------------------------------------------------------------------
def _backward(static: _Static, residuals, grad_out):
  x, keys, values, stat, out = residuals
  blocks, rows, _ = keys.shape
  dtype = x.dtype
  # Ties the recomputation to the backward pass, so that unrolled (the plan's cost compile) XLA cannot merge it
  # with the forward's identical score matmuls (which would keep every block's scores alive).
  x, keys, g_out = jax.lax.optimization_barrier((x, keys, grad_out.astype(dtype)))
  index = jnp.arange(blocks)
  zeros_row, zeros_x = _zeros((*x.shape[:-1], 1), x), _zeros(x.shape, x)
  row_dot = lambda: _global(jnp.sum(g_out.astype(jnp.float32) * out, axis=-1, keepdims=True), static)

  def block_grads(k, v, i):
    """One block's (Θ-weights W, ∂loss/∂A without the norm's rank-1 term, that term's per-row partial sum)."""
    s = _scores(x, k)
    g = jnp.einsum("...o,no->...n", g_out, v.astype(dtype), preferred_element_type=jnp.float32)   # dO·V_blkᵀ
    if static.normalization == "l2_norm_gelu":
      w, slope = _gelu_and_slope(static, c * s)
      h = g * slope
      return w, c * h, jnp.sum(h * s, axis=-1, keepdims=True)
    if static.normalization == "gelu_l2_norm":
      q, slope = _gelu_and_slope(static, s)
      return c * q, slope * c * (g - q * norm_term), 0.0
    w = jnp.where(_valid(static, i, rows), static.n_scale * jnp.exp(s - log_sum), 0.0)
    return w, w * (g - mean_grad), 0.0

  if static.normalization == "softmax":
    log_sum = stat
    mean_grad = row_dot() / static.n_scale   # D = Σ_j g_j·W_j / n_scale = dO·O / n_scale, over all shards' rows
  else:
    sum_of_squares = stat
    c = _inverse_norm(static, sum_of_squares)
    if static.normalization == "gelu_l2_norm":
      # S = Σ_j g_j·gelu(A_j) = dO·O / c; the norm's gradient is zero where its floor holds, as in `pattention`.
      norm_term = jnp.where(sum_of_squares > MIN_SUM_OF_SQUARES, row_dot() / c / sum_of_squares, 0.0)

  flat = lambda t: t.reshape(-1, t.shape[-1])

  def grads(carry, block):
    dx, through = carry
    k, v, i = block
    w, ds, partial = block_grads(k, v, i)
    dk = jnp.einsum("tn,ti->ni", flat(ds).astype(dtype), flat(x), preferred_element_type=jnp.float32)
    dv = jnp.einsum("tn,to->no", flat(w).astype(dtype), flat(g_out), preferred_element_type=jnp.float32)
    dx = dx + jnp.einsum("...n,ni->...i", ds.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
    return (dx, through + partial), (dk, dv)

  (dx, through), (dk, dv) = _scan(static, grads, (zeros_x, zeros_row), (keys, values, index))
  if static.normalization == "l2_norm_gelu":
    # The term through ‖A‖: ∂loss/∂A_j −= β·A_j per row, β = c·S/‖A‖², S = Σ_j h_j·A_j (over all shards). It is
    # rank one, so its share of dx is −β·x·M and of dK_P is −K_P·N with N = Σ_tokens β·x·xᵀ: no second pass.
    beta = jnp.where(sum_of_squares > MIN_SUM_OF_SQUARES, c * _global(through, static) / sum_of_squares, 0.0)
    x32 = x.astype(jnp.float32)
    dx = dx - beta * jnp.einsum("...i,ij->...j", x32, out)   # (for l2_norm_gelu the residual `out` is M)
    n_matrix = jnp.einsum("ti,tj->ij", flat(beta * x32), flat(x32))
    dk = dk - jnp.einsum("bri,ij->brj", keys.astype(dtype).astype(jnp.float32), n_matrix)
  return dx.astype(x.dtype), dk.astype(keys.dtype), dv.astype(values.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lean(x, keys, values, static: _Static):
  return _forward(x, keys, values, static)[0]


_lean.defvjp(lambda x, keys, values, static: _forward(x, keys, values, static), _backward)
