"""Sharding on 8 fake CPU devices: every preset and mesh computes the single-device train step, parameters and
optimizer state are split as the preset says, and the tensor-parallel Pattention communicates exactly twice."""
import collections
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import SMALL, assert_relative_close
from tokenformer_jax import sharding
from tokenformer_jax.config import DataConfig, MeshConfig, ParamTokens, TrainConfig
from tokenformer_jax.model.pattention import pattention
from tokenformer_jax.model.pattention_parallel import tensor_parallel_pattention
from tokenformer_jax.train import steps
from tokenformer_jax.train.setup import build_run

# Token counts that do not divide the meshes: storage pads them to multiples of 8 with inert rows.
TOKENS = ParamTokens(query=36, key=20, value=28, output=44, ffn=140)
CFG = SMALL.replace(name="tiny_sharded", param_tokens=TOKENS, max_seq_len=16)
MESHES = [(1, 8, 1), (2, 2, 2), (1, 2, 4)]
COLLECTIVES = r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("


class Captured(NamedTuple):
  grads: Any


def capture_grads() -> optax.GradientTransformation:
  """An 'optimizer' whose state after a step is that step's gradients (and whose updates are zero)."""
  return optax.GradientTransformation(
      lambda params: Captured(jax.tree.map(jnp.zeros_like, params)),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), Captured(grads)))


def batch(seed=0, rows=8, length=16):
  rng = np.random.default_rng(seed)
  mask = np.ones((rows, length), np.float32)
  mask[-1, length // 2:] = 0.0   # some padding targets
  return {"tokens": rng.integers(0, CFG.vocab_size, (rows, length + 1)).astype(np.int32), "mask": mask}


def mesh_of(shape, preset="dp"):
  return sharding.make_mesh(MeshConfig(*shape, preset=preset), jax.devices()[:int(np.prod(shape))])


def run_step(cfg, shape, preset, tx, state=None):
  """One train step of `cfg` on a mesh of `shape`; returns (state before, state after, metrics)."""
  mesh = mesh_of(shape, preset)
  _, shardings = steps.state_shardings(cfg, tx, mesh, preset)
  state = steps.init_state(cfg, tx, shardings, seed=0) if state is None else jax.device_put(state, shardings)
  step = steps.make_train_step(cfg, tx, lambda s: 1e-3, shardings, mesh)
  before = jax.device_get(state)
  inputs = batch()
  new_state, metrics = step.lower(state, inputs).compile()(state, inputs)
  return before, new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device():
  before, after, metrics = run_step(CFG, (1, 1, 1), "dp", capture_grads())
  return before, jax.device_get(after.opt_state.grads), metrics


CASES = [(shape, preset, "auto") for shape in MESHES for preset in sharding.RULES] + [
    ((1, 2, 4), "tp", "shard_map"), ((2, 2, 2), "fsdp_tp", "shard_map"), ((1, 8, 1), "fsdp", "shard_map")]


@pytest.mark.slow
@pytest.mark.parametrize("shape,preset,impl", CASES, ids=[f"{'x'.join(map(str, s))}-{p}-{i}" for s, p, i in CASES])
def test_train_step_equals_single_device(single_device, shape, preset, impl):
  reference_state, reference_grads, reference_metrics = single_device
  cfg = CFG.replace(pattention_impl=impl)
  _, after, metrics = run_step(cfg, shape, preset, capture_grads(), state=reference_state)
  grads = jax.device_get(after.opt_state.grads)
  assert abs(metrics["loss"] - reference_metrics["loss"]) <= 1e-5 * abs(reference_metrics["loss"])
  assert_relative_close(grads, reference_grads)
  # The inert padding rows get exactly zero gradient, however the tokens are split.
  ffn = grads["layers"]["ffn"]
  assert np.all(ffn["key_param_tokens"][:, TOKENS.ffn:] == 0) and np.all(ffn["value_param_tokens"][:, TOKENS.ffn:] == 0)


EXPECTED_SPECS = {   # (a Pattention's key tokens [layers, tokens, embed], the embedding [vocab, embed])
    "dp": ((), ()),
    "fsdp": ((None, "fsdp"), ("fsdp",)),
    "tp": ((None, "tensor"), ()),
    "fsdp_tp": ((None, "tensor", "fsdp"), ("fsdp",)),
}


def spec_of(array) -> tuple:
  """The array's PartitionSpec as a tuple, without trailing Nones."""
  spec = tuple(array.sharding.spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(sharding.RULES))
def test_params_and_optimizer_state_are_sharded_as_the_preset_says(preset):
  tx = optax.adamw(1e-3)
  mesh = mesh_of((2, 2, 2), preset)
  _, shardings = steps.state_shardings(CFG, tx, mesh, preset)
  state = steps.init_state(CFG, tx, shardings, seed=0)
  keys_spec, embedding_spec = EXPECTED_SPECS[preset]
  adam = state.opt_state[0]
  for tree in (state.params, adam.mu, adam.nu):
    keys = tree["layers"]["ffn"]["key_param_tokens"]
    assert spec_of(keys) == keys_spec
    assert spec_of(tree["embedding"]) == embedding_spec
    # What a device holds is its shard: 1/2 (fsdp, tp) or 1/4 (fsdp_tp) of the tokens' array.
    shards = np.prod([mesh.shape[a] for a in keys_spec if a])
    assert keys.addressable_shards[0].data.size * shards == keys.size


def compiled_peak_bytes(preset, shape=(1, 8, 1)):
  """Per-device bytes of the compiled train step (the trainer's own, from build_run): arguments + outputs not
  aliased to them + temporaries."""
  cfg = TrainConfig(model=CFG, data=DataConfig(seq_len=16), mesh=MeshConfig(*shape, preset=preset), global_batch=8)
  run = build_run(cfg, jax.devices()[:int(np.prod(shape))])
  memory = run.train_step.lower(run.abstract, run.abstract_batch()).compile().memory_analysis()
  return (memory.argument_size_in_bytes, memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


@pytest.mark.slow
def test_fsdp_shrinks_memory_per_device():
  dp_arguments, dp_peak = compiled_peak_bytes("dp")
  fsdp_arguments, fsdp_peak = compiled_peak_bytes("fsdp")
  # Parameters and both Adam moments are split 8 ways (the batch already was): arguments shrink ~8×.
  assert fsdp_arguments < dp_arguments / 6
  assert fsdp_peak < dp_peak / 2


# The tensor-parallel Pattention ---------------------------------------------------------------------------
def pattention_problem(n=64, d_in=16, d_out=24):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 8, d_in)).astype(np.float32)
  keys = (rng.normal(size=(n, d_in)) / np.sqrt(d_in)).astype(np.float32)
  values = (rng.normal(size=(n, d_out)) / np.sqrt(n)).astype(np.float32)
  keys[-5:] = values[-5:] = 0.0   # five inert padding rows
  return x, keys, values


TP_MESH_SHAPE = (2, 1, 4)


def tp_functions(normalization, reduce="psum"):
  mesh = mesh_of(TP_MESH_SHAPE)
  rows, tokens = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P("tensor"))
  kwargs = dict(normalization=normalization, n_valid=59, n_scale=59)

  def explicit(x, keys, values):
    return tensor_parallel_pattention(x, keys, values, mesh=mesh, reduce=reduce, **kwargs)

  def automatic(x, keys, values):
    with sharding.activation_sharding(mesh):
      return pattention(x, keys, values, **kwargs)

  jit = lambda f: jax.jit(f, in_shardings=(rows, tokens, tokens))
  return jit(explicit), jit(automatic), functools.partial(pattention, **kwargs)


def collectives(jitted, *args) -> dict[str, int]:
  """The collectives of the compiled (never run) program; the SPMD partitioner's, at whatever optimisation level."""
  return dict(collections.Counter(re.findall(COLLECTIVES, jitted.lower(*args).compile().as_text())))


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm"])
def test_tensor_parallel_pattention_communicates_twice(normalization):
  x, keys, values = pattention_problem()
  explicit, automatic, _ = tp_functions(normalization)
  # One all-reduce of the [batch, length, 1] sum of squares, one of the [batch, length, d_out] output.
  assert collectives(explicit, x, keys, values) == {"all-reduce": 2}
  scattered, _, _ = tp_functions(normalization, reduce="psum_scatter")
  assert collectives(scattered, x, keys, values) == {"all-reduce": 1, "reduce-scatter": 1}
  # Backward adds at most one all-reduce for the norm and one for dx (XLA may combine them); nothing gathered.
  grad = jax.jit(jax.grad(lambda *a: explicit(*a).sum(), argnums=(0, 1, 2)))
  backward = collectives(grad, x, keys, values)
  assert set(backward) == {"all-reduce"} and backward["all-reduce"] <= 4


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_shard_map_equals_automatic_and_unsharded(normalization):
  x, keys, values = pattention_problem()
  explicit, automatic, plain = tp_functions(normalization)
  want = jax.jit(plain)(x, keys, values)
  assert_relative_close(explicit(x, keys, values), want)
  assert_relative_close(automatic(x, keys, values), want)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(x, keys, values)
  want = grads(plain)   # once (it was computed eagerly, twice)
  assert_relative_close(grads(explicit), want)
  assert_relative_close(grads(automatic), want)


# Meshes and their errors ----------------------------------------------------------------------------------
def test_mesh_sizes_and_errors():
  assert sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices but there are 8"):
    sharding.make_mesh(MeshConfig(data=3, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))
  sharding.initialize_distributed()   # a single CPU host: nothing to join
  assert not jax.distributed.is_initialized()


def test_a_mesh_that_does_not_divide_the_stored_tokens_names_the_multiple():
  cfg = CFG.replace(token_multiple=4)   # ffn: 140 rows, not a multiple of 8
  with pytest.raises(ValueError, match=r"set model.token_multiple=8 "):
    steps.state_shardings(cfg, optax.adamw(1e-3), mesh_of((1, 8, 1), "fsdp"), "fsdp")
  with pytest.raises(ValueError, match=r"model.token_multiple to a multiple of 8"):
    x, keys, values = pattention_problem(n=60)
    tensor_parallel_pattention(x, keys, values, mesh=mesh_of((1, 1, 8)))
