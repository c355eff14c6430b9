"""Tensor-parallel Pattention, with its communication written out (jax.shard_map).

The n parameter tokens are split over the "tensor" mesh axis; each device holds n / t rows of K_P and V_P
and the whole input x of its batch shard. Per device:

    A_local = x · K_localᵀ                      local scores, [..., n / t]
    s       = psum_tensor(Σ A_local²)           ONE all-reduce of a [..., 1] sum of squares (the L2 norm)
    W_local = gelu(A_local / √s · √n_scale)     local
    O       = reduce_tensor(W_local · V_local)  ONE reduction of the [..., d_out] partial outputs

`reduce="psum"` all-reduces O (every tensor shard gets all of it); `reduce="psum_scatter"` reduce-scatters
it along d_out (each shard gets d_out / t columns, for a consumer that wants them split). Θ = gelu_l2_norm
has the same two collectives; softmax has an all-reduce-max and an all-reduce-sum. Inert padding rows stay
inert shard by shard (zero keys and values; softmax masks rows past n_valid by their global index).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from tokenformer_jax.model.pattention import pattention

TENSOR_AXIS = "tensor"
BATCH_AXES = ("data", "fsdp")


def tensor_parallel_pattention(x: jax.Array, key_param_tokens: jax.Array, value_param_tokens: jax.Array, *,
                               mesh=None, reduce: str = "psum", n_scale: float | None = None,
                               kernel: Callable = pattention, check_vma: bool = True,
                               **pattention_kwargs) -> jax.Array:
  """Eq. 4 with the parameter tokens split over the "tensor" axis of `mesh`.

  `mesh`: a Mesh or AbstractMesh; default the one in context (`jax.sharding.use_abstract_mesh`, which
  `sharding.activation_sharding` enters inside the train step). Without a mesh, or one with no "tensor"
  axis, this is plain `pattention`. x's leading (batch) axis is split over whichever of "data" and "fsdp"
  the mesh has, when it divides. `kernel` computes each shard's part: `pattention` or `lean_pattention`
  (pattention_lean.py) or `pallas_pattention` (pattention_pallas.py), or a partial of one; the other keyword
  arguments are theirs. `check_vma=False` for a kernel JAX cannot type per mesh axis (a Pallas kernel in interpret
  mode replays its constants without those types): shard_map's transpose then sums the cotangents of the inputs
  each shard holds whole (x over "tensor", K_P and V_P over the batch axes) itself.
  """
  if n_scale is None:
    n_scale = key_param_tokens.shape[0]   # the global row count, not the shard's
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or TENSOR_AXIS not in mesh.axis_names:
    return kernel(x, key_param_tokens, value_param_tokens, n_scale=n_scale, **pattention_kwargs)
  shards = mesh.shape[TENSOR_AXIS]
  n, d_out = key_param_tokens.shape[0], value_param_tokens.shape[1]
  if n % shards:
    raise ValueError(f"{n} stored parameter tokens do not split over the {shards} '{TENSOR_AXIS}' shards; set "
                     f"model.token_multiple to a multiple of {shards}")
  if reduce not in ("psum", "psum_scatter"):
    raise ValueError(f"reduce must be 'psum' or 'psum_scatter', got {reduce!r}")
  if reduce == "psum_scatter" and d_out % shards:
    raise ValueError(f"psum_scatter: d_out={d_out} does not split over the {shards} '{TENSOR_AXIS}' shards")

  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if x.ndim < 2 or x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()   # e.g. a batch smaller than the data-parallel axes: every device takes all of it
  rest = (None,) * (x.ndim - 2)
  x_spec = P(batch_axes or None, *rest, None)
  out_spec = x_spec if reduce == "psum" else P(batch_axes or None, *rest, TENSOR_AXIS)

  def local(x, keys, values):
    partial_out = kernel(x, keys, values, n_scale=n_scale, axis_name=TENSOR_AXIS, **pattention_kwargs)
    if reduce == "psum":
      return jax.lax.psum(partial_out, TENSOR_AXIS)
    return jax.lax.psum_scatter(partial_out, TENSOR_AXIS, scatter_dimension=x.ndim - 1, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(TENSOR_AXIS), P(TENSOR_AXIS)),
                       out_specs=out_spec, check_vma=check_vma)(x, key_param_tokens, value_param_tokens)
