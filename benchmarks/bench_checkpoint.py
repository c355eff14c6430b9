"""What verified checkpoints cost: save and restore of ladder_124m-sized state with and without checksums on this
machine, and the checksum's analytic cost per step of a TPU v4 run.

  JAX_PLATFORMS=cpu python benchmarks/bench_checkpoint.py --repeats 3

"Without" is Orbax alone (the same handlers, the same arrays); "with" is `RunCheckpoints`, which computes a
checksum of every array before the save and recomputes them after the restore. The state is the model's float32
parameters and AdamW's two moments (3 × the parameter bytes), on one device. The analytic part: a checksum reads
every byte of the state once, so on a v4 chip it costs (state bytes / chips) / HBM bandwidth per checkpoint,
amortised over `checkpoint_every` steps.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tokenformer_jax import checkpoint
from tokenformer_jax.accelerators import V4
from tokenformer_jax.config import count_params, flops_per_token, load_config
from tokenformer_jax.model import init_params
from tokenformer_jax.train.optimizer import make_optimizer



def make_state(model_cfg):
  params = jax.jit(lambda: init_params(model_cfg, jax.random.key(0)))()
  opt_state = jax.jit(make_optimizer(load_config("experiments/ladder.py:paper_124m").optim, 1000).init)(params)
  return params, opt_state


def plain_orbax(directory, params, opt_state, abstract):
  """Save then restore with Orbax alone: seconds for each."""
  manager = ocp.CheckpointManager(directory, item_handlers={"params": ocp.StandardCheckpointHandler(),
                                                            "opt_state": ocp.StandardCheckpointHandler()})
  start = time.perf_counter()
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          opt_state=ocp.args.StandardSave(opt_state)), force=True)
  manager.wait_until_finished()
  saved = time.perf_counter()
  restored = manager.restore(1, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract[0]),
                                                        opt_state=ocp.args.StandardRestore(abstract[1])))
  jax.block_until_ready((restored["params"], restored["opt_state"]))
  manager.close()
  return saved - start, time.perf_counter() - saved


def verified(directory, params, opt_state, abstract):
  """The same through RunCheckpoints (checksums saved, then recomputed and compared): seconds for each."""
  run = checkpoint.RunCheckpoints(directory, keep=None)
  start = time.perf_counter()
  run.save(1, params=params, opt_state=opt_state, config={})
  run.wait()
  saved = time.perf_counter()
  jax.block_until_ready(run.restore(1, *abstract))
  run.close()
  return saved - start, time.perf_counter() - saved


def analytic() -> list[str]:
  rows = []
  for stage in load_config("experiments/ladder.py:PAPER"):
    cfg, chips = stage.config, int(stage.accelerator.split("-")[1]) // 2
    state_bytes = 3 * 4 * count_params(cfg.model)["total"]      # fp32 params + AdamW mu and nu
    per_checkpoint = state_bytes / chips / V4.hbm_bytes_per_s
    step_at_50_mfu = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.global_batch * cfg.data.seq_len / (
        chips * V4.peak_bf16_flops * 0.5)
    per_step = per_checkpoint / cfg.checkpoint_every
    rows.append(f"| {stage.name} | {stage.accelerator} ({chips} chips) | {state_bytes / 2**30:.1f} GiB | "
                f"{per_checkpoint * 1e3:.2f} ms | {cfg.checkpoint_every} | {per_step * 1e6:.2f} µs "
                f"| {per_step / step_at_50_mfu:.1e} |")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/paper.py:ladder_124m")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  model_cfg = load_config(args.config)
  model_cfg = getattr(model_cfg, "model", model_cfg)   # a TrainConfig's model
  params, opt_state = make_state(model_cfg)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, opt_state))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
  print(f"{model_cfg.name}: {count_params(model_cfg)['total'] / 1e6:.1f}M parameters; params + AdamW state "
        f"{state_bytes / 2**20:.0f} MiB on {jax.devices()[0].platform}")
  checkpoint.checksums((params, opt_state))   # compile once, outside the timings
  start = time.perf_counter()
  for _ in range(args.repeats):
    checkpoint.checksums((params, opt_state))
  checksum_s = (time.perf_counter() - start) / args.repeats
  print(f"checksum of the whole state alone: {checksum_s:.2f} s ({state_bytes / checksum_s / 2**30:.2f} GiB/s)")
  times = {"orbax": [], "verified": []}
  for r in range(args.repeats):   # interleaved, alternating the order: load from other jobs hits both alike
    for name in (("orbax", "verified") if r % 2 == 0 else ("verified", "orbax")):
      directory = tempfile.mkdtemp(prefix="bench_checkpoint_")
      fn = plain_orbax if name == "orbax" else verified
      times[name].append(fn(directory, params, opt_state, abstract))
      shutil.rmtree(directory)
  for name, label in (("orbax", "Orbax alone (no checksums)"), ("verified", "RunCheckpoints (checksums)")):
    save, restore = np.median(np.asarray(times[name]), axis=0)
    print(f"{label:28s} save {save:6.2f} s   restore {restore:6.2f} s   (median of {args.repeats})")
  print("\nTPU v4, analytic (state bytes per chip / 1.2 TB/s HBM, once per checkpoint):")
  print("| stage | slice | fp32 params + AdamW | checksum per checkpoint | checkpoint_every | per step | "
        "fraction of a step at 50% MFU |")
  print("|---|---|---|---|---|---|---|")
  print("\n".join(analytic()))


if __name__ == "__main__":
  main()
