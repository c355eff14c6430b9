"""A run, assembled once: mesh → optimizer + schedule → abstract state and its shardings → jitted steps.

The trainer, the TPU plan, the benchmarks and the tests all call `build_run`, so the plan compiles the very
step that training runs. `check_batch_layout` is the one check that a batch splits over the hosts and the
data-parallel devices (the launcher calls it too, with the mesh shape of a slice it has not created yet);
`fit_to_job` adapts grad_accum when a run resumes on a job of another shape (the global batch stays).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tokenformer_jax import sharding
from tokenformer_jax.config import MeshConfig, TrainConfig
from tokenformer_jax.train import steps
from tokenformer_jax.train.mixing import Mixing
from tokenformer_jax.train.optimizer import learning_rate_schedule, make_optimizer


class LayoutError(ValueError):
  """A batch that does not split over the hosts or the data-parallel devices; says which setting to change."""


def check_batch_layout(cfg: TrainConfig, mesh_shape: Mapping[str, int], processes: int = 1) -> None:
  """global_batch splits into grad_accum micro-batches, each over the data-parallel devices ("data" × "fsdp"),
  and into equal parts for the `processes` hosts that each load their own rows."""
  data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
  if cfg.global_batch % cfg.grad_accum:
    raise LayoutError(f"global_batch={cfg.global_batch} is not divisible by grad_accum={cfg.grad_accum}")
  micro = cfg.global_batch // cfg.grad_accum
  if micro % data_parallel:
    raise LayoutError(f"each micro-batch has {micro} sequences (global_batch / grad_accum), which does not split "
                      f"over the {data_parallel} data-parallel devices of mesh {dict(mesh_shape)}; make it a "
                      "multiple of that")
  if cfg.global_batch % processes:
    raise LayoutError(f"global_batch={cfg.global_batch} does not split over {processes} hosts")


def fit_to_job(cfg: TrainConfig, data_parallel: int, processes: int, saved: dict | None) -> tuple[TrainConfig, str]:
  """`cfg` for a job with `data_parallel` batch-splitting devices over `processes` hosts, resuming a checkpoint
  whose config and job shape are `saved` ({"config": ..., "job": {"processes", "devices"}}; None: a new run).

  The global batch is the run's optimisation and stays. Only grad_accum adapts, and only on resume: each
  micro-batch must split over the data-parallel devices, and no device may hold more rows of a micro-batch than
  it did in the job that saved the checkpoint (that many are known to fit). The configured grad_accum is kept
  when it satisfies both, else the smallest that does. (cfg, a note for the log, "" if nothing changed.) A
  global batch this job cannot split at all is a LayoutError saying which device and host counts would take it.
  """
  if saved is None:   # a new run: check_batch_layout says what does not split
    return cfg, ""
  batch = cfg.global_batch
  if batch % data_parallel or batch % processes:
    divisors = [n for n in range(1, batch + 1) if batch % n == 0]
    raise LayoutError(f"global_batch={batch} cannot be split over this job's {data_parallel} data-parallel devices "
                      f"on {processes} host(s); keep the run's global batch on a job whose data-parallel devices "
                      f"and hosts each divide {batch} ({', '.join(map(str, divisors))}), or change global_batch "
                      "(a different optimisation)")
  if not saved.get("job", {}).get("devices"):   # saved before jobs were recorded: the configured grad_accum
    return cfg, ""
  before = saved["config"]
  saved_shape = sharding.mesh_shape(MeshConfig(**before["mesh"]), saved["job"]["devices"])
  per_device = max(before["global_batch"] // (before["grad_accum"] * saved_shape[0] * saved_shape[1]), 1)

  def fits(accum: int) -> bool:
    return batch % (accum * data_parallel) == 0 and batch // (accum * data_parallel) <= per_device

  if fits(cfg.grad_accum):
    return cfg, ""
  accum = next(a for a in range(1, batch // data_parallel + 1) if fits(a))   # batch // data_parallel always fits
  return cfg.replace(grad_accum=accum), (
      f"grad_accum {cfg.grad_accum} → {accum} on this job's {data_parallel} data-parallel devices (the checkpoint's "
      f"job: {saved['job']['devices']} devices, {per_device} rows per device per micro-batch); global_batch "
      f"{batch} kept")


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a train or eval loop needs besides data and checkpoints."""
  config: TrainConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: Callable
  abstract: steps.TrainState      # ShapeDtypeStructs carrying their shardings
  shardings: steps.TrainState     # NamedShardings
  train_step: Any                 # jit(state, batch) → (state, metrics); with optim.spike_guard see guard.py
  eval_step: Any                  # jit(params, batch) → (Σ loss, {"targets", ...}): steps.batch_sums

  def init_state(self, params=None, moments=None) -> steps.TrainState:
    """A fresh state (or one around already placed `params`, with carried AdamW `moments`), created directly
    with its shardings."""
    return steps.init_state(self.config.model, self.tx, self.shardings, self.config.seed, params=params,
                            moments=moments)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch's shapes and shardings, for compiling the step ahead of time."""
    cfg, rows = self.config, sharding.batch_sharding(self.mesh)
    if cfg.model.vision is not None:
      v = cfg.model.vision
      return {"images": jax.ShapeDtypeStruct((cfg.global_batch, v.image_size, v.image_size, v.channels), jnp.float32,
                                             sharding=rows),
              "labels": jax.ShapeDtypeStruct((cfg.global_batch,), jnp.int32, sharding=rows),
              "mask": jax.ShapeDtypeStruct((cfg.global_batch,), jnp.float32, sharding=rows)}
    return {"tokens": jax.ShapeDtypeStruct((cfg.global_batch, cfg.data.seq_len + 1), jnp.int32, sharding=rows),
            "mask": jax.ShapeDtypeStruct((cfg.global_batch, cfg.data.seq_len), jnp.float32, sharding=rows)}

  def to_global(self, host_batch: dict) -> dict:
    """This host's rows → one jax.Array per field, split over the data-parallel axes of the whole mesh."""
    return sharding.to_global(host_batch, self.mesh)


def build_run(cfg: TrainConfig, devices=None, *, trainable_rows=None, processes: int | None = None) -> Run:
  """The run of `cfg` on `devices` (default: every device of every process). `trainable_rows` restricts the
  updates to growth's new parameter tokens (optim.train_only_new_tokens); `processes` is the number of hosts
  that each load part of the batch (default: this job's)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  check_batch_layout(cfg, mesh.shape, jax.process_count() if processes is None else processes)
  schedule = learning_rate_schedule(cfg.optim, cfg.steps)
  tx = make_optimizer(cfg.optim, cfg.steps, trainable_rows=trainable_rows)
  abstract, shardings = steps.state_shardings(cfg.model, tx, mesh, cfg.mesh.preset)
  return Run(config=cfg, mesh=mesh, tx=tx, schedule=schedule, abstract=abstract, shardings=shardings,
             train_step=steps.make_train_step(cfg.model, tx, schedule, shardings, mesh, cfg.grad_accum,
                                              guarded=cfg.optim.spike_guard,
                                              mixing=Mixing.of(cfg.data) if cfg.model.vision else None),
             eval_step=steps.make_eval_step(cfg.model, shardings, mesh))
