"""The ladder runner: train the first stage, grow each next stage from the one before, train it; one command.

  python -m launch.ladder --ladder=tiny --backend=local --workdir=runs/tiny_ladder
  python -m launch.ladder --ladder=paper --backend=tpu --workdir=gs://BUCKET/ladder --project=P \
      --zone=us-central2-b --provisioning=spot --set data.tfds_data_dir=gs://BUCKET/tfds ... [--dry_run]

The stages are tokenformer_jax/ladder.py `Stage`s (experiments/ladder.py defines `paper` and `tiny`): the same
ones `python -m tokenformer_jax.cli.plan --ladder=NAME` compiles. Before the tpu backend creates anything, each
stage's train step is compiled for its slice (when libtpu is installed) and a stage that does not fit stops the
ladder there (`--nocheck_fit` skips this). For each stage: skip it if its final checkpoint exists; else grow
it from the previous stage's final checkpoint (unless already grown), then train it (the trainer resumes from
its latest checkpoint). Kill it at any point and run the same command again: it continues. Both backends
share this logic; `local` runs the commands as subprocesses here, `tpu` on one TPU slice per stage.

  WORKDIR/<stage>/          the stage's run (checkpoints, metrics, TensorBoard)
  WORKDIR/<stage>_grown/    the previous stage's parameters grown into this stage's model (step 0)
  WORKDIR/logs/             the jobs' logs (on TPUs: one file per worker)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys

from absl import app, flags

from launch import gcloud
from launch.faults import Budget
from launch.runner import LaunchError, Runner
from launch.tpu import define_tpu_flags, job_env, make_spec, make_vm, worker_setup
from launch.vm import (REPO, SHIPPED, Job, TpuVm, check_tpu_data, checkpoint_url, committed, data_urls, ledger_budgets,
                       preflight)
from tokenformer_jax import fileio
from tokenformer_jax.cli import common, tools
from tokenformer_jax.growth import check_growable
from tokenformer_jax.ladder import LADDER_FILE, Stage, apply_choice, check_fits, load_ladder
from tokenformer_jax.report import ladder_report
from tokenformer_jax.run import RunDir
from tokenformer_jax.sharding import MESH_AXES, mesh_shape
from tokenformer_jax.train.setup import check_batch_layout, fit_to_job


def load_stages(ladder: str, overrides: list[str]) -> tuple[str, tuple[Stage, ...]]:
  """`--ladder=NAME` (of experiments/ladder.py) or `FILE.py:NAME` → (the file, its stages with the overrides)."""
  return load_ladder(ladder, overrides)


def check_ladder(stages, backend: str, path: str = LADDER_FILE) -> None:
  """Everything that can be wrong with a ladder before it starts: fail here, not after hours of TPU time."""
  names = [s.name for s in stages]
  if len(set(names)) != len(names):
    raise ValueError(f"stage names must be unique: {names}")
  if backend == "tpu" and (pathlib.Path(path).is_absolute() or pathlib.Path(path).parts[0] not in SHIPPED
                           or not (REPO / path).is_file()):
    raise ValueError(f"the tpu backend ships this repository's {', '.join(SHIPPED)}; put the ladder file {path} "
                     "under experiments/ and name it relative to the repository")
  for i, stage in enumerate(stages):
    if i == 0 and stage.init != "scratch":
      raise ValueError(f"stage {stage.name} is the first: it has nothing to grow from (init must be 'scratch')")
    if i > 0 and stage.init != "scratch":
      try:
        check_growable(stages[i - 1].config.model, stage.config.model)
      except ValueError as error:
        raise ValueError(f"stage {stage.name}: {error}") from None
    if backend == "local" and stage.accelerator != "cpu":
      raise ValueError(f"stage {stage.name} runs on {stage.accelerator}; the local backend runs CPU stages only "
                       "(try --ladder=tiny, or --backend=tpu)")
    if backend == "tpu":
      try:
        tpu = gcloud.check_accelerator(stage.accelerator)
      except ValueError as error:
        raise ValueError(f"stage {stage.name}: {error}") from None
      try:   # one process per host
        shape = dict(zip(MESH_AXES, mesh_shape(stage.config.mesh, tpu.chips)))
        check_batch_layout(stage.config, shape, processes=tpu.hosts)
      except ValueError as error:
        raise ValueError(f"stage {stage.name} on {stage.accelerator} ({tpu.chips} chips): {error}") from None
      check_tpu_data(stage.config, f"stage {stage.name}")


def fallback_stages(stages, fallback_slices) -> list[Stage]:
  """Each TPU stage as it would continue on each --fallback_slices size: the same global batch, grad_accum adapted
  as the trainer adapts it on resume (setup.fit_to_job), so that the fit check can compile them too. A ValueError
  names a stage whose global batch a fallback size cannot split."""
  out = []
  for stage in (s for s in stages if s.accelerator != "cpu"):
    tpu = gcloud.check_accelerator(stage.accelerator)
    saved = {"config": {"global_batch": stage.config.global_batch, "grad_accum": stage.config.grad_accum,
                        "mesh": dataclasses.asdict(stage.config.mesh)},
             "job": {"processes": tpu.hosts, "devices": tpu.chips}}
    for accelerator in (a for a in fallback_slices if a != stage.accelerator):
      other = gcloud.check_accelerator(accelerator)
      try:
        data, fsdp, _ = mesh_shape(stage.config.mesh, other.chips)
        config, _ = fit_to_job(stage.config, data * fsdp, other.hosts, saved)
      except ValueError as error:
        raise ValueError(f"stage {stage.name} cannot fall back to {accelerator} ({other.chips} chips): "
                         f"{error}") from None
      out.append(dataclasses.replace(stage, accelerator=accelerator, config=config))
  return out


def train_argv(stage, workdir: str, overrides: list[str], grown: bool, path: str = LADDER_FILE) -> list[str]:
  # the stage's own overrides (a plan's choice: --slices_from) after the command line's
  init_from = [f"--init_from={RunDir.grown(workdir, stage.name).path}"] if grown else []
  return ["python", "-m", "tokenformer_jax.cli.train", f"--config={path}:{stage.name}",
          f"--workdir={workdir}/{stage.name}", *init_from,
          *[f"--set={o}" for o in (*overrides, *stage.overrides)]]


def grow_argv(previous, stage, workdir: str, overrides: list[str], path: str = LADDER_FILE) -> list[str]:
  # --overwrite: we only grow when no complete grown checkpoint exists, so a leftover is a killed attempt
  return ["python", "-m", "tokenformer_jax.cli.grow", f"--checkpoint={workdir}/{previous.name}/{previous.steps}",
          f"--config={path}:{stage.name}", f"--dst={RunDir.grown(workdir, stage.name).path}",
          f"--init={stage.init}", f"--seed={stage.config.seed}", "--overwrite",
          *[f"--set={o}" for o in (*overrides, *stage.overrides)]]


def run_ladder(stages, backend, workdir: str, overrides: list[str], say=print, path: str = LADDER_FILE) -> None:
  """The stage logic both backends share; every step first asks whether it is already done."""
  for stage in stages:
    say(f"# {stage.settings()}")
  for i, stage in enumerate(stages):
    grows = i > 0 and stage.init != "scratch"
    origin = f"grown from {stages[i - 1].name} ({stage.init})" if grows else "from scratch"
    say(f"# stage {stage.name}: {stage.steps:,} steps × {stage.tokens_per_step:,} tokens "
        f"({amount(stage.tokens)}) on {stage.accelerator}, {origin}")
    if backend.done(stage):
      say(f"# {stage.name} is done (step {stage.steps}); skipping it")
      backend.skip(stage)
      continue
    if grows and not backend.grown(stage):
      backend.run(stage, "grow", grow_argv(stages[i - 1], stage, workdir, overrides, path),
                  lambda stage=stage: backend.grown(stage))
    backend.run(stage, "train", train_argv(stage, workdir, overrides, grows, path),
                lambda stage=stage: backend.done(stage))
    backend.end(stage)
  say(f"# ladder done: {RunDir(f'{workdir}/{stages[-1].name}').step_dir(stages[-1].steps)}")


def amount(tokens: int) -> str:
  for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
    if tokens >= size:
      return f"{tokens / size:.3g}{unit}"
  return str(tokens)


class LocalBackend:
  """Runs the stage commands as processes forked from this one (tools.Forked) on this machine; checks checkpoints
  on the local disk."""

  def __init__(self, workdir: str, runner: Runner):
    self.workdir, self.runner = workdir, runner

  def done(self, stage) -> bool:
    run = RunDir(f"{self.workdir}/{stage.name}")
    if self.runner.dry_run:
      self.runner.say(f"# skip {stage.name} if {run.step_dir(stage.steps)} exists")
      return False
    return run.finished(stage.steps)

  def grown(self, stage) -> bool:
    run = RunDir.grown(self.workdir, stage.name)
    if self.runner.dry_run:
      self.runner.say(f"# grow unless {run.step_dir(0)} exists")
      return False
    return run.finished(0)

  def skip(self, stage) -> None:
    pass

  def end(self, stage) -> None:
    if not self.runner.dry_run:   # loss against cumulative FLOPs of every stage so far: WORKDIR/report/
      ladder_report(self.workdir, self.runner.say)

  def run(self, stage, kind: str, argv: list[str], done) -> None:
    if self.runner.dry_run:
      self.runner.run(argv)
      return
    log_path = pathlib.Path(self.workdir) / "logs" / f"{stage.name}.{kind}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    self.runner.say(f"$ {' '.join(argv)}  (log: {log_path})")
    with open(log_path, "a") as log:   # forked where it can be: this process imported jax and the rest (in its
      main = tools.forkable(argv)     # group, so that a kill of the launcher's group stops the child too)
      child = (tools.Forked(main, dict(os.environ), output=log.fileno(), new_session=False) if main else
               subprocess.Popen([sys.executable, *argv[1:]], stdout=log, stderr=subprocess.STDOUT))
      try:
        code = child.wait()
      finally:   # the launcher was interrupted: stop the child too (SIGTERM: the trainer saves and exits)
        if child.poll() is None:
          child.terminate()
          child.wait()
    if code != 0:
      raise LaunchError(f"{stage.name} {kind} failed (exit {code}): {last_error(log_path)} (log: {log_path})")
    if not done():
      raise LaunchError(f"{stage.name} {kind} stopped before finishing (log: {log_path}); run the same command "
                        "again to continue")


def last_error(log_path: pathlib.Path) -> str:
  lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["no output"])[-1]


class TpuBackend:
  """Runs each stage on a TPU slice; consecutive stages on the same slice type share one (kept between them).
  Checks checkpoints on GCS with `gcloud storage ls`."""

  def __init__(self, workdir: str, runner: Runner, vms: dict[str, TpuVm], env: dict[str, str] | None = None,
               budgets: dict[str, Budget] | None = None, ladder_budget: Budget | None = None):
    self.workdir, self.runner, self.vms, self.env = workdir, runner, vms, dict(env or {})
    self.budgets, self.ladder_budget = budgets or {}, ladder_budget
    self.order = list(vms)

  def done(self, stage) -> bool:
    if self.runner.dry_run:
      self.runner.say(f"# skip {stage.name} if its final checkpoint is committed:")
    return committed(self.runner, checkpoint_url(f"{self.workdir}/{stage.name}", stage.steps))

  def grown(self, stage) -> bool:
    if self.runner.dry_run:
      self.runner.say(f"# grow {stage.name} unless its grown checkpoint is committed:")
    return committed(self.runner, checkpoint_url(RunDir.grown(self.workdir, stage.name).path, 0))

  def _release(self, stage) -> None:
    """Delete the stage's TPU unless the next stage runs on the same one (keeping a slice also keeps spot capacity)."""
    i = self.order.index(stage.name)
    vm = self.vms[stage.name]
    if i + 1 < len(self.order) and self.vms[self.order[i + 1]] is vm:
      vm.say(f"kept for {self.order[i + 1]} (same slice)")
      return
    vm.delete()

  def skip(self, stage) -> None:
    self._release(stage)   # a run killed between "done" and "delete" may have left it

  def end(self, stage) -> None:
    self._release(stage)

  def run(self, stage, kind: str, argv: list[str], done) -> None:
    budgets = [b for b in (self.budgets.get(stage.name), self.ladder_budget) if b is not None]
    self.vms[stage.name].run_job(Job(f"{stage.name}.{kind}", argv, done, logs_to=f"{self.workdir}/logs",
                                     env=self.env), budgets)


def tpu_name(prefix: str, stage) -> str:
  return f"{prefix}-{stage.name}".replace("_", "-").lower()


def slice_groups(stages) -> list[list]:
  """Runs of consecutive stages on the same slice type: each run shares one TPU, named after its first stage."""
  groups: list[list] = []
  for stage in stages:
    if groups and groups[-1][-1].accelerator == stage.accelerator:
      groups[-1].append(stage)
    else:
      groups.append([stage])
  return groups


def make_backend(backend: str, workdir: str, stages, runner: Runner, prefix: str, before_gcloud=None):
  """Validates every flag the backend needs (before any command runs) and builds it. For TPUs: preflight (project,
  zone, bucket, data), then the lock file and the code in the workdir."""
  if backend == "local":
    if fileio.on_gcs(workdir):
      raise ValueError("the local backend writes to a local --workdir, not gs://")
    return LocalBackend(str(pathlib.Path(workdir).resolve()), runner)
  if not fileio.on_gcs(workdir):
    raise ValueError(f"--workdir={workdir} must be a gs:// folder for the tpu backend: every worker reads and "
                     "writes it, and the launcher checks checkpoints there")
  f = flags.FLAGS
  workdir = workdir.rstrip("/")
  env = job_env(f.env, workdir, f.compilation_cache)
  specs = {group[0].name: make_spec(tpu_name(prefix, group[0]), group[0].accelerator)
           for group in slice_groups(stages)}
  for stage in stages:   # multislice: the 'data' mesh axis is the one that spans the slices (sharding.py)
    data = stage.config.mesh.data
    if f.slices > 1 and data != -1 and data % f.slices:
      raise ValueError(f"stage {stage.name}: --slices={f.slices} needs mesh.data to be a multiple of {f.slices} "
                       f"(it is {data}); add --set mesh.data={f.slices}")
  if before_gcloud is not None:   # e.g. the fit check: after every flag is validated, before the first gcloud call
    before_gcloud()
  if f.preflight and not runner.dry_run:
    urls = sorted({u for s in stages for u in data_urls(s.config)})
    preflight(runner, list(specs.values()), workdir, urls)
  setup = worker_setup(runner, workdir, f.lock)
  vms = {}
  for group in slice_groups(stages):
    vm = make_vm(specs[group[0].name], runner, setup)
    vms.update({s.name: vm for s in group})
  if runner.dry_run:
    return TpuBackend(workdir, runner, vms, env)
  budgets, ladder_budget, save = ledger_budgets(runner, workdir, [s.name for s in stages], f.max_preemptions,
                                                f.max_tpu_hours, f.max_ladder_preemptions, f.max_ladder_tpu_hours)
  for vm in vms.values():
    vm.ledger = save
  return TpuBackend(workdir, runner, vms, env, budgets, ladder_budget)


def launch_ladder(ladder: str, backend: str, workdir: str, overrides: list[str], runner: Runner, prefix: str,
                  check_fit: bool = True, fallback_slices: tuple[str, ...] = (), slices_from: str | None = None) -> None:
  """Check everything that can be checked here (flags, stages, and with the tpu backend that each stage fits
  its slice and each of `fallback_slices`), then run the ladder. Nothing reaches gcloud before the checks pass.
  `slices_from`: a plan's choice of slices (PLAN.json of `cli.plan --search --deadline_days`) replaces the stages'."""
  path, stages = load_stages(ladder, overrides)
  if slices_from:
    stages = apply_choice(stages, slices_from)
  check_ladder(stages, backend, path)
  fallbacks = fallback_stages(stages, fallback_slices) if backend == "tpu" else []
  fit_check = None
  if backend == "tpu" and check_fit and runner.dry_run:
    runner.say(f"# fit check: not in a dry run (it compiles every stage); python -m tokenformer_jax.cli.plan "
               f"--ladder={ladder} does it")
  elif backend == "tpu" and check_fit:
    fit_check = lambda: check_fits([*stages, *fallbacks], say=runner.say)   # noqa: E731
  chosen = make_backend(backend, workdir, stages, runner, prefix, before_gcloud=fit_check)
  run_ladder(stages, chosen, chosen.workdir, overrides, say=runner.say, path=path)


@common.command(LaunchError, hint="config fields are set with --set field=value")
def main(argv: list[str]) -> None:
  f = flags.FLAGS
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: a local child gets stopped too
  if not f.ladder or not f.workdir:
    raise ValueError("--ladder and --workdir are required, e.g. --ladder=tiny --backend=local --workdir=runs/tiny")
  if not f.dry_run:   # library lines to WORKDIR/logs/ladder.log (a dry run writes nothing)
    common.quiet_console(os.path.join(f.workdir, "logs"), "ladder")
  runner = Runner(dry_run=f.dry_run, attempts=f.attempts)
  try:
    launch_ladder(f.ladder, f.backend, f.workdir, f.set, runner, f.tpu_prefix, check_fit=f.check_fit,
                  fallback_slices=tuple(f.fallback_slices), slices_from=f.slices_from)
  except KeyboardInterrupt:
    if f.backend == "tpu" and not f.dry_run:
      print("interrupted: the current stage's TPU and its job are left running; run the same command again to "
            "adopt them (or delete the TPU with `python -m launch.tpu delete ...`)", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  define_tpu_flags()
  flags.adopt_module_key_flags(sys.modules[define_tpu_flags.__module__])   # --help lists the TPU flags too
  flags.DEFINE_integer("max_ladder_preemptions", None, "Stop the ladder after more preemptions than this, all "
                       "stages together (default: no limit).")
  flags.DEFINE_float("max_ladder_tpu_hours", None, "Stop the ladder after more TPU chip-hours than this, all "
                     "stages together (default: no limit).")
  flags.DEFINE_string("ladder", None, "A ladder of experiments/ladder.py (paper, tiny), or FILE.py:NAME.")
  flags.DEFINE_enum("backend", "local", ("local", "tpu"), "Where the stages run.")
  flags.DEFINE_string("workdir", None, "Where the stages' runs go (gs:// for the tpu backend).")
  flags.DEFINE_multi_string("set", [], "Config overrides for every stage, field.sub=value (repeatable).")
  flags.DEFINE_string("tpu_prefix", "tokenformer", "TPU names are PREFIX-STAGE, STAGE the first of each run of "
                      "consecutive stages on the same slice type (they share that TPU).")
  flags.DEFINE_string("slices_from", None, "PLAN.json written by cli.plan --ladder --search --deadline_days "
                      "--slices_out=PLAN.json: run each stage it names on the slice (and with the grad_accum and "
                      "remat) chosen there.")
  flags.DEFINE_bool("check_fit", True, "tpu backend: before creating anything, compile each stage's train step for "
                    "its slice (needs libtpu; minutes per stage) and stop at a stage that does not fit.")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the launcher needs no accelerator; local stages are CPU stages
  app.run(main)
