"""What the growth experiments share: train a run in-process, grow or widen it, and write the results.

Every run lives in a directory of the shared --workdir named after its model and a hash of its whole
config (and, for a grown run, of where it grew from), and is skipped when its final checkpoint is already
there: an interrupted experiment picks up where it stopped, and experiments that need the same run (the
ladder's first stage is also the Θ ablation's baseline and the continued-training experiment's
pretraining) train it once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from tokenformer_jax import fileio, report, sharding  # noqa: E402
from tokenformer_jax.config import (DataConfig, ModelConfig, OptimConfig, ParamTokens, TrainConfig,  # noqa: E402
                                    count_params, non_defaults)
from tokenformer_jax.growth import Provenance, grow, grown_config, net2net_widen  # noqa: E402
from tokenformer_jax.run import RunDir, load_tokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"


def parse_args(description: str, name: str, argv=None, styles: tuple[str, ...] = ()) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  if styles:
    parser.add_argument("--style", choices=styles, default=styles[0], help="the TokenFormers' init style")
  parser.add_argument("--workdir", default="runs/growth", help="where the runs go (shared by the experiments; "
                      "rerun to resume)")
  parser.add_argument("--out", default=str(RESULTS), help="where the PNG and the markdown table go")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the experiment's)")
  parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (tests)")
  return parser.parse_args(argv)


def quiet() -> None:
  """Library INFO (Orbax, absl) to nowhere: the experiment prints its own progress."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  for noisy in ("orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def say(line: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# Configurations ----------------------------------------------------------------------------------------
def tokenformer(name: str, d: int, layers: int, heads: int, attention: int, ffn: int, **kw) -> ModelConfig:
  """The ladder style (paper App. D): no positions, logits ÷ sqrt(d), fan-in init; the shipped tokenizer."""
  return ModelConfig(name=name, vocab_size=2048, d_model=d, n_layers=layers, n_heads=heads,
                     param_tokens=ParamTokens.uniform(attention, ffn), positions="none",
                     logits_divide_by_sqrt_d=True, max_seq_len=128, **kw)


def transformer(name: str, d: int, layers: int, heads: int) -> ModelConfig:
  return ModelConfig(name=name, architecture="transformer", vocab_size=2048, d_model=d, n_layers=layers,
                     n_heads=heads, positions="none", logits_divide_by_sqrt_d=False, max_seq_len=128)


def train_config(model: ModelConfig, steps: int, *, seq_len: int, batch: int, lr: float, warmup: int,
                 evals: int = 8, eval_batches: int = 4, seed: int = 0, data: DataConfig | None = None,
                 schedule: str = "cosine") -> TrainConfig:
  return TrainConfig(
      model=model, data=(data or DataConfig(validation_fraction=0.1)).replace(seq_len=seq_len),
      optim=OptimConfig(learning_rate=lr, warmup_steps=min(warmup, max(steps // 4, 1)), min_lr_ratio=0.1,
                        schedule=schedule),
      steps=steps, global_batch=batch, eval_every=max(steps // evals, 1), eval_batches=eval_batches,
      log_every=max(steps // 40, 1), checkpoint_every=steps, keep_checkpoints=1, seed=seed)


def non_embedding(model: ModelConfig) -> int:
  return count_params(model, storage=False)["non_embedding"]


# Runs --------------------------------------------------------------------------------------------------
def run_dir(root, cfg: TrainConfig, origin: str = "") -> epath.Path:
  """root/<model name>-<hash of the config and the origin>: the same run always lands in the same place."""
  key = hashlib.sha1(json.dumps([non_defaults(cfg), origin], sort_keys=True).encode()).hexdigest()[:10]
  return epath.Path(root) / f"{cfg.model.name}-{key}"


def finished(cfg: TrainConfig, workdir: epath.Path) -> bool:
  run = RunDir(workdir)
  return run.finished(cfg.steps) and run.is_training_run()


def train_run(cfg: TrainConfig, root, *, init_from=None, name: str | None = None) -> report.Curve:
  """Train `cfg` in its run directory under `root` (skipped if already finished). A run from a grown
  checkpoint also gets its validation loss at step 0, so its curve starts where growth left it."""
  from tokenformer_jax.train.loop import train
  workdir = run_dir(root, cfg, epath.Path(init_from).name if init_from else "")
  if not finished(cfg, workdir):
    started = time.time()
    metrics = RunDir(workdir).metrics_file
    if init_from is not None and not metrics.exists():
      loss = eval_loss(cfg, init_from)
      workdir.mkdir(parents=True, exist_ok=True)
      fileio.write_text(metrics, json.dumps({"step": 0, "eval/loss": loss}) + "\n")
    final = train(cfg, str(workdir), init_from=None if init_from is None else str(init_from))
    if not finished(cfg, workdir):   # SIGTERM: the trainer saved and returned; so do we
      raise SystemExit(f"stopped in {workdir}; run the same command again to continue")
    say(f"{workdir.name}: {cfg.steps} steps, validation loss {final['eval/loss']:.4f} "
        f"({time.time() - started:.0f}s)")
  return report.load_run(workdir, name=name)


def eval_loss(cfg: TrainConfig, params_dir) -> float:
  """Validation loss of the parameters in `params_dir` (latest checkpoint) under `cfg`, on the batches the
  trainer evaluates on."""
  from tokenformer_jax.data.pipeline import make_eval_batches
  from tokenformer_jax.growth import start_from_grown
  from tokenformer_jax.train.steps import loss_sums, mean_loss
  cfg, _, _ = start_from_grown(cfg, str(params_dir))
  params = restore(params_dir, cfg.model)
  batches = make_eval_batches(cfg.data, load_tokenizer(cfg, trained=False), global_batch=cfg.global_batch,
                              max_batches=cfg.eval_batches)
  sums = jax.jit(lambda p, b: loss_sums(cfg.model, p, b["tokens"], b["mask"]))
  return mean_loss(sums(params, b) for b in batches)


def restore(run_dir, model: ModelConfig):
  mesh_cfg = TrainConfig(model=model).mesh
  with RunDir(run_dir) as run:
    return run.params(model, sharding.make_mesh(mesh_cfg), mesh_cfg.preset)


def save_params(dst: epath.Path, params, cfg: TrainConfig, provenance: Provenance) -> None:
  RunDir(dst).write_checkpoint(params=params, config=cfg, record=provenance)


def grow_run(src: report.Curve, old: TrainConfig, new: TrainConfig, root, *, init: str, seed: int,
             keep_scale: bool = True) -> tuple[TrainConfig, epath.Path]:
  """Grow run `src`'s final parameters into `new`'s model (skipped if already grown). Returns the config to
  train the grown model with (the kept norm scale comes from the checkpoint, as with cli.grow) and the
  grown checkpoint's directory, for train_run's init_from."""
  src = epath.Path(src.path)
  model = grown_config(old.model, new.model, keep_scale=keep_scale)
  dst = run_dir(root, new.replace(model=model), f"{src.name}/{init}/{seed}/{keep_scale}")
  dst = dst.parent / f"{dst.name}-grown"
  if not RunDir(dst).finished(0):
    params = grow(restore(src, old.model), old.model, model, init=init, rng=jax.random.key(seed))
    save_params(dst, params, new.replace(model=model),
                Provenance(source=str(src), source_step=old.steps, init=init, scale="keep" if keep_scale else "follow",
                           old_noise=0.0, seed=seed, old_model=old.model, new_model=model))
  return new.replace(model=new.model.replace(norm_scale_tokens=None)), dst


def widen_run(src: report.Curve, old: TrainConfig, new: TrainConfig, root, *, noise: float,
              seed: int) -> tuple[TrainConfig, epath.Path]:
  """Net2Net-widen a dense Transformer run into `new`'s model (skipped if already widened)."""
  src = epath.Path(src.path)
  dst = run_dir(root, new, f"{src.name}/net2net/{noise}/{seed}")
  dst = dst.parent / f"{dst.name}-grown"
  if not RunDir(dst).finished(0):
    params = net2net_widen(restore(src, old.model), old.model, new.model, noise=noise, rng=jax.random.key(seed))
    save_params(dst, params, new, Provenance(source=str(src), source_step=old.steps, init="net2net", scale="keep",
                                             old_noise=noise, seed=seed, old_model=old.model, new_model=new.model))
  return new, dst


# Results -----------------------------------------------------------------------------------------------
def write_results(out, stem: str, markdown: str) -> pathlib.Path:
  path = pathlib.Path(out) / f"{stem}.md"
  fileio.write_text(path, markdown)
  say(f"wrote {path}")
  return path


def mean_spread(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
