"""The mesh and the ONE table that maps logical axes to mesh axes.

Modules name their axes logically (`vocab`, `embed`, `param_tokens`, `heads`, `mlp`, `layers`; activations:
`batch`, `length`). A preset below says where each goes on the mesh ("data", "fsdp", "tensor"). Within one
array a mesh axis is used at most once: the first rule that names a free mesh axis wins, so e.g. under
`fsdp` a Pattention [param_tokens, embed] is split along param_tokens and its embed stays whole.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tokenformer_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both: FSDP is data parallelism with sharded params

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


def rules(preset: str) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  if preset not in RULES:
    raise ValueError(f"unknown sharding preset {preset!r}; choose one of {', '.join(RULES)}")
  return (("batch", BATCH_AXES),) + RULES[preset]


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} devices: "
                       f"{len(devices)} is not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but there are "
                     f"{len(devices)}; set the sizes so their product is {len(devices)} (or use -1 for one)")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, preset: str):
  """A tree of logical PartitionSpecs → the same tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules(preset))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [batch, ...] are split over the data-parallel axes and replicated over "tensor"."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
