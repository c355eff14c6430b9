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

import dataclasses
import hashlib
import json
import pathlib
import sys
import tarfile
import tempfile
from collections.abc import Callable

from absl import app, flags

from launch import gcloud, worker
from launch.faults import Budget, BudgetExceeded, JobFailed, Status, Verdict, Watch, node_status, queued_status
from launch.runner import NO_CAPACITY, PUBLICKEY, LaunchError, Runner, display, reason
from tokenformer_jax import fileio

REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = ("setup.py", "README.md", "tokenformer_jax", "experiments", "launch")
NOT_FOUND = ("NOT_FOUND", "not found")
NO_OBJECTS = ("matched no objects", "One or more URLs matched no objects")


def build_archive(path: pathlib.Path | None = None) -> pathlib.Path:
  """The code as a source archive (setup.py, the package, experiments/, launch/), written under a fresh temporary
  name (two launchers on one machine never share it)."""
  path = path or pathlib.Path(tempfile.mkdtemp(prefix="tokenformer-")) / "src.tar.gz"
  skip = lambda info: None if "__pycache__" in info.name or info.name.endswith((".pyc", ".egg-info")) else info
  with fileio.AtomicFile(path) as out, tarfile.open(fileobj=out.file, mode="w:gz") as archive:
    for name in SHIPPED:
      archive.add(REPO / name, arcname=name, filter=skip)
  return path


def code_digest() -> str:
  """A digest of the shipped files' contents: the archive's name on GCS (same code, same name; other code, other
  name, so two ladders or two versions never overwrite each other's code)."""
  digest = hashlib.sha256()
  for name in SHIPPED:
    root = REPO / name
    for path in sorted([root] if root.is_file() else root.rglob("*")):
      if (path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc")
          and not fileio.is_temporary(path.name)):   # a write under way is not code
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
  """What every worker installs: the code on GCS, the lock file's exact versions and the Python they need."""
  archive_url: str
  lock_text: str
  python_version: str

  @property
  def script(self) -> str:
    return worker.setup_script(self.archive_url, self.lock_text, self.python_version)


def upload_code(runner: Runner, workdir: str) -> str:
  """Upload the code to WORKDIR/code/src-<digest>.tar.gz unless it is there already; returns the URL."""
  url = f"{workdir.rstrip('/')}/code/src-{code_digest()}.tar.gz"
  if not exists(runner, url):
    archive = build_archive()
    try:
      runner.run(gcloud.storage_cp(str(archive), url))
    finally:
      archive.unlink()
      archive.parent.rmdir()
  return url


def ensure_lock(runner: Runner, workdir: str, make: Callable[[], str]) -> str:
  """WORKDIR/requirements.lock: read it if the ladder wrote it before (the versions stay those of its first start),
  else write `make()` there. Returns its text."""
  url = f"{workdir.rstrip('/')}/requirements.lock"
  found = runner.run(gcloud.storage_cat(url), expect=NO_OBJECTS, quiet=True)
  if found.returncode == 0 and found.stdout.strip():
    return found.stdout
  text = make()
  local = pathlib.Path(tempfile.mkdtemp(prefix="tokenformer-")) / "requirements.lock"
  local.write_text(text)
  runner.run(gcloud.storage_cp(str(local), url))
  return text


@dataclasses.dataclass
class Job:
  """A command run on every worker, and how to tell it has finished (exit codes can't: SIGTERM exits 0)."""
  name: str                        # names its logs and pid file on the workers, e.g. "paper_354m.train"
  argv: list[str]
  done: Callable[[], bool]
  logs_to: str | None = None       # a gs:// folder the workers copy their logs to while the job runs
  env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Limits:
  """How long the watch waits on each kind of trouble, and how often it tries again."""
  poll_s: float = 60.0
  ready_timeout_s: float = 6 * 3600       # not READY (queued for capacity, creating, repairing) for this long: stop
  unknown_timeout_s: float = 1800.0       # an unreadable or unknown state for this long: recreate
  unhealthy_grace_s: float = 900.0        # READY but unhealthy, or ssh probes failing, for this long: recreate
  max_restarts: int = 3                   # restarts of a job that died on a healthy TPU
  max_recreates: int = 5                  # recreations for faults other than preemption (lost, failed, unknown)
  log_sync_s: int = 60
  fallback_after_s: float | None = None   # no capacity for the slice this long: continue on a fallback size
  fallback_slices: tuple[str, ...] = ()   # the sizes to fall back to, in order
  prefer_original: bool = False           # at a restart after a fallback, ask for the original size again


class TpuVm:
  """Create, set up, run on, watch and delete one TPU slice (or multislice) through gcloud."""

  def __init__(self, spec: gcloud.TpuSpec, runner: Runner, *, setup: WorkerSetup | None = None,
               limits: Limits = Limits(), keep_on_failure: bool = False):
    self.spec, self.runner, self.setup_spec, self.limits = spec, runner, setup, limits
    self.original = spec   # the size asked for; `spec` may change to a fallback size (faults.Watch.fall_back)
    self.keep_on_failure = keep_on_failure
    self.set_up = False
    self._script_path: pathlib.Path | None = None
    self.ledger: Callable[[], None] | None = None   # saves the budgets' spending (after a preemption, every 30 min)

  def say(self, line: str) -> None:
    self.runner.say(f"# {line}" if self.runner.dry_run else f"[{self.spec.name}] {line}")

  def sleep(self) -> None:
    self.runner.sleep(self.limits.poll_s)

  # State -------------------------------------------------------------------------------------------------------
  def status(self) -> Status:
    """The queued resource's state until it is ACTIVE, then the worst of its nodes' states and health."""
    if self.spec.queued:
      result = self.runner.run(gcloud.describe_queued(self.spec), expect=NOT_FOUND, quiet=True)
      if result.returncode:
        return Status(Verdict.ABSENT, "absent", exists=False)
      queued = queued_status(result.stdout)
      if queued.verdict is not Verdict.USABLE:
        return queued
    order = [Verdict.PREEMPTED, Verdict.LOST, Verdict.UNKNOWN, Verdict.UNHEALTHY, Verdict.WAIT, Verdict.ABSENT,
             Verdict.USABLE]
    statuses = []
    for node in self.spec.nodes:
      result = self.runner.run(gcloud.describe_node(self.spec, node), expect=NOT_FOUND, quiet=True)
      if result.returncode:
        statuses.append(Status(Verdict.LOST, f"node {node} is gone") if self.spec.queued
                        else Status(Verdict.ABSENT, "absent", exists=False))
      else:
        status = node_status(result.stdout)
        statuses.append(dataclasses.replace(status, detail=f"{node} {status.detail}") if self.spec.slices > 1
                        else status)
    return min(statuses, key=lambda s: order.index(s.verdict))

  def state(self) -> str:
    return self.status().detail

  def startup_script(self) -> str | None:
    """The setup as a local file for --metadata-from-file (written once per launcher, under a fresh name)."""
    if self.setup_spec is None:
      return None
    if self._script_path is None:
      self._script_path = pathlib.Path(tempfile.mkdtemp(prefix="tokenformer-")) / "startup-script.sh"
      self._script_path.write_text(self.setup_spec.script)
    return str(self._script_path)

  def create(self) -> bool:
    """Ask for the TPU; False when there is no capacity right now (the caller waits and asks again)."""
    result = self.runner.run(gcloud.create(self.spec, self.startup_script()), expect=("ALREADY_EXISTS", *NO_CAPACITY))
    self.set_up = False
    if result.returncode and "ALREADY_EXISTS" not in result.stderr:
      self.say(f"no capacity now: {reason(result.stderr)}; asking again in {self.limits.poll_s:.0f}s (queued "
               "resources, the default for spot, wait in Google's queue instead)")
      return False
    return True

  def delete(self) -> bool:
    """Delete the TPU (with a queued resource, its nodes too); False if there was none."""
    result = self.runner.run(gcloud.delete(self.spec), expect=NOT_FOUND)
    self.set_up = False
    return result.returncode == 0

  def ensure_ready(self) -> None:
    """Create the TPU if it is absent, replace it if it is broken, and wait until it is usable (bounded)."""
    if self.runner.dry_run:
      self.runner.run(gcloud.create(self.spec, "STARTUP_SCRIPT.sh" if self.setup_spec else None))
      self.say(f"poll until READY and healthy: {display(gcloud.describe_node(self.spec, self.spec.nodes[0]))}")
      return
    self._watch(None, [])

  def release(self) -> str:
    """After a failure: delete the TPU unless --keep_on_failure; returns what was done, to add to the error."""
    if self.keep_on_failure:
      return (f"TPU {self.spec.name} kept running (--keep_on_failure); delete it with `python -m launch.tpu delete "
              f"--name={self.spec.name} --project={self.spec.project} --zone={self.spec.zone}"
              f"{' --queued' if self.spec.queued else ''}`")
    try:
      deleted = self.delete()
    except LaunchError as error:
      return f"could not delete TPU {self.spec.name} ({error}): delete it by hand: {display(gcloud.delete(self.spec))}"
    return f"TPU {self.spec.name} deleted" if deleted else f"no TPU {self.spec.name} is left"

  # Code and jobs -----------------------------------------------------------------------------------------------
  def setup(self) -> None:
    """Run the startup-script's setup over ssh too (idempotent; waits for a boot-time run under its lock)."""
    if self.setup_spec is None:
      raise LaunchError("no worker setup: give --workdir=gs://... (the code and the lock file go there)")
    self.say("setting up the workers (their startup-script, run over ssh: waits for a boot-time run)")
    if self.runner.dry_run:
      self.say("STARTUP_SCRIPT.sh, base64-encoded in the next command:")
      for line in self.setup_spec.script.splitlines()[1:]:
        self.runner.say(f"#   {line}")
    try:
      self.runner.run(gcloud.ssh(self.spec, worker.run_setup(self.setup_spec.script)), quiet=True,
                      also_transient=PUBLICKEY)
    except LaunchError as error:
      if "tokenformer setup FAILED" in str(error):   # the script's own line: /opt/tokenformer/setup.log says more
        raise JobFailed(f"{error} (see /opt/tokenformer/setup.log on the workers)") from None
      raise
    self.set_up = True

  def start(self, job: Job) -> None:
    self.runner.run(gcloud.ssh(self.spec, worker.start_script(job.name, job.argv, job.env, job.logs_to,
                                                              self.limits.log_sync_s)), also_transient=PUBLICKEY)

  def alive(self, job: Job) -> bool:
    """True while the job runs on every worker (one dead worker leaves the others hanging: the job is dead)."""
    # two tries: if ssh still fails, the watch describes the TPU again (preempted since?) before it asks again
    result = self.runner.run(gcloud.ssh(self.spec, worker.alive_script(job.name)), quiet=True,
                             also_transient=PUBLICKEY, attempts=2)
    return "ALIVE" in result.stdout and "DEAD" not in result.stdout

  def logs(self, job: Job, lines: int = 20) -> str:
    return self.runner.run(gcloud.ssh(self.spec, worker.tail_script(job.name, lines)), quiet=True).stdout

  def run_job(self, job: Job, budgets: list[Budget] = ()) -> None:
    """Start `job` on every worker (or adopt it if it is already running) and keep it going until job.done().
    On any failure (a budget, the job's own error, a TPU that won't come): delete the TPU unless
    --keep_on_failure, and say which in the error."""
    if self.runner.dry_run:
      if not self.set_up:
        self.ensure_ready()
        self.setup()
      self.start(job)
      self.say(f"every {self.limits.poll_s:.0f}s until {job.name} is done: TPU state + health, the job, its final "
               "checkpoint; logs copied to " + (job.logs_to or "nowhere"))
      self.say("preempted/lost/failed: delete + recreate; unhealthy/unknown: wait (bounded), then recreate; "
               "died on a healthy TPU: restart there")
      return
    try:
      self._watch(job, list(budgets))
    except (LaunchError, BudgetExceeded) as error:
      raise LaunchError(f"{error}; {self.release()}") from None
    finally:
      self.save_ledger()

  def save_ledger(self) -> None:
    if self.ledger is not None:
      try:
        self.ledger()
      except LaunchError as error:   # the budgets still hold in this process; only a later rerun would forget
        self.say(f"could not save the budgets' spending: {error}")

  # The watch ---------------------------------------------------------------------------------------------------
  def _watch(self, job: Job | None, budgets: list[Budget]) -> None:
    """Every poll, read the TPU's state and health and act on it; with a job, keep the job going until it is done.
    Without a job, return as soon as the TPU is usable."""
    Watch(self, job, budgets).run()


# Logs on GCS -----------------------------------------------------------------------------------------------------
def follow_logs(runner: Runner, logs_url: str, job: str, follow: bool = False, poll_s: float = 30.0,
                stop: Callable[[], bool] = lambda: False, out=print) -> None:
  """Print the workers' log copies of `job` from logs_url; with `follow`, print what they add every poll_s until
  `stop()` (or Ctrl-C)."""
  printed: dict[str, int] = {}
  while True:
    listing = runner.run(gcloud.storage_ls(f"{logs_url.rstrip('/')}/{job}.*.log"), expect=NO_OBJECTS, quiet=True)
    for url in sorted(line.strip() for line in listing.stdout.splitlines() if line.strip()):
      text = runner.run(gcloud.storage_cat(url), expect=NO_OBJECTS, quiet=True).stdout
      if len(text) > printed.get(url, 0):
        if url not in printed:
          out(f"==> {url} <==")
        out(text[printed.get(url, 0):].rstrip("\n"))
        printed[url] = len(text)
    if not follow or stop():
      return
    runner.sleep(poll_s)


# Budgets that survive a rerun -------------------------------------------------------------------------------------
def ledger_budgets(runner: Runner, workdir: str, stages: list[str], max_preemptions: int | None,
                   max_tpu_hours: float | None, max_ladder_preemptions: int | None = None,
                   max_ladder_tpu_hours: float | None = None):
  """A Budget per stage and one for the ladder, starting from what WORKDIR/launcher/usage.json says was spent
  before (a rerun does not start the count afresh), and a `save()` that writes their spending back there."""
  url = f"{workdir.rstrip('/')}/launcher/usage.json"
  found = runner.run(gcloud.storage_cat(url), expect=NO_OBJECTS, quiet=True)
  spent = {}
  if found.returncode == 0 and found.stdout.strip():
    try:
      spent = json.loads(found.stdout)
    except ValueError:
      raise LaunchError(f"{url} is not JSON; fix or delete it (it holds the budgets' spending so far)") from None
  budgets = {name: Budget(f"stage {name}", max_preemptions, max_tpu_hours, spent.get(name, {}).get("preemptions", 0),
                          spent.get(name, {}).get("tpu_hours", 0.0), list(spent.get(name, {}).get("slices", [])))
             for name in stages}
  others = {k: v for k, v in spent.items() if k not in budgets}   # stages of an earlier ladder definition
  ladder = Budget("the ladder", max_ladder_preemptions, max_ladder_tpu_hours)
  ladder.preemptions = sum(v.get("preemptions", 0) for v in spent.values())
  ladder.tpu_hours = sum(v.get("tpu_hours", 0.0) for v in spent.values())

  def save() -> None:
    usage = {**others, **{n: {"preemptions": b.preemptions, "tpu_hours": round(b.tpu_hours, 4),
                              **({"slices": b.slices} if b.slices else {})}
                          for n, b in budgets.items() if b.preemptions or b.tpu_hours or b.slices}}
    local = pathlib.Path(tempfile.mkdtemp(prefix="tokenformer-")) / "usage.json"
    local.write_text(json.dumps(usage, indent=1, sort_keys=True) + "\n")
    runner.run(gcloud.storage_cp(str(local), url), quiet=True)
  return budgets, ladder, save


# Preflight -------------------------------------------------------------------------------------------------------
def preflight(runner: Runner, specs: list[gcloud.TpuSpec], workdir: str, data_urls: list[tuple[str, str]]) -> None:
  """Check, before creating anything, that the project and zone answer and offer each slice type, the workdir is
  writable and the data exist. Prints one line per problem, then raises one LaunchError."""
  problems = []

  def ask(argv, problem: str, expect=()):
    try:
      result = runner.run(argv, quiet=True, expect=expect)
    except LaunchError as error:
      problems.append(f"{problem}: {error}")
      return None
    return result

  if specs:
    ask(gcloud.describe_project(specs[0].project), f"project {specs[0].project} does not answer")
    for accelerator in sorted({s.accelerator for s in specs}):
      spec = next(s for s in specs if s.accelerator == accelerator)
      ask(gcloud.describe_accelerator(spec), f"zone {spec.zone} does not offer {accelerator} to {spec.project}")
  local = pathlib.Path(tempfile.mkdtemp(prefix="tokenformer-")) / "preflight.txt"
  local.write_text("written by the tokenformer launcher's preflight; safe to delete\n")
  probe = f"{workdir.rstrip('/')}/launcher/preflight.txt"
  if ask(gcloud.storage_cp(str(local), probe), f"cannot write to {workdir}") is not None:
    ask(gcloud.storage_rm(probe), f"cannot delete from {workdir}")
  for what, url in data_urls:
    result = ask(gcloud.storage_ls(url), f"cannot list {what} {url}", expect=NO_OBJECTS)
    if result is not None and result.returncode:
      problems.append(f"{what} {url} does not exist")
  if problems:
    for problem in problems:
      runner.say(f"preflight: {problem}")
    raise LaunchError(f"preflight found {len(problems)} problem{'s' * (len(problems) > 1)} (listed above); nothing "
                      "was created")


def data_urls(cfg) -> list[tuple[str, str]]:
  """The gs:// inputs a config reads: tokenizer, TFDS folder, training and validation files."""
  data = cfg.data
  urls = [("tokenizer", data.tokenizer)]
  if data.tfds_name:
    urls.append(("TFDS dataset", f"{data.tfds_data_dir.rstrip('/')}/{data.tfds_name.split(':')[0]}"))
  else:
    urls += [("training files", f) for f in data.train_files] + [("validation files", f)
                                                                  for f in data.validation_files]
  return [(what, url) for what, url in urls if url.startswith("gs://")]


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
      if not f.workdir or not f.workdir.startswith("gs://"):
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
      vm = make_vm(spec, runner)
    if action == "up":
      vm.ensure_ready()
      vm.setup()
    elif action == "run":
      vm.ensure_ready()
      vm.setup()
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
  except KeyboardInterrupt:
    if vm is not None and not f.dry_run:
      print(f"interrupted: TPU {f.name} and its job are left running; run the same command again to adopt them, "
            f"or `python -m launch.tpu delete --name={f.name} ...`", file=sys.stderr, flush=True)
    sys.exit(130)
  except (ValueError, LaunchError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def train_job(runner: Runner, name: str, config: str, workdir: str, overrides: list[str],
              init_from: str | None, env: dict[str, str] | None = None) -> Job:
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
             logs_to=f"{workdir.rstrip('/')}/logs", env=dict(env or {}))


def check_tpu_data(cfg, what: str) -> None:
  """Workers read data and the tokenizer from GCS: catch a config still pointing at this machine's files."""
  from tokenformer_jax.config import SHIPPED_TOKENIZER
  data, model = cfg.data, cfg.model
  if data.tokenizer == str(SHIPPED_TOKENIZER) and model.vocab_size != 2048:
    raise ValueError(f"{what}: model.vocab_size={model.vocab_size} but data.tokenizer is the shipped 2048-piece "
                     "one; add --set data.tokenizer=gs://BUCKET/TOKENIZER.model")
  if data.store and not data.store.startswith("gs://"):
    raise ValueError(f"{what}: data.store={data.store!r} is not on GCS; add --set data.store=gs://BUCKET/STORE "
                     "(made by python -m tokenformer_jax.data.prepare)")
  if data.tfds_name and not data.store and not data.tfds_data_dir.startswith("gs://"):
    raise ValueError(f"{what} reads TFDS {data.tfds_name!r}: add --set data.tfds_data_dir=gs://BUCKET/DIR (the "
                     "dataset prepared as array_record there)")


def checkpoint_url(run_dir: str, step: int) -> str:
  """What Orbax writes last when a step's checkpoint on GCS is complete."""
  return f"{run_dir.rstrip('/')}/checkpoints/{step}/commit_success.txt"


def exists(runner: Runner, url: str) -> bool:
  result = runner.run(gcloud.storage_ls(url), expect=NO_OBJECTS, quiet=True)
  return not runner.dry_run and result.returncode == 0


committed = exists


if __name__ == "__main__":
  define_tpu_flags()
  flags.DEFINE_string("name", None, "The TPU's name.")
  flags.DEFINE_string("accelerator", "v4-8", "TPU type, v4-8 ... v4-4096.")
  flags.DEFINE_string("job", "train", "Names the job's logs and pid file on the workers (run, train, logs).")
  flags.DEFINE_integer("lines", 20, "Lines of each worker's log to show (logs without --workdir).")
  flags.DEFINE_boolean("follow", False, "logs: keep printing what the workers add (from the copies on GCS).")
  flags.DEFINE_string("config", None, "train: experiments/FILE.py:NAME.")
  flags.DEFINE_string("workdir", None, "The run directory, a gs:// folder (code, lock file, logs, checkpoints).")
  flags.DEFINE_string("init_from", None, "train: start from this run's parameters (a grown checkpoint).")
  flags.DEFINE_multi_string("set", [], "train: config overrides, field.sub=value (repeatable).")
  flags.DEFINE_boolean("keep", False, "train: keep the TPU when the job is done.")
  app.run(main)
