"""Checkpoint surgery: grow a trained TokenFormer's key/value parameter tokens into a bigger config.

  python -m tokenformer_jax.cli.grow --src=runs/124m --config=experiments/ladder.py:paper_354m \
      --dst=runs/354m-init --init=zero_keys --verify
  python -m tokenformer_jax.cli.train --config=experiments/ladder.py:paper_354m --workdir=runs/354m \
      --init_from=runs/354m-init

Reads only the source's parameters (not its optimizer state), straight onto the target mesh with the target
shardings; grows them under jit; writes a params-only checkpoint with the grown config and where it came
from. The source is never written to; the destination is written to a temporary directory and renamed.
"""
from __future__ import annotations

import time

import jax
from absl import app, flags
from etils import epath

from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import BrokenCheckpoint, CheckpointError, RunCheckpoints, write_new_run
from tokenformer_jax.cli.common import (OVERRIDES, SEED, load_experiment, one_line_errors, quiet_console,
                                        setup_process)
from tokenformer_jax.config import ModelConfig, TrainConfig, count_params, from_dict, to_dict
from tokenformer_jax.data import DataError
from tokenformer_jax.growth import (INITS, Provenance, check_growable, grow, grown_config, net2net_widen,
                                    nonzero_padding, widening_factor)
from tokenformer_jax.model import abstract_params, logical_axes

SRC = flags.DEFINE_string("src", None, "The trained run (its directory, or its checkpoints/ directory).")
STEP = flags.DEFINE_string("step", "latest", "Which checkpoint of --src: a step number or 'latest'.")
DST = flags.DEFINE_string("dst", None, "Where the grown params-only checkpoint goes (new or empty).")
INIT = flags.DEFINE_enum("init", "zero_keys", INITS, "New tokens: zero keys + random values (function-"
                         "preserving), or both random (the authors' code). A dense Transformer source is widened "
                         "by Net2Net instead.")
SCALE = flags.DEFINE_enum("scale", "keep", ["keep", "follow"], "keep: the norm scale stays sqrt(old n), so the "
                          "grown model computes the same function; follow: sqrt(new n), as the authors' code.")
OLD_NOISE = flags.DEFINE_float("old_noise", 0.0, "Std of noise added to the old tokens, as a fraction of "
                               "their init std (the authors found a little helps); for Net2Net, to every "
                               "widened tensor as a fraction of its std (breaks the symmetry of the copies).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")
VERIFY = flags.DEFINE_bool("verify", False, "Evaluate old and new model on a validation batch and report the "
                           "loss difference (0 up to float noise for zero_keys with --scale=keep).")


def placed(cfg: ModelConfig, mesh, preset: str):
  """Abstract parameters of `cfg` carrying their shardings on `mesh`."""
  shardings = sharding.logical_to_sharding(logical_axes(cfg), mesh, preset)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_params(cfg), shardings), shardings


def print_once(text: str) -> None:
  if jax.process_index() == 0:   # every process of the job runs this; one says it
    print(text, flush=True)


def check_destination(src: epath.Path, dst: epath.Path, overwrite: bool) -> None:
  src, dst = src.resolve(), dst.resolve()
  if dst == src or src in dst.parents or dst in src.parents:
    raise ValueError(f"--dst={dst} overlaps the source {src}; growth never writes into its source")
  if dst.exists() and any(dst.iterdir()) and not overwrite:
    raise ValueError(f"--dst={dst} is not empty; choose a new directory or pass --overwrite")


def verify(old_cfg: ModelConfig, old_params, new_cfg: ModelConfig, new_params, target: TrainConfig) -> float:
  from tokenformer_jax.data.pipeline import make_eval_batches
  from tokenformer_jax.data.tokenizer import Tokenizer
  from tokenformer_jax.train.steps import loss_sums
  batch = make_eval_batches(target.data, Tokenizer.load(target.data.tokenizer), global_batch=target.global_batch,
                            max_batches=1)[0]
  losses = []
  for cfg, params in ((old_cfg, old_params), (new_cfg, new_params)):
    total, count = jax.jit(lambda p, b, cfg=cfg: loss_sums(cfg, p, b["tokens"], b["mask"]))(params, batch)
    losses.append(float(total) / float(count))
  print_once(f"verify: loss {losses[0]:.6f} before, {losses[1]:.6f} after, difference {losses[1] - losses[0]:+.2e}")
  return losses[1] - losses[0]



def broken_source(source: RunCheckpoints, broken: BrokenCheckpoint, mesh, preset: str) -> CheckpointError:
  """The error for a broken --src checkpoint: it, and which of the source's steps are good instead."""
  good = source.good_steps(lambda s: placed(from_dict(TrainConfig, source.read_json(s)).model, mesh, preset)[0])
  what = f"checkpoint {source.directory / str(broken.step)} is broken ({broken.reason})"
  if not good:
    return CheckpointError(f"{what}; none of the checkpoints in {source.directory} is good")
  return CheckpointError(f"{what}; good checkpoints of {source.directory}: steps {good} (e.g. --step={good[-1]})")


@one_line_errors(ValueError, FileNotFoundError, CheckpointError, DataError)
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not SRC.value or not DST.value:
    raise ValueError("--src and --dst are required")
  setup_process()
  quiet_console()   # library lines go to DST/logs/grow.log once the grown checkpoint is written
  started = time.time()
  source = RunCheckpoints(SRC.value, read_only=True)
  step = source.resolve_step(None if STEP.value == "latest" else int(STEP.value))
  target = load_experiment()
  mesh = sharding.make_mesh(target.mesh)
  try:
    old_cfg = from_dict(TrainConfig, source.read_json(step)).model
  except BrokenCheckpoint as broken:
    raise broken_source(source, broken, mesh, target.mesh.preset) from None
  if old_cfg.architecture == "transformer":   # the dense baseline grows by Net2Net widening
    new_cfg, scheme = target.model, "net2net"
    widening_factor(old_cfg, new_cfg)
    grow_params = lambda p, rng: net2net_widen(p, old_cfg, new_cfg, noise=OLD_NOISE.value, rng=rng)
  else:
    new_cfg, scheme = grown_config(old_cfg, target.model, keep_scale=SCALE.value == "keep"), INIT.value
    check_growable(old_cfg, new_cfg)
    grow_params = lambda p, rng: grow(p, old_cfg, new_cfg, init=INIT.value, rng=rng, old_noise=OLD_NOISE.value)
  dst = epath.Path(DST.value)
  check_destination(source.directory.parent, dst, OVERWRITE.value)

  old_abstract, _ = placed(old_cfg, mesh, target.mesh.preset)
  _, new_shardings = placed(new_cfg, mesh, target.mesh.preset)
  try:
    old_params = source.restore_params(old_abstract, step)
  except BrokenCheckpoint as broken:
    raise broken_source(source, broken, mesh, target.mesh.preset) from None
  if old_cfg.architecture == "tokenformer" and (bad := nonzero_padding(old_params, old_cfg)):
    raise CheckpointError(f"{bad[0]} has nonzero padding rows past its {old_cfg.name} token count; the "
                          "checkpoint does not match its config (was it edited outside tokenformer_jax?)")
  new_params = jax.jit(grow_params, out_shardings=new_shardings)(old_params, jax.random.key(SEED.value))

  provenance = Provenance(source=str(source.directory.parent), source_step=step, init=scheme, scale=SCALE.value,
                          old_noise=OLD_NOISE.value, seed=SEED.value, old_model=old_cfg, new_model=new_cfg)
  write_new_run(dst, params=new_params, config=to_dict(target.replace(model=new_cfg)), extra=provenance.to_json())
  quiet_console(dst / "logs", "grow")

  old_n, new_n = count_params(old_cfg)["total"], count_params(new_cfg)["total"]
  print_once(f"grew {old_cfg.name} ({old_n / 1e6:.2f}M) at step {step} into {new_cfg.name} ({new_n / 1e6:.2f}M) "
             f"with {scheme}, scale={SCALE.value}, in {time.time() - started:.1f}s\ncheckpoint: {dst}\n"
             f"next: python -m tokenformer_jax.cli.train --config={flags.FLAGS.config}"
             f"{''.join(f' --set {o}' for o in OVERRIDES.value)} --workdir=RUN --init_from={dst}")
  if VERIFY.value:
    verify(old_cfg, old_params, new_cfg, new_params, target)


if __name__ == "__main__":
  app.run(main)
