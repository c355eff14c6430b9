"""The watch: what it makes of a TPU's state and health, what it does about it, and the budgets that bound it.

Every value of the TPU VM `state` and `health` enums and of the queued resource's `state.state` enum maps to one
`Verdict`; a value missing from these tables (a new enum value, unparseable output) is UNKNOWN, which the watch
waits on for a bounded time only (`--unknown_timeout_s`) before it recreates the TPU. `Watch` acts on the
verdicts through a TpuVm (vm.py, the `Machine` here): create, delete, set up, start, probe. `Job` (a command on
every worker) and `Limits` (how long each kind of trouble is waited on) are defined here for both.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from typing import Protocol

from launch.runner import LaunchError, Runner, is_transient


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


class Machine(Protocol):
  """What the watch acts through: a TpuVm (launch/vm.py), which imports this module (so this one names none)."""
  spec: object                          # gcloud.TpuSpec: its accelerator changes on a fallback
  original: object
  runner: Runner
  limits: Limits
  ledger: Callable[[], None] | None
  set_up: bool

  def say(self, line: str) -> None: ...
  def sleep(self) -> None: ...
  def status(self) -> Status: ...
  def create(self) -> bool: ...
  def delete(self) -> bool: ...
  def setup(self) -> None: ...
  def start(self, job: Job) -> None: ...
  def alive(self, job: Job) -> bool: ...
  def logs(self, job: Job, lines: int = 20) -> str: ...
  def save_ledger(self) -> None: ...


class Verdict(enum.Enum):
  ABSENT = "absent"          # nothing there: create it
  WAIT = "wait"              # on its way (creating, queued for capacity, repairing, restarting): look again later
  USABLE = "usable"          # READY and not reported unhealthy: set up, run, watch the job
  UNHEALTHY = "unhealthy"    # READY but unhealthy: wait up to --unhealthy_grace_s, then recreate
  PREEMPTED = "preempted"    # taken back (spot/preemptible): recreate; counts against --max_preemptions
  LOST = "lost"              # stopped, terminated or hidden by someone or something else: recreate
  FAILED = "failed"          # a queued resource that failed, with a reason: recreate if the reason is transient
  UNKNOWN = "unknown"        # a state we can't read: wait up to --unknown_timeout_s, then recreate


NODE_STATES = {
    "STATE_UNSPECIFIED": Verdict.UNKNOWN, "UNKNOWN": Verdict.UNKNOWN,
    "CREATING": Verdict.WAIT, "STARTING": Verdict.WAIT, "RESTARTING": Verdict.WAIT, "REIMAGING": Verdict.WAIT,
    "REPAIRING": Verdict.WAIT, "UNHIDING": Verdict.WAIT, "DELETING": Verdict.WAIT,
    "READY": Verdict.USABLE,
    "PREEMPTED": Verdict.PREEMPTED,
    "STOPPING": Verdict.LOST, "STOPPED": Verdict.LOST, "TERMINATED": Verdict.LOST, "HIDING": Verdict.LOST,
    "HIDDEN": Verdict.LOST,
}
# HEALTH_UNSPECIFIED: the health monitor has not reported (yet); the ssh probe decides.
HEALTH = {"HEALTH_UNSPECIFIED": True, "": True, "HEALTHY": True, "TIMEOUT": False, "UNHEALTHY_TENSORFLOW": False,
          "UNHEALTHY_MAINTENANCE": False, "DEPRECATED_UNHEALTHY": False}
QUEUED_STATES = {
    "STATE_UNSPECIFIED": Verdict.UNKNOWN,
    "CREATING": Verdict.WAIT, "ACCEPTED": Verdict.WAIT, "WAITING_FOR_RESOURCES": Verdict.WAIT,
    "PROVISIONING": Verdict.WAIT, "DELETING": Verdict.WAIT,
    "ACTIVE": Verdict.USABLE,     # then the nodes decide
    "SUSPENDING": Verdict.PREEMPTED, "SUSPENDED": Verdict.PREEMPTED,
    "FAILED": Verdict.FAILED,
}


@dataclasses.dataclass(frozen=True)
class Status:
  verdict: Verdict
  detail: str            # what gcloud said, for the log: "READY/TIMEOUT: the TPU is unresponsive"
  exists: bool = True    # the TPU bills (for the TPU-hours budget)


def parse_json(text: str) -> dict | None:
  try:
    value = json.loads(text)
  except ValueError:
    return None
  return value if isinstance(value, dict) else None


def node_status(text: str) -> Status:
  """`tpu-vm describe --format=json(state,health,healthDescription)` output → Status."""
  node = parse_json(text)
  if node is None or not isinstance(node.get("state"), str):
    return Status(Verdict.UNKNOWN, f"unreadable node description {text.strip()[:80]!r}")
  state, health = node["state"], str(node.get("health", ""))
  detail = state + (f"/{health}" if health else "") + (f": {node['healthDescription']}"
                                                       if node.get("healthDescription") else "")
  verdict = NODE_STATES.get(state, Verdict.UNKNOWN)
  if verdict is Verdict.USABLE and not HEALTH.get(health, False):
    verdict = Verdict.UNHEALTHY   # an unknown health value counts as unhealthy: bounded by the grace period
  return Status(verdict, detail)


def queued_status(text: str) -> Status:
  """`queued-resources describe --format=json(state)` output → Status (FAILED carries failedData's message)."""
  described = parse_json(text)
  state = described.get("state") if described else None
  if not isinstance(state, dict) or not isinstance(state.get("state"), str):
    return Status(Verdict.UNKNOWN, f"unreadable queued resource description {text.strip()[:80]!r}", exists=False)
  name = state["state"]
  verdict = QUEUED_STATES.get(name, Verdict.UNKNOWN)
  detail = name
  if verdict is Verdict.FAILED:
    error = (state.get("failedData") or {}).get("error") or {}
    detail = f"FAILED: {error.get('message') or 'no reason given'}"
  return Status(verdict, detail, exists=verdict in (Verdict.USABLE, Verdict.PREEMPTED))


class BudgetExceeded(RuntimeError):
  """A --max_preemptions or --max_tpu_hours budget ran out: one line naming it."""


@dataclasses.dataclass
class Budget:
  """Preemptions and TPU hours (chip-hours: a v4-64 of 32 chips held for an hour is 32) spent against limits.

  One Budget per ladder and one per stage; `charge` adds to both. A limit of None is no limit.
  """
  what: str                          # "stage paper_124m" or "the ladder"
  max_preemptions: int | None = None
  max_tpu_hours: float | None = None
  preemptions: int = 0
  tpu_hours: float = 0.0
  slices: list = dataclasses.field(default_factory=list)   # size changes: {"accelerator", "instead_of", "why"}

  def check(self) -> None:
    if self.max_preemptions is not None and self.preemptions > self.max_preemptions:
      flag = "--max_ladder_preemptions" if self.what == "the ladder" else "--max_preemptions"
      raise BudgetExceeded(f"{self.what} was preempted {self.preemptions} times, over its budget of "
                           f"{flag}={self.max_preemptions}")
    if self.max_tpu_hours is not None and self.tpu_hours > self.max_tpu_hours:
      flag = "--max_ladder_tpu_hours" if self.what == "the ladder" else "--max_tpu_hours"
      raise BudgetExceeded(f"{self.what} used {self.tpu_hours:,.1f} TPU chip-hours, over its budget of "
                           f"{flag}={self.max_tpu_hours:g}")


class JobFailed(LaunchError):
  """The job (or the workers' setup) failed on a healthy TPU: recreating the TPU would not help."""


AGAIN, LATER, DONE = "again", "later", "done"   # what a watch step asks for: look again now, after a poll, stop


class Watch:
  """One watch of one TPU: what it decides for each verdict, and the bounds it keeps (faults.py has the verdicts)."""

  def __init__(self, vm: Machine, job: Job | None, budgets: list[Budget]):
    self.vm, self.job, self.budgets, self.limits = vm, job, budgets, vm.limits
    self.since: dict[str, float] = {}      # when each bounded trouble began: waiting, unknown, unhealthy, probe
    self.restarts = self.recreates = 0
    self.started = False                   # the job was started (or adopted) on the current TPU

  def run(self) -> None:
    clock = self.vm.runner.clock
    last = saved = clock()
    billing = False
    steps = {Verdict.ABSENT: self.absent, Verdict.WAIT: self.absent, Verdict.PREEMPTED: self.broken,
             Verdict.LOST: self.broken, Verdict.FAILED: self.broken, Verdict.UNKNOWN: self.troubled,
             Verdict.UNHEALTHY: self.troubled, Verdict.USABLE: self.usable}
    keeps = {Verdict.ABSENT: "waiting", Verdict.WAIT: "waiting", Verdict.UNKNOWN: "unknown",
             Verdict.UNHEALTHY: "unhealthy", Verdict.USABLE: "probe"}
    while True:
      status = self.vm.status()
      now = clock()
      for budget in self.budgets if billing else ():
        budget.tpu_hours += self.vm.spec.chips * (now - last) / 3600
      last, billing = now, status.exists
      if self.budgets and (now - saved >= 1800 or status.verdict is Verdict.PREEMPTED):
        self.vm.save_ledger()
        saved = now
      for budget in self.budgets:
        budget.check()
      for trouble in [t for t in self.since if t != keeps.get(status.verdict)]:
        del self.since[trouble]            # a trouble that is over starts its clock afresh next time
      outcome = steps[status.verdict](status, now)
      if outcome == DONE:
        return
      if outcome == LATER:
        self.vm.sleep()

  def finished(self) -> bool:
    return self.job is not None and self.started and self.job.done()

  def recreate(self, why: str) -> str:
    """Delete the TPU (the next look finds it absent and creates it), counting against --max_recreates."""
    self.recreates += 1
    if self.recreates > self.limits.max_recreates:
      raise LaunchError(f"TPU {self.vm.spec.name} recreated {self.limits.max_recreates} times and still {why}")
    self.vm.say(f"{why}: deleting it to create it again ({self.recreates}/{self.limits.max_recreates})")
    self.vm.delete()
    self.started = False
    self.back_to_original()
    return AGAIN

  def absent(self, status: Status, now: float) -> str:
    """Absent or on its way (creating, queued for capacity, repairing, restarting): create it, or wait (bounded)."""
    first = self.since.setdefault("waiting", now)
    if now - first > self.limits.ready_timeout_s:
      raise LaunchError(f"TPU {self.vm.spec.name} is still not usable ({status.detail}) after "
                        f"{self.limits.ready_timeout_s / 3600:.1f} h; try another zone or --provisioning, or raise "
                        "--ready_timeout_s")
    if status.verdict is Verdict.ABSENT:
      if self.finished():
        return DONE
      self.started = False
      if self.vm.create():
        return AGAIN
    if self.fall_back(status, now - first):
      return AGAIN
    return LATER

  def fall_back(self, status: Status, waited: float) -> bool:
    """No capacity for this size for --fallback_after_s (refused, or waiting in the queue): delete what waits, and
    continue on the next size of --fallback_slices. The job is the same command: it resumes from the run's last
    checkpoint with the same global batch on the new shape (the trainer adapts grad_accum)."""
    vm, limits = self.vm, self.limits
    sizes = [vm.original.accelerator, *[a for a in limits.fallback_slices if a != vm.original.accelerator]]
    no_capacity = status.verdict is Verdict.ABSENT or status.detail in ("ACCEPTED", "WAITING_FOR_RESOURCES")
    if (limits.fallback_after_s is None or waited < limits.fallback_after_s or not no_capacity
        or vm.spec.accelerator not in sizes or sizes.index(vm.spec.accelerator) + 1 == len(sizes)):
      return False
    if vm.spec.queued:
      vm.delete()   # the request still waiting for the size it could not have
    old, new = vm.spec.accelerator, sizes[sizes.index(vm.spec.accelerator) + 1]
    self.change_size(new, f"no {old} for {waited / 60:.0f} min ({status.detail}): continuing the run on a {new} from "
                          "its last checkpoint, with the same global batch (--fallback_slices)")
    self.since.pop("waiting", None)
    return True

  def change_size(self, accelerator: str, line: str) -> None:
    """Ask for `accelerator` from now on; say `line` and record the change in the budgets' ledger."""
    old = self.vm.spec.accelerator
    self.vm.spec = dataclasses.replace(self.vm.spec, accelerator=accelerator)
    self.vm.say(line)
    for budget in self.budgets:
      budget.slices.append({"accelerator": accelerator, "instead_of": old, "why": line.split(": ", 1)[0]})
    self.vm.save_ledger()

  def back_to_original(self) -> None:
    """--prefer_original: at a restart after a fallback, ask for the stage's own size again."""
    original = self.vm.original.accelerator
    if self.limits.prefer_original and self.vm.spec.accelerator != original:
      self.change_size(original, f"restart: asking for the original {original} again (--prefer_original)")

  def broken(self, status: Status, now: float) -> str:
    """Preempted (counts against the preemption budgets), lost, or a failed queued resource: recreate it."""
    if self.finished():
      return DONE
    if status.verdict is Verdict.PREEMPTED:
      for budget in self.budgets:
        budget.preemptions += 1
      for budget in self.budgets:
        budget.check()
      self.vm.say(f"{status.detail}: preempted; deleting it to create it again")
      self.vm.delete()
      self.started = False
      self.back_to_original()
      return AGAIN
    spec = self.vm.spec
    if status.verdict is Verdict.FAILED and (spec.valid_until or not is_transient(status.detail)):
      raise LaunchError(f"queued resource {spec.name} {status.detail}"   # --valid_until: a deadline was asked for
                        + (f" (--valid_until={spec.valid_until})" if spec.valid_until else ""))
    return self.recreate(status.detail)

  def troubled(self, status: Status, now: float) -> str:
    """An unknown or unreadable state, or READY but unhealthy: wait for it to recover, for a bounded time."""
    unknown = status.verdict is Verdict.UNKNOWN
    bound = self.limits.unknown_timeout_s if unknown else self.limits.unhealthy_grace_s
    first = self.since.setdefault("unknown" if unknown else "unhealthy", now)
    if now - first >= bound:
      return self.recreate(f"{status.detail} for {(now - first) / 60:.0f} min")
    if first == now:
      self.vm.say(f"{status.detail}: waiting up to {bound / 60:.0f} min for it to recover")
    return LATER

  def usable(self, status: Status, now: float) -> str:
    """READY (every node) and not reported unhealthy: keep the job running here; ssh failing counts as ill health."""
    vm, job = self.vm, self.job
    if job is None:
      vm.say(f"READY ({vm.spec.accelerator}{f' × {vm.spec.slices}' if vm.spec.slices > 1 else ''}, "
             f"{vm.spec.hosts} hosts)")
      return DONE
    try:
      if not vm.alive(job):      # running already (a rerun of the launcher): adopt it, and leave its setup alone
        if job.done():
          vm.say(f"{job.name} is done")
          return DONE
        if self.started:
          self.restart()
        if not vm.set_up:
          vm.setup()
        vm.start(job)
      self.started = True
      self.since.pop("probe", None)
    except JobFailed:
      raise
    except LaunchError as error:   # READY, yet ssh fails: a host in maintenance, or preempted since the describe
      first = self.since.setdefault("probe", now)
      if now - first >= self.limits.unhealthy_grace_s:
        return self.recreate(f"unreachable over ssh for {(now - first) / 60:.0f} min ({error})")
      vm.say(f"ssh failed on a READY TPU ({error}); looking again in {self.limits.poll_s:.0f}s")
    return LATER

  def restart(self) -> None:
    """The job ran here and died: its own `error: ...` line ends the watch; anything else restarts it (bounded)."""
    vm, job = self.vm, self.job
    failure = [line for line in vm.logs(job).splitlines() if line.startswith("error: ")]
    if failure:
      raise JobFailed(f"{job.name} failed on {vm.spec.name}: {failure[-1][len('error: '):]}")
    self.restarts += 1
    if self.restarts > self.limits.max_restarts:
      raise JobFailed(f"{job.name} died {self.restarts} times on a healthy {vm.spec.name} without finishing "
                      f"(--max_restarts={self.limits.max_restarts}); its logs: "
                      f"{job.logs_to or 'python -m launch.tpu logs'}")
    vm.say(f"{job.name} died on a healthy TPU: restarting it there ({self.restarts}/{self.limits.max_restarts})")
