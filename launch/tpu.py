"""One TPU slice's life, and the `python -m launch.tpu` command for single jobs.

  python -m launch.tpu up     --name=tf-demo --project=P --zone=us-central2-b --accelerator=v4-32 --workdir=gs://B/x
  python -m launch.tpu train  --name=tf-demo ... --config=experiments/ladder.py:paper_124m --workdir=gs://B/run
  python -m launch.tpu run    --name=tf-demo ... --workdir=gs://B/x --job=eval -- python -m ... (no watch)
  python -m launch.tpu logs   --workdir=gs://B/run --job=train [--follow]   (the copies on GCS; works after a loss)
  python -m launch.tpu status|delete --name=tf-demo --project=P --zone=us-central2-b
  python -m launch.tpu ssh    --name=tf-demo ... -- 'pgrep -af tokenformer_jax'

`train` is the watch mode: it keeps the job going until its final checkpoint exists. It decides from the TPU's state
and health (faults.py): a preempted, lost or failed TPU is deleted and recreated, an unhealthy or unreadable one is
waited on for a bounded time first, a job that died on a healthy TPU is restarted there; budgets of preemptions
and TPU hours stop it with one line. On any failure the TPU is deleted unless --keep_on_failure.
"""
from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from launch import gcloud
from launch.runner import LaunchError, Runner
# The VM's life is launch/vm.py; its names are importable from here as before.
from launch.vm import (REPO, SHIPPED, Job, Limits, TpuVm, WorkerSetup, build_archive, check_tpu_data,  # noqa: F401
                       checkpoint_url, code_digest, committed, data_urls, ensure_lock, exists, follow_logs,
                       ledger_budgets, preflight, upload_code)
from tokenformer_jax import fileio
from tokenformer_jax.cli import common


# The CLI ---------------------------------------------------------------------------------------------------------
def define_tpu_flags() -> None:
  """The flags that say where and how to get TPUs (shared by launch.tpu and launch.ladder). A main module that
  calls it adopts them as key flags (`flags.adopt_module_key_flags(launch.tpu)`) so `--help` lists them."""
  flags.DEFINE_string("project", None, "Google Cloud project.")
  flags.DEFINE_string("zone", None, "Zone with TPU v4 capacity, e.g. us-central2-b.")
  flags.DEFINE_enum("provisioning", "on-demand", gcloud.PROVISIONING, "How to get the TPUs.")
  flags.DEFINE_boolean("queued", None, "Create queued resources (wait in Google's queue for capacity) instead of "
                       "TPU VMs directly. Default: on for spot and best-effort, off otherwise.")
  flags.DEFINE_integer("slices", 1, "Slices per stage (multislice over DCN; needs queued resources; the 'data' mesh "
                       "axis spans the slices).")
  flags.DEFINE_string("valid_until", None, "Queued resources: stop waiting for capacity after this long (30m, 6h, "
                      "2d); the queued resource then FAILS and the launcher stops with its reason.")
  flags.DEFINE_string("runtime_version", gcloud.RUNTIME_VERSION, "TPU VM software version.")
  flags.DEFINE_float("poll_s", 60.0, "Seconds between checks of the TPU and the job.")
  flags.DEFINE_float("ready_timeout_s", 6 * 3600, "Stop if a TPU is not READY (queued, creating, no capacity) "
                     "after this long.")
  flags.DEFINE_float("unknown_timeout_s", 1800, "Recreate a TPU whose state is unknown or unreadable this long.")
  flags.DEFINE_float("unhealthy_grace_s", 900, "Recreate a READY TPU that is unhealthy, or that ssh cannot reach, "
                     "for this long.")
  flags.DEFINE_integer("max_restarts", 3, "Restarts of a job that died on a healthy TPU (preemptions don't count).")
  flags.DEFINE_float("fallback_after_s", None, "When a stage's slice cannot be had for this long (creation refused "
                     "for lack of capacity, or waiting in the queue), continue its run on the next size of "
                     "--fallback_slices, from its last checkpoint with the same global batch (default: never).")
  flags.DEFINE_list("fallback_slices", [], "Slice sizes to fall back to, in order, e.g. v4-32,v4-128.")
  flags.DEFINE_boolean("prefer_original", False, "After a fallback, ask for the stage's own slice size again at "
                       "the next restart (a preemption or a recreation).")
  flags.DEFINE_integer("max_recreates", 5, "Recreations of a TPU for faults other than preemption (lost, failed, "
                       "unknown, unhealthy), per stage.")
  flags.DEFINE_integer("max_preemptions", None, "Stop a stage preempted more often than this (default: no limit).")
  flags.DEFINE_float("max_tpu_hours", None, "Stop a stage that used more TPU chip-hours than this (chips × hours "
                     "held; default: no limit).")
  flags.DEFINE_boolean("keep_on_failure", False, "Keep the TPU running when a stage fails (default: delete it).")
  flags.DEFINE_multi_string("env", [], "KEY=VALUE in every job's environment (repeatable), e.g. "
                            "--env LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true")
  flags.DEFINE_string("compilation_cache", "WORKDIR/jax_cache", "JAX_COMPILATION_CACHE_DIR for every job: a "
                      "persistent XLA compilation cache on gs:// (WORKDIR: the --workdir; empty: none).")
  flags.DEFINE_integer("log_sync_s", 60, "Seconds between copies of the workers' logs to WORKDIR/logs.")
  flags.DEFINE_string("lock", None, "A local requirements file of exact versions (name==version lines) to use "
                      "when WORKDIR/requirements.lock does not exist yet (default: the versions installed here).")
  flags.DEFINE_boolean("preflight", True, "Check project, zone, bucket and data before creating anything.")
  flags.DEFINE_integer("attempts", 6, "Tries of a gcloud call that fails transiently.")
  flags.DEFINE_boolean("dry_run", False, "Print the commands instead of running them.")


def job_env(env_flags: list[str], workdir: str, cache: str) -> dict[str, str]:
  """--env KEY=VALUE flags + the compilation cache → the jobs' environment; raises ValueError on a bad one."""
  env = {}
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache.replace("WORKDIR", workdir.rstrip("/"))
  for item in env_flags:
    key, eq, value = item.partition("=")
    if not eq or not key.replace("_", "a").isalnum() or key[0].isdigit():
      raise ValueError(f"--env {item!r} must be KEY=VALUE with KEY letters, digits and underscores")
    env[key] = value
  return env


def make_spec(name: str, accelerator: str) -> gcloud.TpuSpec:
  f = flags.FLAGS
  queued = f.queued if f.queued is not None else (f.provisioning in ("spot", "best-effort") or f.slices > 1)
  return gcloud.TpuSpec(name=name, zone=f.zone, project=f.project, accelerator=accelerator,
                        runtime_version=f.runtime_version, provisioning=f.provisioning, queued=queued,
                        slices=f.slices, valid_until=f.valid_until)


def make_limits() -> Limits:
  """The watch's limits from the flags; a ValueError (one line) for a fallback size that is not a TPU v4 slice."""
  f = flags.FLAGS
  for accelerator in f.fallback_slices:
    gcloud.check_accelerator(accelerator)
  if f.fallback_slices and f.fallback_after_s is None:
    raise ValueError("--fallback_slices needs --fallback_after_s (how long to wait for the stage's own size first)")
  return Limits(poll_s=f.poll_s, ready_timeout_s=f.ready_timeout_s, unknown_timeout_s=f.unknown_timeout_s,
                unhealthy_grace_s=f.unhealthy_grace_s, max_restarts=f.max_restarts, max_recreates=f.max_recreates,
                log_sync_s=f.log_sync_s, fallback_after_s=f.fallback_after_s,
                fallback_slices=tuple(f.fallback_slices), prefer_original=f.prefer_original)


def make_vm(spec: gcloud.TpuSpec, runner: Runner, setup: WorkerSetup | None = None) -> TpuVm:
  return TpuVm(spec, runner, setup=setup, limits=make_limits(), keep_on_failure=flags.FLAGS.keep_on_failure)


def worker_setup(runner: Runner, workdir: str, lock_file: str | None = None) -> WorkerSetup:
  """The code and the lock file in the workdir (uploaded/written on first use), for the workers' setup. The lock
  is WORKDIR/requirements.lock if it exists, else `lock_file` (a local requirements file of exact versions), else
  made from the launching Python's installed versions."""
  from launch import lock

  def make() -> str:
    if not lock_file:
      return lock.lock_text()
    text = pathlib.Path(lock_file).read_text()
    if not lock.PYTHON.search(text):
      text = f"# python {'.'.join(map(str, sys.version_info[:3]))}\n" + text
    bad = [line for line in text.splitlines() if line.strip() and not line.startswith("#") and "==" not in line]
    if bad:
      raise ValueError(f"--lock={lock_file}: every line must pin one version (name==version), not {bad[0]!r}")
    return text

  if runner.dry_run:
    url = f"{workdir.rstrip('/')}/code/src-DIGEST.tar.gz"
    runner.say(f"# upload the code to {url} and the lock file to {workdir.rstrip('/')}/requirements.lock "
               "unless there")
    return WorkerSetup(url, "# python 3.11.x\n", ".".join(map(str, sys.version_info[:3])))
  text = ensure_lock(runner, workdir, make)
  return WorkerSetup(upload_code(runner, workdir), text, lock.python_of(text))


ACTIONS = ("up", "run", "train", "ssh", "logs", "status", "delete")


@common.command(LaunchError, log="tpu", arguments=True)
def main(argv: list[str]) -> None:
  f = flags.FLAGS
  vm = None
  try:
    if len(argv) < 2 or argv[1] not in ACTIONS:
      raise ValueError(f"give an action: {' | '.join(ACTIONS)} (e.g. python -m launch.tpu up --name=...)")
    action, rest = argv[1], argv[2:]
    if bool(rest) != (action in ("run", "ssh")):
      raise ValueError(f"`{action}` takes {'a command after --' if action in ('run', 'ssh') else 'no arguments'}")
    runner = Runner(dry_run=f.dry_run, attempts=f.attempts)
    if action == "logs" and f.workdir:
      follow_logs(runner, f"{f.workdir.rstrip('/')}/logs", f.job, follow=f.follow)
      return
    if not f.name:
      raise ValueError("--name is required: the TPU's name")
    spec = make_spec(f.name, f.accelerator)
    if action in ("up", "run", "train"):
      if not f.workdir or not fileio.on_gcs(f.workdir):
        raise ValueError(f"`{action}` needs --workdir=gs://BUCKET/DIR: the code, the lock file and the logs go there")
      env = job_env(f.env, f.workdir, f.compilation_cache)
      job = Job(f.job, rest, done=lambda: False, logs_to=f"{f.workdir.rstrip('/')}/logs", env=env)
      if action == "train":
        job = train_job(runner, f.job, f.config, f.workdir, f.set, f.init_from, env)
        if f.preflight and not runner.dry_run:
          from tokenformer_jax.config import apply_overrides, load_config
          preflight(runner, [spec], f.workdir, data_urls(apply_overrides(load_config(f.config), f.set)))
      vm = make_vm(spec, runner, worker_setup(runner, f.workdir, f.lock))
    else:
      vm, job = make_vm(spec, runner), None
    act(action, vm, job, rest)
  except KeyboardInterrupt:
    if vm is not None and not f.dry_run:
      print(f"interrupted: TPU {f.name} and its job are left running; run the same command again to adopt them, "
            f"or `python -m launch.tpu delete --name={f.name} ...`", file=sys.stderr, flush=True)
    sys.exit(130)


def act(action: str, vm: TpuVm, job: Job | None, rest: list[str]) -> None:
  """What `python -m launch.tpu ACTION` does with its TPU (and job)."""
  f, runner, spec = flags.FLAGS, vm.runner, vm.spec
  if action in ("up", "run"):
    vm.ensure_ready()
    vm.setup()
    if action == "run":
      vm.start(job)
  elif action == "train":
    if not runner.dry_run and job.done():
      print(f"{f.workdir} already has its final checkpoint")
      return
    if not runner.dry_run:
      budgets, _, vm.ledger = ledger_budgets(runner, f.workdir, [f.job], f.max_preemptions, f.max_tpu_hours)
    vm.run_job(job, [budgets[f.job]] if not runner.dry_run else [])
    if not f.keep:
      vm.delete()
  elif action == "ssh":
    print(runner.run(gcloud.ssh(spec, " ".join(rest))).stdout, end="")
  elif action == "logs":
    print(vm.logs(Job(f.job, [], done=lambda: False), f.lines), end="")
  elif action == "status":
    print(f"{spec.name}: {vm.state()}")
  elif action == "delete":
    vm.delete()


def train_job(runner: Runner, name: str, config: str, workdir: str, overrides: list[str],
              init_from: str | None, env: dict[str, str] | None = None) -> Job:
  """cli.train on every worker; done when its final checkpoint is committed on GCS."""
  from tokenformer_jax.config import apply_overrides, load_config
  if not config or not workdir:
    raise ValueError("train needs --config=experiments/FILE.py:NAME and --workdir=gs://BUCKET/DIR")
  if not fileio.on_gcs(workdir):
    raise ValueError(f"--workdir={workdir} must be a gs:// folder: every worker writes and reads it")
  cfg = apply_overrides(load_config(config), overrides)
  check_tpu_data(cfg, config)
  steps = cfg.steps
  argv = ["python", "-m", "tokenformer_jax.cli.train", f"--config={config}", f"--workdir={workdir}",
          *([f"--init_from={init_from}"] if init_from else []), *[f"--set={o}" for o in overrides]]
  return Job(name, argv, done=lambda: committed(runner, checkpoint_url(workdir, steps)),
             logs_to=f"{workdir.rstrip('/')}/logs", env=dict(env or {}))


if __name__ == "__main__":
  define_tpu_flags()
  flags.DEFINE_string("name", None, "The TPU's name.")
  flags.DEFINE_string("accelerator", "v4-8", "TPU type, v4-8 ... v4-8192 (tokenformer_jax/accelerators.py).")
  flags.DEFINE_string("job", "train", "Names the job's logs and pid file on the workers (run, train, logs).")
  flags.DEFINE_integer("lines", 20, "Lines of each worker's log to show (logs without --workdir).")
  flags.DEFINE_boolean("follow", False, "logs: keep printing what the workers add (from the copies on GCS).")
  flags.DEFINE_string("config", None, "train: experiments/FILE.py:NAME.")
  flags.DEFINE_string("workdir", None, "The run directory, a gs:// folder (code, lock file, logs, checkpoints).")
  flags.DEFINE_string("init_from", None, "train: start from this run's parameters (a grown checkpoint).")
  flags.DEFINE_multi_string("set", [], "train: config overrides, field.sub=value (repeatable).")
  flags.DEFINE_boolean("keep", False, "train: keep the TPU when the job is done.")
  app.run(main)
