"""Fused Pallas Pattention: Eq. 4 with each block's scores, norm and GeLU kept in VMEM between the two matmuls.

The lean kernel (pattention_lean.py) never holds the [tokens, n] scores at once, but each block still goes to HBM
and back between the score matmul, Θ and the value matmul. Here every pass is one `pl.pallas_call` over a grid of
(token blocks × parameter-token blocks): a [tb, nb] tile of scores is made, used and dropped inside the kernel, and
only per-row statistics [tokens, 1] and the accumulated [tokens, d] / [n, d] results reach HBM. With s = x·K_blkᵀ,
g = dO·V_blkᵀ and c = √n_scale / ‖·‖ (one factor per row, as in pattention_lean.py):

  l2_norm_gelu   forward:  ss = ‖A‖² from the Gram matrix (XLA, x·M·xᵀ with M = K_Pᵀ·K_P) when n ≥ 8·d_in, else
                           from a first kernel pass that sums s² per row; then one pass O = Σ gelu(c·s)·V_blk
                 backward: dx pass: P = Σ c·h·K_blk and S = Σ h·s with h = g·gelu'(c·s) (and, without the Gram,
                           Q = Σ s·K_blk); then β = c·S/ss and dx = P − β·(x·M or Q): the norm's rank-one term in XLA.
                           dK/dV pass, with β known: dA = c·h − β·s, dK = Σ_t dAᵀ·x, dV = Σ_t gelu(c·s)ᵀ·dO
  gelu_l2_norm   forward:  one pass accumulating Σ gelu(s)·V_blk and Σ gelu(s)² together; O = c·Σ gelu(s)·V_blk
                 backward: r = dO·O / c / ss (XLA); dA = gelu'(s)·c·(g − gelu(s)·r) in both passes: dx = Σ dA·K_blk,
                           dK = Σ_t dAᵀ·x, dV = Σ_t c·gelu(s)ᵀ·dO
  softmax        falls back to the lean kernel (logged once)

The Gram choice: M costs d_in² per token (in float32 at highest precision, ≈ 6 bf16 passes) where the extra pass
costs n·d_in, and the project's measurement put the crossover at n ≈ 8·d_in (GRAM_MIN_RATIO). At d = 768 the
attention projections of 124M-757M (n ≤ 4850) and 124M's FFN take the pass; 1.4B's attention and the larger FFNs
the Gram.

Grids: the forward and the dx pass run token blocks "parallel" × parameter blocks "arbitrary" (the outputs are
accumulated in their VMEM-resident output blocks, float32, written back once per token block); the dK/dV pass runs
parameter blocks "parallel" × token blocks "arbitrary". Rows added to fill the last block (of tokens or of
parameter tokens) are zeros: zero keys and values are inert like storage padding, zero tokens give zero output and
zero gradient, and they are sliced off. Matmuls take the compute dtype (x's; K_P and V_P are cast to it as the
plain kernel does) with float32 accumulation; Θ is float32.

On a TPU the kernels go through Mosaic (blocks rounded up to the 128 tile and shrunk, if need be, to fit the VMEM
budget: `fitted_blocks`); on any other backend (CPU tests, the CPU trainer) they run in Pallas interpret mode,
with the configured block sizes as given. The choice is made at lowering time (`lax.platform_dependent`), so a
step compiled for a TPU from this CPU (the plan) gets the Mosaic kernels. Under a shard_map over the parameter
tokens (pattention_parallel.py) each device runs the kernels on its own rows and the per-row sums are psum-ed.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tokenformer_jax.config import round_up
from tokenformer_jax.model.pattention import MIN_SUM_OF_SQUARES
from tokenformer_jax.model.pattention_lean import STATS_NAME, _same_mesh_axes, lean_pattention

PALLAS_NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm")
GRAM_MIN_RATIO = 8            # l2_norm_gelu: the row norm from the Gram matrix when n ≥ 8·d_in, else from a pass
DEFAULT_PARAM_BLOCK = 512     # pattention_pallas's own defaults (the model passes its config's)
DEFAULT_TOKEN_BLOCK = 512     # model.pattention_token_block = 0 means this
TPU_TILE = 128
# TPU v4: 16 MiB of VMEM per TensorCore. Each kernel asks Mosaic for a scoped limit of 14 MiB (2 MiB left to
# Mosaic's internal scratch) and its blocks are chosen so that the estimate below stays within 12 MiB: a margin
# for the temporaries the estimate does not name. Later generations have more VMEM, so v4's blocks fit there too.
VMEM_LIMIT_BYTES = 14 * 2**20
VMEM_BUDGET_BYTES = 12 * 2**20

_logger = logging.getLogger(__name__)
SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
SQRT_2_OVER_PI = 0.7978845608028654


class _Static(NamedTuple):
  normalization: str
  n_scale: float
  approximate_gelu: bool
  axis_name: str | None
  param_block: int
  token_block: int
  gram: bool            # l2_norm_gelu: the row norm (and dx's rank-one term) from K_Pᵀ·K_P


def pallas_pattention(x: jax.Array, key_param_tokens: jax.Array, value_param_tokens: jax.Array, *,
                      normalization: str = "l2_norm_gelu", n_scale: float | None = None, n_valid: int | None = None,
                      approximate_gelu: bool = False, axis_name: str | None = None,
                      block: int = DEFAULT_PARAM_BLOCK, token_block: int = DEFAULT_TOKEN_BLOCK) -> jax.Array:
  """`pattention`'s contract (same arguments, dtypes and result) in fused Pallas kernels over blocks of `block`
  parameter tokens and `token_block` tokens. `n_valid` needs no handling for the L2 variants: padding rows are
  zero keys and zero values, inert in the kernels."""
  if normalization == "softmax":
    _log_softmax_fallback()
    return lean_pattention(x, key_param_tokens, value_param_tokens, normalization=normalization, n_scale=n_scale,
                           n_valid=n_valid, approximate_gelu=approximate_gelu, axis_name=axis_name, block=block)
  if normalization not in PALLAS_NORMALIZATIONS:
    raise ValueError(f"the pallas kernel computes normalization {', '.join(PALLAS_NORMALIZATIONS)} (and softmax "
                     f"through the lean kernel); got {normalization!r}: use pattention_kernel='plain'")
  if block < 1 or token_block < 1:
    raise ValueError(f"block sizes must be positive, got block={block}, token_block={token_block}")
  n, d_in = key_param_tokens.shape
  static = _Static(normalization, float(n if n_scale is None else n_scale), approximate_gelu, axis_name, block,
                   token_block, normalization == "l2_norm_gelu" and n >= GRAM_MIN_RATIO * d_in)
  x, keys, values = _same_mesh_axes(x, key_param_tokens, value_param_tokens)
  return _fused(x, keys, values, static)


@functools.cache
def _log_softmax_fallback():
  _logger.warning("pattention_kernel='pallas' has no softmax kernel: softmax Pattentions use the lean kernel")


# Θ's pieces inside a kernel (erf and tanh lower in Mosaic; jax.nn.gelu's exact form uses erfc, which does not) ---
def _gelu_cdf(u: jax.Array, approximate: bool) -> jax.Array:
  """Φ(u), or its tanh form: gelu(u) = u·Φ(u)."""
  if approximate:
    return 0.5 * (1.0 + jnp.tanh(SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)))
  return 0.5 * (1.0 + jax.lax.erf(u * SQRT_HALF))


def _gelu(u: jax.Array, approximate: bool) -> jax.Array:
  return u * _gelu_cdf(u, approximate)


def _gelu_and_slope(u: jax.Array, approximate: bool) -> tuple[jax.Array, jax.Array]:
  """gelu(u) and gelu'(u) = Φ(u) + u·Φ'(u), elementwise, float32."""
  cdf = _gelu_cdf(u, approximate)
  if approximate:
    tanh = 2.0 * cdf - 1.0
    density = 0.5 * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * u * u)
  else:
    density = INV_SQRT_2PI * jnp.exp(-0.5 * u * u)
  return u * cdf, cdf + u * density


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a·bᵀ with float32 accumulation (contracting the last axes: no transpose in memory)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _accumulate(out_refs, values):
  """Add to the VMEM-resident float32 output blocks, zeroed at the first step of the inner ("arbitrary") axis."""
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in out_refs:
      ref[...] = jnp.zeros_like(ref)
  for ref, value in zip(out_refs, values):
    ref[...] += value


# Kernel bodies: refs are the blocks of the inputs, then of the outputs --------------------------------------
def _sum_of_squares_kernel(static, x_ref, k_ref, ss_ref):
  s = _dot_t(x_ref[...], k_ref[...])
  _accumulate([ss_ref], [jnp.sum(s * s, axis=-1, keepdims=True)])


def _forward_l2_norm_gelu_kernel(static, x_ref, k_ref, v_ref, c_ref, acc_ref):
  w = _gelu(c_ref[...] * _dot_t(x_ref[...], k_ref[...]), static.approximate_gelu)
  _accumulate([acc_ref], [_dot(w, v_ref[...])])


def _forward_gelu_l2_norm_kernel(static, x_ref, k_ref, v_ref, acc_ref, ss_ref):
  q = _gelu(_dot_t(x_ref[...], k_ref[...]), static.approximate_gelu)
  _accumulate([acc_ref, ss_ref], [_dot(q, v_ref[...]), jnp.sum(q * q, axis=-1, keepdims=True)])


def _block_grads(static, x, k, v, g_out, c, r, partial: bool = False):
  """One tile's (Θ-weights W, ∂loss/∂A, s, h). l2_norm_gelu: r = β (partial=True: the β·s term left out, for the
  dx pass that finds S); gelu_l2_norm: r = dO·O / c / ss."""
  s = _dot_t(x, k)
  g = _dot_t(g_out, v)
  if static.normalization == "l2_norm_gelu":
    w, slope = _gelu_and_slope(c * s, static.approximate_gelu)
    h = g * slope
    return w, (c * h if partial else c * h - r * s), s, h
  q, slope = _gelu_and_slope(s, static.approximate_gelu)
  return c * q, slope * c * (g - q * r), s, None


def _dx_l2_norm_gelu_kernel(static, x_ref, k_ref, v_ref, g_ref, c_ref, *out_refs):
  k = k_ref[...]
  _, ds, s, h = _block_grads(static, x_ref[...], k, v_ref[...], g_ref[...], c_ref[...], None, partial=True)
  values = [_dot(ds, k), jnp.sum(h * s, axis=-1, keepdims=True)]
  if not static.gram:
    values.append(_dot(s, k))   # Q = Σ s·K_blk = x·K_Pᵀ·K_P, the rank-one term's direction, without the Gram
  _accumulate(out_refs, values)


def _dx_gelu_l2_norm_kernel(static, x_ref, k_ref, v_ref, g_ref, c_ref, r_ref, dx_ref):
  k = k_ref[...]
  _, ds, _, _ = _block_grads(static, x_ref[...], k, v_ref[...], g_ref[...], c_ref[...], r_ref[...])
  _accumulate([dx_ref], [_dot(ds, k)])


def _dkv_kernel(static, x_ref, k_ref, v_ref, g_ref, c_ref, r_ref, dk_ref, dv_ref):
  x, g_out = x_ref[...], g_ref[...]
  w, ds, _, _ = _block_grads(static, x, k_ref[...], v_ref[...], g_out, c_ref[...], r_ref[...])
  _accumulate([dk_ref, dv_ref], [_dot(ds.T, x), _dot(w.T, g_out)])


# One pass: padding, blocks, the pallas_call, on TPU or interpreted ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Pass:
  """A kernel pass. Every operand and result is [tokens, width] ("tokens") or [n, width] ("params"); results are
  float32 sums over the inner grid axis. `outer` is the "parallel" axis."""
  body: object
  outer: str                      # "tokens" or "params"
  inputs: tuple[str, ...]         # the kind of each operand
  outputs: tuple[tuple[str, int], ...]   # (kind, width) of each result
  matmuls: str                    # per tile, one letter per [tb, nb]·[nb, d] matmul: "i" (d = d_in) or "o" (d_out)
  transcendentals: int            # per score
  temporaries: int                # [tb, nb] float32 tiles alive at once, for the VMEM estimate


def vmem_bytes(spec: _Pass, widths: tuple[int, ...], itemsizes: tuple[int, ...], token_block: int,
               param_block: int) -> int:
  """Mosaic's VMEM for one pass: every operand and result block double-buffered (a width-1 row statistic takes a
  128-lane tile), plus the float32 [tb, nb] temporaries of Θ."""
  rows = {"tokens": token_block, "params": param_block}
  lanes = lambda w: round_up(w, TPU_TILE)
  operands = sum(2 * rows[kind] * lanes(w) * size for kind, w, size in zip(spec.inputs, widths, itemsizes))
  results = sum(2 * rows[kind] * lanes(w) * 4 for kind, w in spec.outputs)
  return operands + results + spec.temporaries * token_block * param_block * 4


def fitted_blocks(spec: _Pass, widths, itemsizes, tokens: int, n: int, token_block: int,
                  param_block: int) -> tuple[int, int]:
  """TPU blocks: the configured ones rounded up to the 128 tile and capped at the (rounded) sizes, then halved —
  the larger first — until the pass's `vmem_bytes` is within VMEM_BUDGET_BYTES."""
  tb = min(round_up(token_block, TPU_TILE), round_up(tokens, TPU_TILE))
  nb = min(round_up(param_block, TPU_TILE), round_up(n, TPU_TILE))
  while vmem_bytes(spec, widths, itemsizes, tb, nb) > VMEM_BUDGET_BYTES:
    if max(tb, nb) <= TPU_TILE:
      raise ValueError(f"a Pattention pass needs {vmem_bytes(spec, widths, itemsizes, tb, nb) / 2**20:.1f} MiB of "
                       f"VMEM even with {TPU_TILE}-row blocks; use pattention_kernel='lean' for d this large")
    if nb >= tb:
      nb = round_up(nb // 2, TPU_TILE)
    else:
      tb = round_up(tb // 2, TPU_TILE)
  return tb, nb


def _run(spec: _Pass, static: _Static, operands: tuple[jax.Array, ...], tpu: bool) -> list[jax.Array]:
  tokens = next(a.shape[0] for a, kind in zip(operands, spec.inputs) if kind == "tokens")
  n = next(a.shape[0] for a, kind in zip(operands, spec.inputs) if kind == "params")
  widths = tuple(a.shape[1] for a in operands)
  itemsizes = tuple(a.dtype.itemsize for a in operands)
  if tpu:
    tb, nb = fitted_blocks(spec, widths, itemsizes, tokens, n, static.token_block, static.param_block)
  else:
    tb, nb = min(static.token_block, round_up(tokens, 8)), min(static.param_block, round_up(n, 8))
  rows = {"tokens": (tb, round_up(tokens, tb)), "params": (nb, round_up(n, nb))}
  padded = [a if a.shape[0] == rows[kind][1] else jnp.pad(a, ((0, rows[kind][1] - a.shape[0]), (0, 0)))
            for a, kind in zip(operands, spec.inputs)]
  inner = "params" if spec.outer == "tokens" else "tokens"
  grid = (rows[spec.outer][1] // rows[spec.outer][0], rows[inner][1] // rows[inner][0])

  def block(kind, width):
    index = (lambda i, j: (i, 0)) if kind == spec.outer else (lambda i, j: (j, 0))
    return pl.BlockSpec((rows[kind][0], width), index)

  # Under a shard_map every operand and result varies over the same mesh axes (row statistics after a psum do not).
  padded = _same_mesh_axes(*padded)
  varying = jax.typeof(padded[0]).manual_axis_type
  out_shape = [jax.ShapeDtypeStruct((rows[kind][1], w), jnp.float32, manual_axis_type=varying)
               for kind, w in spec.outputs]
  # The kernel's real work: each operand indexed by the inner axis is read once per outer block.
  reads = sum(a.size * a.dtype.itemsize * (1 if kind == spec.outer else grid[0])
              for a, kind in zip(padded, spec.inputs))
  scores = rows["tokens"][1] * rows["params"][1]
  matmul_width = sum(widths[0] if m == "i" else widths[2] for m in spec.matmuls)   # operands 0, 2: x and V
  cost = pl.CostEstimate(flops=2 * scores * matmul_width, transcendentals=spec.transcendentals * scores,
                         bytes_accessed=reads + sum(s.size * 4 for s in out_shape))
  call = pl.pallas_call(
      functools.partial(spec.body, static), grid=grid,
      in_specs=[block(kind, w) for kind, w in zip(spec.inputs, widths)],
      out_specs=[block(kind, w) for kind, w in spec.outputs], out_shape=out_shape, cost_estimate=cost,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=VMEM_LIMIT_BYTES) if tpu else None,
      interpret=not tpu, name=spec.body.__name__.strip("_"))
  results = call(*padded)
  return [r[:(tokens if kind == "tokens" else n)] for r, (kind, _) in zip(results, spec.outputs)]


def _pass(spec: _Pass, static: _Static, *operands: jax.Array) -> list[jax.Array]:
  """The pass compiled by Mosaic when lowered for a TPU, interpreted on every other backend."""
  return jax.lax.platform_dependent(*operands, tpu=lambda *a: _run(spec, static, a, True),
                                    default=lambda *a: _run(spec, static, a, False))


T, P = "tokens", "params"


def _passes(static: _Static, d_in: int, d_out: int) -> dict[str, _Pass]:
  """The passes of `static`'s Θ (widths: d_in for x and K, d_out for V and dO, 1 for a row statistic)."""
  if static.normalization == "l2_norm_gelu":
    # dx: P and S, and without the Gram also Q (one more matmul)
    dx_outputs = ((T, d_in), (T, 1)) if static.gram else ((T, d_in), (T, 1), (T, d_in))
    dx_matmuls = "ioi" if static.gram else "ioii"
    return {
        "sum_of_squares": _Pass(_sum_of_squares_kernel, T, (T, P), ((T, 1),), "i", 0, 2),
        "forward": _Pass(_forward_l2_norm_gelu_kernel, T, (T, P, P, T), ((T, d_out),), "io", 1, 3),
        "dx": _Pass(_dx_l2_norm_gelu_kernel, T, (T, P, P, T, T), dx_outputs, dx_matmuls, 2, 5),
        "dkv": _Pass(_dkv_kernel, P, (T, P, P, T, T, T), ((P, d_in), (P, d_out)), "ioio", 2, 6),
    }
  return {
      "forward": _Pass(_forward_gelu_l2_norm_kernel, T, (T, P, P), ((T, d_out), (T, 1)), "io", 1, 3),
      "dx": _Pass(_dx_gelu_l2_norm_kernel, T, (T, P, P, T, T, T), ((T, d_in),), "ioi", 2, 5),
      "dkv": _Pass(_dkv_kernel, P, (T, P, P, T, T, T), ((P, d_in), (P, d_out)), "ioio", 2, 6),
  }


# The custom_vjp -------------------------------------------------------------------------------------------------
def _global(total: jax.Array, static: _Static) -> jax.Array:
  return total if static.axis_name is None else jax.lax.psum(total, static.axis_name)


def _inverse_norm(static: _Static, sum_of_squares: jax.Array) -> jax.Array:
  return math.sqrt(static.n_scale) * jax.lax.rsqrt(jnp.maximum(sum_of_squares, MIN_SUM_OF_SQUARES))


def _gram(keys: jax.Array, dtype) -> jax.Array:
  """M = K_Pᵀ·K_P in float32 (of the keys as the kernels see them, in the compute dtype)."""
  k = keys.astype(dtype).astype(jnp.float32)
  return jnp.einsum("ni,nj->ij", k, k, precision=jax.lax.Precision.HIGHEST)


def _project(x32: jax.Array, gram: jax.Array) -> jax.Array:
  return jnp.einsum("ti,ij->tj", x32, gram, precision=jax.lax.Precision.HIGHEST)


def _forward(x, keys, values, static: _Static):
  lead, d_in, d_out = x.shape[:-1], x.shape[-1], values.shape[-1]
  passes = _passes(static, d_in, d_out)
  flat = x.reshape(-1, d_in)
  k, v = keys.astype(x.dtype), values.astype(x.dtype)
  gram = None
  if static.normalization == "l2_norm_gelu":
    if static.gram:
      gram = _gram(keys, x.dtype)
      x32 = flat.astype(jnp.float32)
      local = jnp.sum(_project(x32, gram) * x32, axis=-1, keepdims=True)
    else:
      local, = _pass(passes["sum_of_squares"], static, flat, k)
    sum_of_squares = _global(local, static)
    out, = _pass(passes["forward"], static, flat, k, v, _inverse_norm(static, sum_of_squares))
    extra = gram
  else:
    acc, local = _pass(passes["forward"], static, flat, k, v)
    sum_of_squares = _global(local, static)
    out = acc * _inverse_norm(static, sum_of_squares)
    extra = out   # the float32 output, for the backward's dO·O
  name = lambda t: None if t is None else checkpoint_name(t, STATS_NAME)
  return out.reshape(*lead, d_out).astype(x.dtype), (x, keys, values, name(sum_of_squares), name(extra))


def _backward(static: _Static, residuals, grad_out):
  x, keys, values, sum_of_squares, extra = residuals
  d_in, d_out = x.shape[-1], values.shape[-1]
  passes = _passes(static, d_in, d_out)
  flat, g_out = x.reshape(-1, d_in), grad_out.reshape(-1, d_out).astype(x.dtype)
  k, v = keys.astype(x.dtype), values.astype(x.dtype)
  c = _inverse_norm(static, sum_of_squares)
  above_floor = sum_of_squares > MIN_SUM_OF_SQUARES   # where the floor holds the norm has no gradient (as plain)
  if static.normalization == "l2_norm_gelu":
    partial_dx, through, *direction = _pass(passes["dx"], static, flat, k, v, g_out, c)
    r = jnp.where(above_floor, c * _global(through, static) / sum_of_squares, 0.0)   # β
    direction = _project(flat.astype(jnp.float32), extra) if static.gram else direction[0]
    dx = partial_dx - r * direction
  else:
    row_dot = _global(jnp.sum(g_out.astype(jnp.float32) * extra, axis=-1, keepdims=True), static)
    r = jnp.where(above_floor, row_dot / c / sum_of_squares, 0.0)
    dx, = _pass(passes["dx"], static, flat, k, v, g_out, c, r)
  dk, dv = _pass(passes["dkv"], static, flat, k, v, g_out, c, r)
  return dx.reshape(x.shape).astype(x.dtype), dk.astype(keys.dtype), dv.astype(values.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, keys, values, static: _Static):
  return _forward(x, keys, values, static)[0]


_fused.defvjp(lambda x, keys, values, static: _forward(x, keys, values, static), _backward)
