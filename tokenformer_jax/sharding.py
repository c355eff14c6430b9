"""The mesh and the ONE table that maps logical axes to mesh axes.

Modules name their axes logically (`vocab`, `embed`, `param_tokens`, `heads`, `mlp`, `layers`; activations:
`batch`, `length`). A preset below says where each *parameter* axis goes on the mesh ("data", "fsdp",
"tensor"). Within one array a mesh axis is used at most once: the first rule that names a free mesh axis
wins, so e.g. under `fsdp` a Pattention [param_tokens, embed] is split along param_tokens and its embed
stays whole.

Activations use the same names and one layout under every preset (`ACTIVATION_RULES`): the batch over the
data-parallel axes ("data", "fsdp"), the parameter-token axis of Pattention scores (and heads, the
vocabulary of the logits) over "tensor". The presets differ only in where parameters and optimizer state
live; the compiler moves them to where the activations need them (an all-gather per layer under FSDP).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tokenformer_jax import accelerators
from tokenformer_jax.config import MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both: FSDP is data parallelism with sharded params
TENSOR_AXIS = "tensor"

RULES = {
    # Pure data parallelism: every parameter replicated.
    "dp": (),
    # FSDP: parameters split over "fsdp", along the parameter-token axis first.
    "fsdp": (("param_tokens", "fsdp"), ("vocab", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
             ("embed", "fsdp")),
    # Tensor parallelism: each Pattention's tokens split over "tensor" (the dense baseline: heads and mlp).
    "tp": (("param_tokens", "tensor"), ("heads", "tensor"), ("mlp", "tensor")),
    # Both: tokens over "tensor", the other parameter axis over "fsdp".
    "fsdp_tp": (("param_tokens", "tensor"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "fsdp"),
                ("embed", "fsdp")),
}

# Activations, under every preset. "embed" and "length" stay whole.
ACTIVATION_RULES = (("batch", BATCH_AXES), ("param_tokens", TENSOR_AXIS), ("heads", TENSOR_AXIS),
                    ("mlp", TENSOR_AXIS), ("vocab", TENSOR_AXIS))

# Which config field fixes a dimension that does not split over its shards.
_FIELD_FOR_AXIS = {"param_tokens": "token_multiple", "vocab": "vocab_multiple"}


def rules(preset: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The parameter rules of a preset (with the batch rule first, for batch-shaped state)."""
  if preset not in RULES:
    raise ValueError(f"unknown sharding preset {preset!r}; choose one of {', '.join(RULES)}")
  return (("batch", BATCH_AXES),) + RULES[preset]


# The mesh ------------------------------------------------------------------------------------------------
# What launch.local (or any launcher of N processes on one or more machines) sets for each process.
COORDINATOR_ENV, PROCESS_COUNT_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
HEARTBEAT_ENV = "TOKENFORMER_HEARTBEAT_SECONDS"   # a peer silent this long is dead: the others stop (exit ≠ 0)


def initialize_distributed() -> None:
  """Join the other processes of this job into one JAX program (every CLI that runs on TPU workers calls it).

  Call it before anything else touches JAX devices. With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID set (launch.local, or any launcher) it joins them explicitly; on CPU the processes then talk
  through gloo collectives. On a TPU VM it calls `jax.distributed.initialize()`, which finds the other hosts
  itself. On a single host with none of these it does nothing. A process that stops sending heartbeats for
  TOKENFORMER_HEARTBEAT_SECONDS (default 100) is declared dead, and every other process then exits non-zero.
  """
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get(COORDINATOR_ENV)
  heartbeat = dict(heartbeat_timeout_seconds=int(os.environ[HEARTBEAT_ENV])) if os.environ.get(HEARTBEAT_ENV) else {}
  if coordinator and os.environ.get(PROCESS_COUNT_ENV):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes: collectives over TCP
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(os.environ[PROCESS_COUNT_ENV]),
                               process_id=int(os.environ.get(PROCESS_ID_ENV, "0")), **heartbeat)
    _share_cpu_compilation_cache()
  elif coordinator or _on_tpu_vm():
    jax.distributed.initialize(**heartbeat)


def _share_cpu_compilation_cache() -> None:
  """A CPU job compiles each program once, in process 0, and every process reads it from the persistent cache.

  jax keys a program's cache entry by, among others, its devices' topology fingerprint, and on CPU (jax 0.10.2)
  each process of one job reports another fingerprint for the same global devices: only process 0 (the one
  that writes entries) ever found its programs, the others compiled every one of them at every start. On CPU
  the devices' kinds and global ids, the same list in every process, key the program instead, and with one key
  jax's jax_share_binary_between_hosts can hand process 0's compiled program to the others through the
  coordinator instead of each compiling it. A 4-process job of the test model (experiments/demo.py:test_run,
  8 steps, 2 cores): 41 s → 20 s with an empty cache, 34 s → 13 s with a full one; the same losses. (A TPU
  slice's fingerprint is the slice's, and TPU jobs keep jax's defaults; jax's private function changing its
  name leaves the cache as jax made it.)"""
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu" or not hasattr(cache_key, "_hash_accelerator_config"):
    return

  def devices_of_the_job(hash_obj, devices) -> None:
    for device in devices.flat:
      hash_obj.update(f"{device.device_kind}:{device.id}:{device.process_index};".encode())

  cache_key._hash_accelerator_config = devices_of_the_job  # pylint: disable=protected-access
  jax.config.update("jax_share_binary_between_hosts", True)


def _on_tpu_vm() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  return accelerators.tpu_devices()


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for `n_devices`, with a -1 size filled in; a ValueError if they don't fit."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh ({described}): sizes must be positive, with at most one -1 (the rest of the devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh ({described}) cannot fill {n_devices} devices: {n_devices} is not divisible by "
                       f"{known}; set mesh sizes whose product divides {n_devices}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh ({described}) needs {math.prod(sizes)} devices but there are {n_devices}; set the "
                     f"sizes so their product is {n_devices} (or use -1 for one of them)")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all; one size may be -1 for the rest).

  On TPU the devices are laid out by the physical topology (`mesh_utils.create_device_mesh`), so "tensor"
  and "fsdp" neighbours are ICI neighbours; over several slices (multi-slice) the "data" axis spans the
  slices over DCN and everything else stays inside a slice (`create_hybrid_device_mesh`). Elsewhere the
  devices are reshaped in order.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  if devices[0].platform != "tpu":
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1:
    if shape[0] % len(slices):
      raise ValueError(f"the devices span {len(slices)} TPU slices, and the 'data' axis (size {shape[0]}) is the "
                       f"one that crosses slices: make mesh.data a multiple of {len(slices)}")
    ici = (shape[0] // len(slices), shape[1], shape[2])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (len(slices), 1, 1), devices, allow_split_physical_axes=True)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as error:   # a shape the helper cannot map
      logging.warning("mesh %s: no topology-aware layout (%s); using device order", shape, error)
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


# Shardings -----------------------------------------------------------------------------------------------
def logical_to_sharding(logical_specs, mesh: Mesh, preset: str):
  """A tree of logical PartitionSpecs → the same tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(preset))


def check_divisible(abstract, logical_specs, shardings, cfg: ModelConfig | None = None) -> None:
  """A ValueError naming the first array dimension that does not split evenly over its mesh axes, and the
  config field (e.g. `model.token_multiple`) that fixes it."""
  flat_abstract = jax.tree_util.tree_flatten_with_path(abstract)[0]
  flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), names, named in zip(flat_abstract, flat_specs, flat_shardings):
    mesh_axes = tuple(named.spec) + (None,) * (len(leaf.shape) - len(named.spec))
    for dim, (size, name, axes) in enumerate(zip(leaf.shape, tuple(names), mesh_axes)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      shards = math.prod(named.mesh.shape[a] for a in axes)
      if size % shards == 0:
        continue
      where = jax.tree_util.keystr(path, simple=True, separator="/")
      problem = (f"{where} has {size} along {name or f'dimension {dim}'}, which does not split over the "
                 f"{shards} shards of mesh axes {'×'.join(axes)}")
      field = _FIELD_FOR_AXIS.get(name)
      if field and cfg is not None:
        multiple = math.lcm(getattr(cfg, field), shards)
        fix = (f"set model.{field}={multiple} (storage rounds the count up with inert rows; a checkpoint made "
               f"with it restores on every mesh whose shard count divides {multiple})")
      else:
        fix = "choose mesh sizes that divide it, or another sharding preset"
      raise ValueError(f"{problem}: {fix}")


def place_tree(abstract, logical_specs, mesh: Mesh, preset: str, cfg: ModelConfig | None = None):
  """(`abstract` with each ShapeDtypeStruct carrying its NamedSharding on `mesh`, the tree of NamedShardings),
  every dimension checked to split evenly over its mesh axes (check_divisible). Any tree with logical specs:
  parameters, or a whole train state with its optimizer moments."""
  shardings = logical_to_sharding(logical_specs, mesh, preset)
  check_divisible(abstract, logical_specs, shardings, cfg)
  placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return placed, shardings


def place(cfg: ModelConfig, mesh: Mesh, preset: str):
  """The one way a model config becomes placed abstract parameters: (abstract params with their shardings, the
  tree of NamedShardings), for restoring a checkpoint straight onto `mesh` or compiling ahead of time."""
  from tokenformer_jax.model import abstract_params, logical_axes   # (the model imports this module)
  return place_tree(abstract_params(cfg), logical_axes(cfg), mesh, preset, cfg)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [batch, ...] are split over the data-parallel axes and replicated over "tensor"."""
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(host_batch: dict, mesh: Mesh) -> dict:
  """This host's rows → one jax.Array per field, split over the data-parallel axes of the whole mesh."""
  rows = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(rows, np.asarray(v)) for k, v in host_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Inside a jitted function: `nn.with_logical_constraint` lays activations out by ACTIVATION_RULES on
  `mesh`, and the shard_map Pattention finds the mesh. Outside it (init, a plain `apply`) both are no-ops."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(ACTIVATION_RULES):
    yield
