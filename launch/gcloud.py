"""Every gcloud command the launcher makes, as data: pure functions returning argv lists.

They follow gcloud's documented syntax (`gcloud compute tpus tpu-vm create|describe|ssh|delete`,
`gcloud compute tpus queued-resources create|describe|ssh|delete`, `gcloud compute tpus accelerator-types
describe`, `gcloud projects describe`, `gcloud storage ls|cp|cat|rm`), so a printed command is one you could
type. What runs on the workers is in worker.py.
"""
from __future__ import annotations

import dataclasses
import re

from tokenformer_jax import accelerators

RUNTIME_VERSION = "tpu-ubuntu2204-base"    # the TPU VM image for JAX on v4
PROVISIONING = ("on-demand", "spot", "reserved", "best-effort")
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
DURATION = re.compile(r"\d+[smhd]")        # gcloud's relative durations: 30m, 6h, 2d


def check_accelerator(accelerator: str) -> accelerators.V4Slice:
  """`v4-N` → its slice (chips, hosts: tokenformer_jax/accelerators.py's table, which the plan reads too); anything
  else raises ValueError naming the valid types."""
  return accelerators.v4_slice(accelerator)


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  """One TPU slice (or `slices` of them over DCN) and how to get it.

  queued: create it as a queued resource (waits for capacity instead of failing; the documented way to get spot
  capacity, and the only way to get several slices). Its node is named like the queued resource; with slices > 1
  the nodes are NAME-0 ... NAME-{slices-1} (`--node-prefix=NAME`).
  """
  name: str
  zone: str
  project: str
  accelerator: str
  runtime_version: str = RUNTIME_VERSION
  provisioning: str = "on-demand"     # on-demand | spot | reserved | best-effort (queued only)
  queued: bool = False
  slices: int = 1                     # > 1: multislice over DCN (queued only)
  valid_until: str | None = None      # queued only: give up waiting for capacity after this long (e.g. 6h)

  def __post_init__(self):
    if not self.project or not self.zone:
      raise ValueError("the tpu backend needs --project and --zone (e.g. --project=my-project --zone=us-central2-b)")
    if not NAME.fullmatch(self.name) or len(self.name) > 63 - 4 * (self.slices > 1):
      raise ValueError(f"TPU name {self.name!r} must be lowercase letters, digits and hyphens, start with a "
                       "letter and be at most 63 characters")
    check_accelerator(self.accelerator)
    if self.provisioning not in PROVISIONING:
      raise ValueError(f"--provisioning must be one of {', '.join(PROVISIONING)}, got {self.provisioning!r}")
    if self.provisioning == "best-effort" and not self.queued:
      raise ValueError("best-effort capacity exists only for queued resources: add --queued, or use "
                       "--provisioning=spot")
    if self.slices < 1 or (self.slices > 1 and not self.queued):
      raise ValueError(f"--slices={self.slices}: several slices (multislice) need queued resources (--queued)")
    if self.valid_until is not None and (not self.queued or not DURATION.fullmatch(self.valid_until)):
      raise ValueError(f"--valid_until={self.valid_until} needs --queued and a duration such as 30m, 6h or 2d")

  @property
  def hosts(self) -> int:
    return check_accelerator(self.accelerator).hosts * self.slices

  @property
  def chips(self) -> int:
    return check_accelerator(self.accelerator).chips * self.slices

  @property
  def nodes(self) -> list[str]:
    """The TPU VM nodes: one per slice."""
    return [self.name] if self.slices == 1 else [f"{self.name}-{i}" for i in range(self.slices)]

  @property
  def where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]


def _tpu_vm(verb: str, name: str, spec: TpuSpec, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, name, *spec.where, *rest]


def _queued(verb: str, spec: TpuSpec, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, spec.name, *spec.where, *rest]


_CAPACITY = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}


def create(spec: TpuSpec, startup_script: str | None = None) -> list[str]:
  """Create the TPU VM now (fails if there is no capacity), or queue a request for it. `startup_script` (a local
  file) becomes the VM's startup-script metadata: every worker runs it at every boot, so a recreated or rebooted VM
  sets itself up."""
  metadata = [f"--metadata-from-file=startup-script={startup_script}"] if startup_script else []
  if not spec.queued:
    return _tpu_vm("create", spec.name, spec, f"--accelerator-type={spec.accelerator}",
                   f"--version={spec.runtime_version}", *_CAPACITY[spec.provisioning], *metadata)
  nodes = [f"--node-id={spec.name}"] if spec.slices == 1 else [f"--node-count={spec.slices}",
                                                               f"--node-prefix={spec.name}"]
  valid = [f"--valid-until-duration={spec.valid_until}"] if spec.valid_until else []
  # --best-effort is only in gcloud's alpha track
  track = ["alpha"] if spec.provisioning == "best-effort" else []
  return ["gcloud", *track, "compute", "tpus", "queued-resources", "create", spec.name, *nodes, *spec.where,
          f"--accelerator-type={spec.accelerator}", f"--runtime-version={spec.runtime_version}",
          *_CAPACITY[spec.provisioning], *valid, *metadata]


def describe_node(spec: TpuSpec, node: str | None = None) -> list[str]:
  """The node's state and health as JSON: {"state": "READY", "health": "HEALTHY", "healthDescription": ...}
  (NOT_FOUND on stderr if there is none)."""
  return _tpu_vm("describe", node or spec.name, spec, "--format=json(state,health,healthDescription)")


def describe_queued(spec: TpuSpec) -> list[str]:
  """The queued resource's state as JSON: {"state": {"state": "FAILED", "failedData": {"error": {"message": ..}}}}."""
  return _queued("describe", spec, "--format=json(state)")


def delete(spec: TpuSpec) -> list[str]:
  if spec.queued:   # --force deletes the queued resource's TPU VMs with it
    return _queued("delete", spec, "--force", "--quiet")
  return _tpu_vm("delete", spec.name, spec, "--quiet")


def ssh(spec: TpuSpec, command: str, worker: str = "all") -> list[str]:
  """Run `command` on every worker (of every slice). --quiet: never stop at a prompt (a first ssh key is generated
  without a passphrase)."""
  if spec.slices > 1:
    return _queued("ssh", spec, "--node=all", f"--worker={worker}", f"--command={command}", "--quiet")
  return _tpu_vm("ssh", spec.name, spec, f"--worker={worker}", f"--command={command}", "--quiet")


# Preflight and storage -----------------------------------------------------------------------------------------
def describe_project(project: str) -> list[str]:
  return ["gcloud", "projects", "describe", project, "--format=value(projectId)"]


def describe_accelerator(spec: TpuSpec) -> list[str]:
  """Answers only if the zone exists, the project may use Cloud TPU there, and the zone offers this type."""
  return ["gcloud", "compute", "tpus", "accelerator-types", "describe", spec.accelerator, *spec.where,
          "--format=value(type)"]


def storage_ls(url: str) -> list[str]:
  """Lists an object; fails with "matched no objects" when it does not exist."""
  return ["gcloud", "storage", "ls", url]


def storage_cp(source: str, destination: str) -> list[str]:
  return ["gcloud", "storage", "cp", source, destination]


def storage_cat(url: str) -> list[str]:
  return ["gcloud", "storage", "cat", url]


def storage_rm(url: str) -> list[str]:
  return ["gcloud", "storage", "rm", url]
