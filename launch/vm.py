"""One TPU slice's life through gcloud: create (or queue), set up the workers, start a job, watch it (faults.py
decides what each TPU state means), delete; the code archive and the lock file in the workdir, the logs and the
budgets' ledger on GCS, and the preflight. `python -m launch.tpu` (tpu.py) and launch.ladder drive it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import tarfile
import tempfile
from collections.abc import Callable

from launch import gcloud, worker
from launch.faults import (Budget, BudgetExceeded, Job, JobFailed, Limits, Status, Verdict, Watch, node_status,
                           queued_status)
from launch.runner import NO_CAPACITY, PUBLICKEY, LaunchError, Runner, display, reason
from tokenformer_jax import fileio
from tokenformer_jax.run import COMMIT_MARKER, RunDir

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
  """The gs:// inputs a config reads: tokenizer, the stores of a mixture, TFDS folder, training and validation
  files."""
  data = cfg.data
  if cfg.model.vision is not None:   # an image classifier reads no tokenizer
    from tokenformer_jax.data import tfds_images
    if not tfds_images.is_tfds(data.image_source):   # (digits: inside scikit-learn)
      return []
    url = f"{data.tfds_data_dir.rstrip('/')}/{tfds_images.dataset_name(data.image_source)}"
    return [("TFDS image dataset", url)] if fileio.on_gcs(url) else []
  urls = [("tokenizer", data.tokenizer)]
  if data.mixture:
    from tokenformer_jax.data.mixture import parse_sources
    urls += [(f"mixture store {s.name}", s.store) for s in parse_sources(data.mixture)]
  elif data.store:
    urls.append(("token store", data.store))
  elif data.tfds_name:
    urls.append(("TFDS dataset", f"{data.tfds_data_dir.rstrip('/')}/{data.tfds_name.split(':')[0]}"))
  else:
    urls += [("training files", f) for f in data.train_files] + [("validation files", f)
                                                                  for f in data.validation_files]
  return [(what, url) for what, url in urls if fileio.on_gcs(url)]


def check_tpu_data(cfg, what: str) -> None:
  """Workers read data and the tokenizer from GCS: catch a config still pointing at this machine's files."""
  from tokenformer_jax.config import SHIPPED_TOKENIZER
  data, model = cfg.data, cfg.model
  if model.vision is not None:
    from tokenformer_jax.data import tfds_images
    if tfds_images.is_tfds(data.image_source) and not fileio.on_gcs(data.tfds_data_dir):
      raise ValueError(f"{what} reads {data.image_source!r}: add --set data.tfds_data_dir=gs://BUCKET/DIR (the "
                       "dataset prepared as array_record there)")
    return
  if data.tokenizer == str(SHIPPED_TOKENIZER) and model.vocab_size != 2048:
    raise ValueError(f"{what}: model.vocab_size={model.vocab_size} but data.tokenizer is the shipped 2048-piece "
                     "one; add --set data.tokenizer=gs://BUCKET/TOKENIZER.model")
  if data.mixture:
    from tokenformer_jax.data.mixture import parse_sources
    for source in parse_sources(data.mixture):
      if not fileio.on_gcs(source.store):
        raise ValueError(f"{what}: the mixture's store {source.store!r} (source {source.name}) is not on GCS; give "
                         "every source as gs://BUCKET/STORE=WEIGHT (stores made by python -m "
                         "tokenformer_jax.data.prepare)")
    return
  if data.store and not fileio.on_gcs(data.store):
    raise ValueError(f"{what}: data.store={data.store!r} is not on GCS; add --set data.store=gs://BUCKET/STORE "
                     "(made by python -m tokenformer_jax.data.prepare)")
  if data.tfds_name and not data.store and not fileio.on_gcs(data.tfds_data_dir):
    raise ValueError(f"{what} reads TFDS {data.tfds_name!r}: add --set data.tfds_data_dir=gs://BUCKET/DIR (the "
                     "dataset prepared as array_record there)")


def checkpoint_url(run_dir, step: int) -> str:
  """What Orbax writes last when a step's checkpoint on GCS is complete."""
  return str(RunDir(run_dir).step_dir(step) / COMMIT_MARKER)


def exists(runner: Runner, url: str) -> bool:
  result = runner.run(gcloud.storage_ls(url), expect=NO_OBJECTS, quiet=True)
  return not runner.dry_run and result.returncode == 0


committed = exists
