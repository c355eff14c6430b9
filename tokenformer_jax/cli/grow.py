"""Checkpoint surgery: grow a trained TokenFormer's key/value parameter tokens into a bigger config.

  python -m tokenformer_jax.cli.grow --checkpoint=runs/124m --config=experiments/ladder.py:paper_354m \
      --dst=runs/354m-init --init=zero_keys --verify
  python -m tokenformer_jax.cli.train --config=experiments/ladder.py:paper_354m --workdir=runs/354m \
      --init_from=runs/354m-init

Reads the source's parameters straight onto the target mesh with the target shardings; grows them under jit;
writes a params-only checkpoint with the grown config and where it came from. The source is never written to;
the destination is written to a temporary directory and renamed.

`--optimizer=carry` also reads the source's optimizer state and writes AdamW's moments into the grown
checkpoint (item "moments": {"count", "mu", "nu"}, mu and nu shaped like the grown parameters): the old rows
copied exactly, zeros in every new row (whatever --init gives the new parameters) and in the padding, and
Adam's step count (its bias correction) kept. `cli.train --init_from` then starts from them; the learning-rate
schedule is the grown run's own either way. The default, `reset`, is a fresh optimizer (paper App. E).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
from absl import app, flags
from etils import epath

from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import BrokenCheckpoint, CheckpointError
from tokenformer_jax.cli import checkpoint_flags
from tokenformer_jax.cli.common import command, quiet_console
from tokenformer_jax.cli.config_flags import OVERRIDES, SEED, load_experiment
from tokenformer_jax.config import ModelConfig, TrainConfig, count_params
from tokenformer_jax.data import DataError
from tokenformer_jax.growth import (INITS, OPTIMIZERS, Provenance, check_growable, grow, grow_moments, grown_config,
                                    net2net_widen, nonzero_padding, widening_factor)
from tokenformer_jax.run import RunDir, load_tokenizer
from tokenformer_jax.train.optimizer import adam_moments, make_optimizer
from tokenformer_jax.train.steps import state_shardings

DST = flags.DEFINE_string("dst", None, "Where the grown params-only checkpoint goes (new or empty).")
INIT = flags.DEFINE_enum("init", "zero_keys", INITS, "New tokens: zero keys + random values (function-"
                         "preserving), or both random (the authors' code). A dense Transformer source is widened "
                         "by Net2Net instead.")
SCALE = flags.DEFINE_enum("scale", "keep", ["keep", "follow"], "keep: the norm scale stays sqrt(old n), so the "
                          "grown model computes the same function; follow: sqrt(new n), as the authors' code.")
OLD_NOISE = flags.DEFINE_float("old_noise", 0.0, "Std of noise added to the old tokens, as a fraction of "
                               "their init std (the authors found a little helps); for Net2Net, to every "
                               "widened tensor as a fraction of its std (breaks the symmetry of the copies).")
OPTIMIZER = flags.DEFINE_enum("optimizer", "reset", OPTIMIZERS, "The grown run's AdamW state. reset: fresh, as "
                              "the paper (App. E) and the authors' code; carry: the source checkpoint's moments "
                              "(mu, nu, and the step count of their bias correction) with zeros for every new "
                              "token, which cli.train --init_from then starts from. The schedule is the grown "
                              "run's own either way. carry needs a TokenFormer source with its optimizer state.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")
VERIFY = flags.DEFINE_bool("verify", False, "Evaluate old and new model on a validation batch and report the "
                           "loss difference (0 up to float noise for zero_keys with --scale=keep).")


def print_once(text: str) -> None:
  if jax.process_index() == 0:   # every process of the job runs this; one says it
    print(text, flush=True)


def verify(old_cfg: ModelConfig, old_params, new_cfg: ModelConfig, new_params, target: TrainConfig) -> float:
  if old_cfg.vision is not None:
    return verify_classifier(old_cfg, old_params, new_cfg, new_params, target)
  from tokenformer_jax.data.pipeline import make_eval_batches
  from tokenformer_jax.train.steps import loss_sums, mean_loss
  batch = make_eval_batches(target.data, load_tokenizer(target, trained=False), global_batch=target.global_batch,
                            max_batches=1)[0]
  losses = []
  for cfg, params in ((old_cfg, old_params), (new_cfg, new_params)):
    sums = jax.jit(lambda p, b, cfg=cfg: loss_sums(cfg, p, b["tokens"], b["mask"]))
    losses.append(mean_loss([sums(params, batch)]))
  print_once(f"verify: loss {losses[0]:.6f} before, {losses[1]:.6f} after, difference {losses[1] - losses[0]:+.2e}")
  return losses[1] - losses[0]



def verify_classifier(old_cfg: ModelConfig, old_params, new_cfg: ModelConfig, new_params, target: TrainConfig) -> float:
  """An image classifier's --verify: the largest logit difference over a batch of its test images (and the loss)."""
  from tokenformer_jax.data import images
  from tokenformer_jax.model import VisionModel
  from tokenformer_jax.train.steps import classification_sums, mean_loss
  batch = images.eval_batches(target.data, new_cfg.vision, global_batch=target.global_batch, max_batches=1,
                              model_name=new_cfg.name)[0]
  logits, losses = [], []
  for cfg, params in ((old_cfg, old_params), (new_cfg, new_params)):
    logits.append(jax.jit(lambda p, x, cfg=cfg: VisionModel(cfg).apply({"params": p}, x))(params, batch["images"]))
    losses.append(mean_loss([jax.jit(lambda p, b, cfg=cfg: classification_sums(cfg, p, b))(params, batch)]))
  difference = float(jax.numpy.max(jax.numpy.abs(logits[1] - logits[0])))
  print_once(f"verify: largest logit difference {difference:.2e} over {int(batch['mask'].sum())} test images; loss "
             f"{losses[0]:.6f} before, {losses[1]:.6f} after")
  return difference


def broken_source(run: RunDir, broken: BrokenCheckpoint, mesh, preset: str) -> CheckpointError:
  """The error for a broken source checkpoint: it, and which of the source's steps are good instead."""
  source = run.checkpoints
  good = source.good_steps(lambda s: sharding.place(run.config(s).model, mesh, preset)[0])
  what = f"checkpoint {source.directory / str(broken.step)} is broken ({broken.reason})"
  if not good:
    return CheckpointError(f"{what}; none of the checkpoints in {source.directory} is good")
  return CheckpointError(f"{what}; good checkpoints of {source.directory}: steps {good} "
                         f"(e.g. --checkpoint={source.directory.parent}/{good[-1]})")


@dataclasses.dataclass(frozen=True)
class Grown:
  """What grow_checkpoint made (already written to its destination)."""
  old_cfg: ModelConfig
  old_params: Any
  new_cfg: ModelConfig
  new_params: Any
  provenance: Provenance


def growth_plan(old_cfg: ModelConfig, target: ModelConfig, *, init: str, scale: str, old_noise: float,
                optimizer: str):
  """(the grown config, the scheme, params, rng → grown params), or a ValueError saying why not."""
  if old_cfg.architecture == "transformer":   # the dense baseline grows by Net2Net widening
    if optimizer == "carry":
      raise ValueError(f"--optimizer=carry grows a TokenFormer's moments by zero rows; {old_cfg.name} is a dense "
                       "Transformer (widened by Net2Net), so use --optimizer=reset")
    widening_factor(old_cfg, target)
    return target, "net2net", lambda p, rng: net2net_widen(p, old_cfg, target, noise=old_noise, rng=rng)
  new_cfg = grown_config(old_cfg, target, keep_scale=scale == "keep")
  check_growable(old_cfg, new_cfg)
  return new_cfg, init, lambda p, rng: grow(p, old_cfg, new_cfg, init=init, rng=rng, old_noise=old_noise)


def restore_source(run: RunDir, step: int, cfg: TrainConfig, mesh, preset: str, carry: bool):
  """(the source's parameters, its AdamW moments with carry else None), placed on `mesh`."""
  if not carry:
    return run.params(cfg.model, mesh, preset, step), None
  source = run.checkpoints
  if not source.has_item(step, "opt_state"):
    raise CheckpointError(f"--optimizer=carry needs the source's optimizer state, and {source.directory / str(step)} "
                          "has none (a params-only checkpoint: imported or grown); use --optimizer=reset")
  rows = {} if cfg.optim.train_only_new_tokens else None   # the structure of the state it was trained with
  abstract, _ = state_shardings(cfg.model, make_optimizer(cfg.optim, cfg.steps, trainable_rows=rows), mesh, preset)
  try:
    params, rest = source.restore(step, abstract.params, {"step": abstract.step, "opt_state": abstract.opt_state},
                                  check_optimizer=True)
  except BrokenCheckpoint:
    raise
  except CheckpointError as mismatch:
    raise CheckpointError(f"{mismatch}; --optimizer=carry cannot carry it (use --optimizer=reset)") from None
  return params, adam_moments(rest["opt_state"])


def grown_moments(moments: dict, old_cfg: ModelConfig, new_cfg: ModelConfig, new_shardings, mesh) -> dict:
  """The source's {"count", "mu", "nu"} grown (zeros in every new row), under jit onto the grown shardings."""
  grow_both = lambda m: {"count": m["count"], "mu": grow_moments(m["mu"], old_cfg, new_cfg),
                         "nu": grow_moments(m["nu"], old_cfg, new_cfg)}
  out = {"count": sharding.replicated(mesh), "mu": new_shardings, "nu": new_shardings}
  return jax.jit(grow_both, out_shardings=out)(moments)


def grow_checkpoint(run: str, step: int | None, target: TrainConfig, dst: str, *, init: str = "zero_keys",
                    scale: str = "keep", old_noise: float = 0.0, seed: int = 0, optimizer: str = "reset",
                    overwrite: bool = False, devices=None) -> Grown:
  """Grow checkpoint RUN[/STEP] into `target`'s model and write the result to the new run directory `dst`, on
  `devices` (default: all of them)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown --optimizer={optimizer}; choose one of {OPTIMIZERS}")
  source = RunDir(run)
  step = source.step(step)
  mesh = sharding.make_mesh(target.mesh, devices)
  try:
    source_cfg = source.config(step)
  except BrokenCheckpoint as broken:
    raise broken_source(source, broken, mesh, target.mesh.preset) from None
  old_cfg = source_cfg.model
  new_cfg, scheme, grow_params = growth_plan(old_cfg, target.model, init=init, scale=scale, old_noise=old_noise,
                                             optimizer=optimizer)
  destination = RunDir.create(dst, overwrite=overwrite, source=source.checkpoints.directory.parent)

  _, new_shardings = sharding.place(new_cfg, mesh, target.mesh.preset)
  try:
    old_params, moments = restore_source(source, step, source_cfg, mesh, target.mesh.preset, optimizer == "carry")
  except BrokenCheckpoint as broken:
    raise broken_source(source, broken, mesh, target.mesh.preset) from None
  if old_cfg.architecture == "tokenformer" and (bad := nonzero_padding(old_params, old_cfg)):
    raise CheckpointError(f"{bad[0]} has nonzero padding rows past its {old_cfg.name} token count; the "
                          "checkpoint does not match its config (was it edited outside tokenformer_jax?)")
  new_params = jax.jit(grow_params, out_shardings=new_shardings)(old_params, jax.random.key(seed))
  if moments is not None:
    moments = grown_moments(moments, old_cfg, new_cfg, new_shardings, mesh)

  provenance = Provenance(source=str(source.checkpoints.directory.parent), source_step=step, init=scheme,
                          scale=scale, old_noise=old_noise, seed=seed, old_model=old_cfg, new_model=new_cfg,
                          optimizer=optimizer)
  destination.write_checkpoint(params=new_params, config=target.replace(model=new_cfg), record=provenance,
                               moments=moments)
  return Grown(old_cfg, old_params, new_cfg, new_params, provenance)


@command(CheckpointError, DataError, distributed=True)   # library lines: DST/logs/grow.log, once it is written
def main(argv):
  run, step = checkpoint_flags.checkpoint()
  if not DST.value:
    raise ValueError("--dst is required: where the grown checkpoint goes")
  started = time.time()
  target = load_experiment()
  grown = grow_checkpoint(run, step, target, DST.value, init=INIT.value, scale=SCALE.value,
                          old_noise=OLD_NOISE.value, seed=SEED.value, optimizer=OPTIMIZER.value,
                          overwrite=OVERWRITE.value)
  dst, record = epath.Path(DST.value), grown.provenance
  quiet_console(RunDir(dst).logs_dir, "grow")

  old_n, new_n = count_params(grown.old_cfg)["total"], count_params(grown.new_cfg)["total"]
  print_once(f"grew {grown.old_cfg.name} ({old_n / 1e6:.2f}M) at step {record.source_step} into {grown.new_cfg.name} "
             f"({new_n / 1e6:.2f}M) with {record.init}, scale={record.scale}, optimizer={record.optimizer}, in "
             f"{time.time() - started:.1f}s\ncheckpoint: {dst}\n"
             f"next: python -m tokenformer_jax.cli.train --config={flags.FLAGS.config}"
             f"{''.join(f' --set {o}' for o in OVERRIDES.value)} --workdir=RUN --init_from={dst}")
  if VERIFY.value:
    verify(grown.old_cfg, grown.old_params, grown.new_cfg, grown.new_params, target)


if __name__ == "__main__":
  app.run(main)
