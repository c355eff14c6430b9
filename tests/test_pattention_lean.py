"""The memory-lean Pattention (pattention_lean.py) against the plain one: same outputs and gradients for every Θ,
with padding rows, a last block filled with inert rows, bf16 compute and shard_map tensor parallelism; a train
step whose temporary memory does not grow with n; and a whole LM that trains to the same losses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import SMALL, initial_params, make_train_step, relative_error, text_batch
from tokenformer_jax import sharding
from tokenformer_jax.config import MeshConfig, ParamTokens
from tokenformer_jax.model import init_params
from tokenformer_jax.model.pattention import pattention
from tokenformer_jax.model.pattention_lean import block_rows, lean_pattention
from tokenformer_jax.model.pattention_parallel import tensor_parallel_pattention

NORMALIZATIONS = ["l2_norm_gelu", "gelu_l2_norm", "softmax"]
N, N_VALID, BLOCK = 45, 40, 16   # 45 stored rows (5 of them storage padding) in 3 blocks of 16: 3 rows fill the last


def problem(seed=0, n=N, n_valid=N_VALID, d_in=24, d_out=16, batch=(3, 5)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(*batch, d_in)).astype(np.float32)
  keys = (rng.normal(size=(n, d_in)) / np.sqrt(d_in)).astype(np.float32)
  values = (rng.normal(size=(n, d_out)) / np.sqrt(n_valid)).astype(np.float32)
  keys[n_valid:] = values[n_valid:] = 0.0   # inert storage padding
  cotangent = rng.normal(size=(*batch, d_out)).astype(np.float32)
  return x, keys, values, cotangent


def output_and_grads(f):
  """jit(x, K, V, G) → f's output and the gradients of ⟨f(x, K, V), G⟩ with respect to x, K and V (a real
  cotangent G); one compilation per f and input shapes (call it again for other inputs of the same shapes)."""
  @jax.jit
  def both(x, keys, values, cotangent):
    loss = lambda x, k, v: jnp.vdot(f(x, k, v).astype(jnp.float32), cotangent)
    return (f(x, keys, values), *jax.grad(loss, argnums=(0, 1, 2))(x, keys, values))
  return both


def test_blocks_split_the_rows_evenly():
  # The ladder's stored counts (multiples of 64) divide into blocks exactly: no copy of K_P and V_P.
  assert block_rows(34496, 2048) == 1568 and block_rows(8640, 2048) == 1728 and block_rows(576, 2048) == 576
  # Otherwise equal blocks, the last one filled with inert rows.
  assert block_rows(45, 16) == 16 and block_rows(34480, 2048) == 2048 and block_rows(100, 2048) == 104


@pytest.mark.slow
@pytest.mark.parametrize("normalization,approximate", [("l2_norm_gelu", False), ("gelu_l2_norm", True),
                                                       ("softmax", False)])
def test_lean_equals_plain_in_float32(normalization, approximate):
  x, keys, values, cotangent = problem()
  kwargs = dict(normalization=normalization, n_scale=N_VALID, n_valid=N_VALID, approximate_gelu=approximate)
  plain = output_and_grads(functools.partial(pattention, **kwargs))
  lean = output_and_grads(functools.partial(lean_pattention, block=BLOCK, **kwargs))
  want, got = plain(x, keys, values, cotangent), lean(x, keys, values, cotangent)
  for name, g, w in zip(("output", "dx", "dK_P", "dV_P"), got, want):
    assert relative_error(g, w) <= 1e-5, name
  # Storage padding stays inert: zero gradient, however the rows fall into blocks.
  assert np.all(np.asarray(got[2])[N_VALID:] == 0) and np.all(np.asarray(got[3])[N_VALID:] == 0)
  assert np.all(np.asarray(got[2])[:N_VALID] != 0)
  # An all-zero row of scores (x = 0) gives zero output (uniform for softmax) and finite gradients, as plain does.
  zero = np.zeros_like(x)   # (the same shapes: the same two compilations)
  got, want = lean(zero, keys, values, cotangent), plain(zero, keys, values, cotangent)
  for g, w in zip(got, want):   # (dx is huge here: the norm's floor makes c = √n / 1e-6)
    g, w = np.asarray(g), np.asarray(w)
    assert np.all(np.isfinite(g)) and np.max(np.abs(g - w)) <= 1e-5 * max(1.0, np.max(np.abs(w)))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "softmax"])   # gelu_l2_norm: float32 sums like softmax
def test_lean_in_bfloat16_is_as_close_to_float32_as_plain(normalization):
  # bf16 compute (float32 statistics): both kernels round the same products, in a different order. Stated
  # tolerance: every output and gradient within 2e-2 of the float32 result relative to its largest entry.
  x, keys, values, cotangent = problem(seed=1, n=200, n_valid=200, batch=(2, 8))
  kwargs = dict(normalization=normalization)
  plain_kernel = output_and_grads(functools.partial(pattention, **kwargs))
  exact = plain_kernel(x, keys, values, cotangent)
  x16 = jnp.asarray(x, jnp.bfloat16)
  plain = plain_kernel(x16, keys, values, cotangent)
  lean = output_and_grads(functools.partial(lean_pattention, block=64, **kwargs))(x16, keys, values, cotangent)
  assert lean[0].dtype == jnp.bfloat16 and lean[1].dtype == jnp.bfloat16 and lean[2].dtype == jnp.float32
  for name, g, p, w in zip(("output", "dx", "dK_P", "dV_P"), lean, plain, exact):
    assert relative_error(g, w) <= 2e-2, name
    assert relative_error(g, w) <= 3 * relative_error(p, w) + 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_lean_under_shard_map_tensor_parallelism(normalization):
  # 4 tensor shards of 16 rows each (the last holds the 5 padding rows), 2 data shards; blocks of 8 rows.
  x, keys, values, cotangent = problem(seed=3, n=64, n_valid=59, batch=(4, 8))
  mesh = sharding.make_mesh(MeshConfig(2, 1, 4), jax.devices()[:8])
  kwargs = dict(normalization=normalization, n_scale=59, n_valid=59)
  lean = functools.partial(lean_pattention, block=6)   # 16 local rows: 2 blocks of 8
  explicit = jax.jit(lambda x, k, v: tensor_parallel_pattention(x, k, v, mesh=mesh, kernel=lean, **kwargs),
                     in_shardings=(NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P("tensor")),
                                   NamedSharding(mesh, P("tensor"))))
  want = output_and_grads(functools.partial(pattention, **kwargs))(x, keys, values, cotangent)
  got = output_and_grads(explicit)(x, keys, values, cotangent)
  for name, g, w in zip(("output", "dx", "dK_P", "dV_P"), got, want):
    assert relative_error(g, w) <= 1e-5, name


# Whole models -------------------------------------------------------------------------------------------------
TINY = SMALL.replace(name="tiny_lean", pattention_block=32)


def train_step_temp_bytes(cfg, tokens) -> int:
  tx = optax.sgd(1e-3)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  state = jax.eval_shape(tx.init, params)
  step = make_train_step(cfg, tx)
  # Only compiled, never run: LLVM's optimisation level changes the machine code, not XLA's buffer assignment (the
  # same temp bytes at levels 0 and 2, checked), and level 0 compiles in half the time.
  compiled = step.lower(params, state, jax.ShapeDtypeStruct(tokens, jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_train_step_temporaries_stay_flat_in_n_with_the_lean_kernel():
  tokens = (8, 129)   # 1024 predicted tokens per step, d = 32: a [tokens, n] score matrix is 32× a [n, d] one
  sizes = (256, 1024)
  temp = {kernel: [train_step_temp_bytes(TINY.replace(pattention_kernel=kernel, pattention_block=128, n_layers=1,
                                                      param_tokens=ParamTokens.uniform(24, n)), tokens)
                   for n in sizes] for kernel in ("plain", "lean")}
  extra_rows = sizes[1] - sizes[0]
  score_bytes = 4 * 8 * 128 * extra_rows            # one float32 [tokens, Δn] matrix
  param_bytes = 4 * 2 * TINY.d_model * extra_rows   # the extra FFN keys and values
  plain_growth, lean_growth = temp["plain"][1] - temp["plain"][0], temp["lean"][1] - temp["lean"][0]
  # Plain keeps the FFN's scores for the backward pass: at least one [tokens, Δn] float32 matrix more.
  assert plain_growth >= score_bytes, temp
  # Lean keeps nothing of width n: what grows is parameter-sized (gradients, optimizer temporaries).
  assert lean_growth <= 4 * param_bytes, temp
  assert lean_growth < plain_growth / 5, temp


@pytest.mark.slow
def test_a_language_model_trains_to_the_same_losses_with_either_kernel():
  # The lean run also uses remat="lean" (keep each Pattention's and the attention's output, recompute the rest):
  # rematerialisation changes memory, not the math.
  losses = {}
  for kernel, remat in (("plain", "none"), ("lean", "lean")):
    cfg = TINY.replace(pattention_kernel=kernel, remat=remat)
    tx = optax.adamw(3e-3)
    params = initial_params(cfg)   # the same draws for both kernels (compiled once)
    opt_state, step, run = tx.init(params), make_train_step(cfg, tx), []
    for i in range(5):
      params, opt_state, loss = step(params, opt_state, text_batch(4, 33, offset=i * 4 * 33))
      run.append(float(loss))
    losses[kernel] = np.array(run)
  assert losses["plain"][-1] < losses["plain"][0] - 0.3   # it learns
  np.testing.assert_allclose(losses["lean"], losses["plain"], atol=1e-4, rtol=0)


def test_config_validates_the_kernel():
  with pytest.raises(ValueError, match="pattention_kernel must be one of plain|lean"):
    TINY.replace(pattention_kernel="flash")
  with pytest.raises(ValueError, match="pattention_block must be positive"):
    TINY.replace(pattention_block=0)
