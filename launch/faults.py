"""What the watch makes of a TPU's state and health, and the budgets that bound a stage and a ladder.

Every value of the TPU VM `state` and `health` enums and of the queued resource's `state.state` enum maps to one
`Verdict`; a value missing from these tables (a new enum value, unparseable output) is UNKNOWN, which the watch
waits on for a bounded time only (`--unknown_timeout_s`) before it recreates the TPU.
"""
from __future__ import annotations

import dataclasses
import enum
import json


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

  def check(self) -> None:
    if self.max_preemptions is not None and self.preemptions > self.max_preemptions:
      flag = "--max_ladder_preemptions" if self.what == "the ladder" else "--max_preemptions"
      raise BudgetExceeded(f"{self.what} was preempted {self.preemptions} times, over its budget of "
                           f"{flag}={self.max_preemptions}")
    if self.max_tpu_hours is not None and self.tpu_hours > self.max_tpu_hours:
      flag = "--max_ladder_tpu_hours" if self.what == "the ladder" else "--max_tpu_hours"
      raise BudgetExceeded(f"{self.what} used {self.tpu_hours:,.1f} TPU chip-hours, over its budget of "
                           f"{flag}={self.max_tpu_hours:g}")
