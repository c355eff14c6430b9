"""One TPU VM's life, and the `python -m launch.tpu` command for single jobs.

  python -m launch.tpu up     --name=tf-demo --project=P --zone=us-central2-b --accelerator=v4-32 --provisioning=spot
  python -m launch.tpu train  --name=tf-demo ... --config=experiments/ladder.py:paper_124m --workdir=gs://B/run
  python -m launch.tpu run    --name=tf-demo ... --job=eval -- python -m ... (on a TPU that is `up`; no watch)
  python -m launch.tpu logs|status|delete --name=tf-demo --project=P --zone=us-central2-b --accelerator=v4-32
  python -m launch.tpu ssh    --name=tf-demo ... -- 'pgrep -af tokenformer_jax'

`train` is the watch mode: it keeps the job going until its final checkpoint exists, deleting and recreating
the TPU when it is preempted, suspended or the job dies (the trainer resumes from its latest checkpoint), and
deletes the TPU at the end unless --keep.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

from absl import app, flags

from launch import gcloud
from launch.runner import LaunchError, Runner, display

REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ("setup.py", "README.md", "tokenformer_jax", "experiments", "launch")

# What a state means for us. Node states: CREATING, READY, RESTARTING, REPAIRING, STOPPED, PREEMPTED, ...
# Queued-resource states: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...
PENDING = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "UNHIDING", "DELETING", "ACCEPTED",
           "WAITING_FOR_RESOURCES", "PROVISIONING", "SUSPENDING"}
BROKEN = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "SUSPENDED", "HIDDEN", "HIDING", "FAILED"}
NOT_FOUND = ("NOT_FOUND", "not found")
NO_OBJECTS = ("matched no objects", "One or more URLs matched no objects")


def build_archive(path: pathlib.Path | None = None) -> pathlib.Path:
  """The code as a source archive (setup.py, the package, experiments/, launch/) for `pip install '.[tpu]'`."""
  path = path or pathlib.Path(tempfile.gettempdir()) / gcloud.ARCHIVE
  partial = path.with_suffix(".partial")
  skip = lambda info: None if "__pycache__" in info.name or info.name.endswith((".pyc", ".egg-info")) else info
  with tarfile.open(partial, "w:gz") as archive:
    for name in SHIPPED:
      archive.add(REPO / name, arcname=name, filter=skip)
  partial.rename(path)
  return path


@dataclasses.dataclass
class Job:
  """A command run on every worker, and how to tell it has finished (exit codes can't: SIGTERM exits 0)."""
  name: str                        # names its logs and pid file on the workers, e.g. "paper_354m.train"
  argv: list[str]
  done: Callable[[], bool]
  logs_to: str | None = None       # a gs:// folder the workers copy their logs to


class TpuVm:
  """Create, set up, run on, watch and delete one TPU VM through gcloud."""

  def __init__(self, spec: gcloud.TpuSpec, runner: Runner, *, archive: Callable[[], pathlib.Path] = build_archive,
               python: str = "python3.11", poll_s: float = 60.0, ready_timeout_s: float = 6 * 3600,
               max_restarts: int = 3, clock: Callable[[], float] = time.monotonic):
    self.spec, self.runner, self.archive, self.python = spec, runner, archive, python
    self.poll_s, self.ready_timeout_s, self.max_restarts, self.clock = poll_s, ready_timeout_s, max_restarts, clock
    self.set_up = False

  def say(self, line: str) -> None:
    self.runner.say(f"# {line}" if self.runner.dry_run else f"[{self.spec.name}] {line}")

  # State -------------------------------------------------------------------------------------------------------
  def state(self) -> str:
    """The raw state: the queued resource's until it is ACTIVE, then the node's; ABSENT if there is none."""
    if self.spec.queued:
      queued = self._describe(gcloud.describe_queued_state(self.spec))
      if queued != "ACTIVE":
        return queued
    return self._describe(gcloud.describe_state(self.spec))

  def _describe(self, argv) -> str:
    result = self.runner.run(argv, expect=NOT_FOUND, quiet=True)
    return "ABSENT" if result.returncode else (result.stdout.strip() or "UNKNOWN")

  def ensure_ready(self) -> None:
    """Create the TPU if it is absent, replace it if it is preempted/suspended/failed, and wait until READY."""
    if self.runner.dry_run:
      if not self.set_up:
        self.runner.run(gcloud.create(self.spec))
        if self.spec.queued:
          self.say(f"poll until ACTIVE: {display(gcloud.describe_queued_state(self.spec))}")
        self.say(f"poll until READY: {display(gcloud.describe_state(self.spec))}")
      return
    deadline = self.clock() + self.ready_timeout_s
    while (state := self.state()) != "READY":
      if self.clock() > deadline:
        raise LaunchError(f"TPU {self.spec.name} is still {state} after {self.ready_timeout_s / 3600:.1f} h; "
                          "try another zone or --provisioning, or raise --ready_timeout_s")
      if state == "ABSENT":
        self.runner.run(gcloud.create(self.spec), expect=("ALREADY_EXISTS",))
        self.set_up = False
        continue
      if state in BROKEN:
        self.say(f"state {state}: deleting it to create it again")
        self.delete()
        continue
      self.runner.sleep(self.poll_s)
    self.say(f"READY ({self.spec.accelerator}, {self.spec.hosts} hosts)")

  def delete(self) -> None:
    self.runner.run(gcloud.delete(self.spec), expect=NOT_FOUND)
    self.set_up = False

  # Code and jobs -----------------------------------------------------------------------------------------------
  def setup(self) -> None:
    """Copy the code to every worker and install it into a venv there (idempotent)."""
    archive = pathlib.Path(tempfile.gettempdir()) / gcloud.ARCHIVE if self.runner.dry_run else self.archive()
    self.runner.run(gcloud.scp_to_all(self.spec, str(archive)))
    self.runner.run(gcloud.ssh(self.spec, gcloud.setup_script(self.python)))
    self.set_up = True

  def start(self, job: Job) -> None:
    self.runner.run(gcloud.ssh(self.spec, gcloud.start_script(job.name, job.argv)))

  def alive(self, job: Job) -> bool:
    """True while the job runs on every worker (one dead worker leaves the others hanging: the job is dead)."""
    result = self.runner.run(gcloud.ssh(self.spec, gcloud.alive_script(job.name)), quiet=True)
    return "ALIVE" in result.stdout and "DEAD" not in result.stdout

  def logs(self, job: Job, lines: int = 20) -> str:
    return self.runner.run(gcloud.ssh(self.spec, gcloud.tail_script(job.name, lines)), quiet=True).stdout

  def collect(self, job: Job) -> None:
    """Copy the workers' logs to job.logs_to; a failure here only warns (the logs are a convenience)."""
    if not job.logs_to:
      return
    try:
      self.runner.run(gcloud.ssh(self.spec, gcloud.collect_script(job.name, job.logs_to)))
    except LaunchError as error:
      self.say(f"could not collect the logs of {job.name}: {error}")

  def run_job(self, job: Job) -> None:
    """Start `job` on every worker (or adopt it if it is already running) and keep it going until job.done()."""
    self.ensure_ready()
    if self.runner.dry_run or not self.alive(job):
      if not self.set_up:
        self.setup()
      self.start(job)
    if self.runner.dry_run:
      self.say(f"every {self.poll_s:.0f}s until {job.name} is done: its final checkpoint, the TPU state and the job")
      self.say("on PREEMPTED/SUSPENDED/a dead job: delete, create, set up and start the same command again")
      self.collect(job)
      return
    restarts = 0
    while True:
      self.runner.sleep(self.poll_s)
      state = self.state()
      if state == "READY":
        if self.alive(job):
          continue   # running, or finishing up after its final checkpoint: wait until it exits
        if job.done():
          break
        self.collect(job)
        failure = [line for line in self.logs(job).splitlines() if line.startswith("error: ")]
        if failure:   # the job's own one-line error (a bad config, a missing file): recreating won't help
          raise LaunchError(f"{job.name} failed on {self.spec.name}: {failure[-1][len('error: '):]}")
        restarts += 1
        if restarts > self.max_restarts:
          raise LaunchError(f"{job.name} died {restarts} times on {self.spec.name} without finishing; its logs: "
                            f"{job.logs_to or 'python -m launch.tpu logs'}")
        self.say(f"{job.name} is not running on every worker: recreating the TPU ({restarts}/{self.max_restarts})")
      elif state in BROKEN or state == "ABSENT":
        if job.done():
          break
        self.say(f"state {state}: recreating the TPU and restarting {job.name}")
      else:
        continue   # CREATING, REPAIRING, ...: look again later
      self.delete()
      self.ensure_ready()
      self.setup()
      self.start(job)
    self.say(f"{job.name} is done")
    if state == "READY":   # a preempted TPU has no logs to give
      self.collect(job)


# The CLI ---------------------------------------------------------------------------------------------------------
def define_tpu_flags() -> None:
  """The flags that say where and how to get TPUs (shared by launch.tpu and launch.ladder)."""
  flags.DEFINE_string("project", None, "Google Cloud project.")
  flags.DEFINE_string("zone", None, "Zone with TPU v4 capacity, e.g. us-central2-b.")
  flags.DEFINE_enum("provisioning", "on-demand", gcloud.PROVISIONING, "How to get the TPUs.")
  flags.DEFINE_boolean("queued", False, "Create queued resources (wait for capacity) instead of TPU VMs directly.")
  flags.DEFINE_string("runtime_version", gcloud.RUNTIME_VERSION, "TPU VM software version.")
  flags.DEFINE_string("python", "python3.11", "Python on the workers for the venv (installed if missing).")
  flags.DEFINE_float("poll_s", 60.0, "Seconds between checks of a running job.")
  flags.DEFINE_float("ready_timeout_s", 6 * 3600, "Give up if a TPU is not READY after this long.")
  flags.DEFINE_integer("max_restarts", 3, "Give up after a job died this many times (preemptions don't count).")
  flags.DEFINE_integer("attempts", 6, "Tries of a gcloud call that fails transiently.")
  flags.DEFINE_boolean("dry_run", False, "Print the commands instead of running them.")


def make_spec(name: str, accelerator: str) -> gcloud.TpuSpec:
  f = flags.FLAGS
  return gcloud.TpuSpec(name=name, zone=f.zone, project=f.project, accelerator=accelerator,
                        runtime_version=f.runtime_version, provisioning=f.provisioning, queued=f.queued)


def make_vm(spec: gcloud.TpuSpec, runner: Runner) -> TpuVm:
  f = flags.FLAGS
  return TpuVm(spec, runner, python=f.python, poll_s=f.poll_s, ready_timeout_s=f.ready_timeout_s,
               max_restarts=f.max_restarts)


ACTIONS = ("up", "run", "train", "ssh", "logs", "status", "delete")


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  try:
    if len(argv) < 2 or argv[1] not in ACTIONS:
      raise ValueError(f"give an action: {' | '.join(ACTIONS)} (e.g. python -m launch.tpu up --name=...)")
    action, rest = argv[1], argv[2:]
    if bool(rest) != (action in ("run", "ssh")):
      raise ValueError(f"`{action}` takes {'a command after --' if action in ('run', 'ssh') else 'no arguments'}")
    if not f.name:
      raise ValueError("--name is required: the TPU VM's name")
    spec = make_spec(f.name, f.accelerator)
    runner = Runner(dry_run=f.dry_run, attempts=f.attempts)
    job = Job(f.job, rest, done=lambda: False)
    if action == "train":
      job = train_job(runner, f.job, f.config, f.workdir, f.set, f.init_from)
    vm = make_vm(spec, runner)
    if action == "up":
      vm.ensure_ready()
      vm.setup()
    elif action == "run":
      vm.ensure_ready()
      vm.start(job)
    elif action == "train":
      if job.done():
        print(f"{f.workdir} already has its final checkpoint")
        return
      vm.run_job(job)
      if not f.keep:
        vm.delete()
    elif action == "ssh":
      print(runner.run(gcloud.ssh(spec, " ".join(rest))).stdout, end="")
    elif action == "logs":
      print(vm.logs(job, f.lines), end="")
    elif action == "status":
      print(f"{spec.name}: {vm.state()}")
    elif action == "delete":
      vm.delete()
  except (ValueError, LaunchError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def train_job(runner: Runner, name: str, config: str, workdir: str, overrides: list[str],
              init_from: str | None) -> Job:
  """cli.train on every worker; done when its final checkpoint is committed on GCS."""
  from tokenformer_jax.config import apply_overrides, load_config
  if not config or not workdir:
    raise ValueError("train needs --config=experiments/FILE.py:NAME and --workdir=gs://BUCKET/DIR")
  if not workdir.startswith("gs://"):
    raise ValueError(f"--workdir={workdir} must be a gs:// folder: every worker writes and reads it")
  cfg = apply_overrides(load_config(config), overrides)
  check_tpu_data(cfg, config)
  steps = cfg.steps
  argv = ["python", "-m", "tokenformer_jax.cli.train", f"--config={config}", f"--workdir={workdir}",
          *([f"--init_from={init_from}"] if init_from else []), *[f"--set={o}" for o in overrides]]
  return Job(name, argv, done=lambda: committed(runner, checkpoint_url(workdir, steps)),
             logs_to=f"{workdir.rstrip('/')}/logs")


def check_tpu_data(cfg, what: str) -> None:
  """Workers read data and the tokenizer from GCS: catch a config still pointing at this machine's files."""
  from tokenformer_jax.config import SHIPPED_TOKENIZER
  data, model = cfg.data, cfg.model
  if data.tokenizer == str(SHIPPED_TOKENIZER) and model.vocab_size != 2048:
    raise ValueError(f"{what}: model.vocab_size={model.vocab_size} but data.tokenizer is the shipped 2048-piece "
                     "one; add --set data.tokenizer=gs://BUCKET/TOKENIZER.model")
  if data.tfds_name and not data.tfds_data_dir.startswith("gs://"):
    raise ValueError(f"{what} reads TFDS {data.tfds_name!r}: add --set data.tfds_data_dir=gs://BUCKET/DIR (the "
                     "dataset prepared as array_record there)")


def checkpoint_url(run_dir: str, step: int) -> str:
  """What Orbax writes last when a step's checkpoint on GCS is complete."""
  return f"{run_dir.rstrip('/')}/checkpoints/{step}/commit_success.txt"


def committed(runner: Runner, url: str) -> bool:
  result = runner.run(gcloud.storage_ls(url), expect=NO_OBJECTS, quiet=True)
  return not runner.dry_run and result.returncode == 0


if __name__ == "__main__":
  define_tpu_flags()
  flags.DEFINE_string("name", None, "The TPU VM's name.")
  flags.DEFINE_string("accelerator", "v4-8", "TPU type, v4-8 ... v4-4096.")
  flags.DEFINE_string("job", "train", "Names the job's logs and pid file on the workers (run, train, logs).")
  flags.DEFINE_integer("lines", 20, "Lines of each worker's log to show (logs).")
  flags.DEFINE_string("config", None, "train: experiments/FILE.py:NAME.")
  flags.DEFINE_string("workdir", None, "train: the run directory, a gs:// folder.")
  flags.DEFINE_string("init_from", None, "train: start from this run's parameters (a grown checkpoint).")
  flags.DEFINE_multi_string("set", [], "train: config overrides, field.sub=value (repeatable).")
  flags.DEFINE_boolean("keep", False, "train: keep the TPU when the job is done.")
  app.run(main)
