"""Every gcloud command the launcher makes, as data: pure functions returning argv lists.

They follow gcloud's documented syntax (`gcloud compute tpus tpu-vm create|describe|ssh|scp|delete`,
`gcloud compute tpus queued-resources create|describe|delete`, `gcloud storage ls`), so a printed command
is one you could type. The scripts run on the workers are the same string on every worker: a worker's own
identity only enters through `$(hostname)` in its log file's name.
"""
from __future__ import annotations

import dataclasses
import re
import shlex

RUNTIME_VERSION = "tpu-ubuntu2204-base"    # the TPU VM image for JAX on v4
# v4 slice sizes (TensorCores) that Cloud TPU offers; a v4 host has 4 chips = 8 TensorCores.
V4_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096)
PROVISIONING = ("on-demand", "spot", "reserved", "best-effort")
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

# Where things live on every worker (home-relative, so the same path on every host).
ARCHIVE = "tokenformer_jax-src.tar.gz"
CODE = "$HOME/tokenformer"
VENV = "$HOME/tokenformer-venv"
LOGS = "$HOME/tokenformer-logs"


def check_accelerator(accelerator: str) -> int:
  """`v4-N` → N; anything else raises ValueError naming the valid types."""
  match = re.fullmatch(r"v4-(\d+)", accelerator)
  if not match or int(match.group(1)) not in V4_SIZES:
    raise ValueError(f"unknown accelerator type {accelerator!r}; TPU v4 slices are "
                     + ", ".join(f"v4-{n}" for n in V4_SIZES))
  return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  """One TPU VM (or queued resource of the same name) and how to get it."""
  name: str
  zone: str
  project: str
  accelerator: str
  runtime_version: str = RUNTIME_VERSION
  provisioning: str = "on-demand"     # on-demand | spot | reserved | best-effort (queued only)
  queued: bool = False                # create it as a queued resource (waits for capacity instead of failing)

  def __post_init__(self):
    if not self.project or not self.zone:
      raise ValueError("the tpu backend needs --project and --zone (e.g. --project=my-project --zone=us-central2-b)")
    if not NAME.fullmatch(self.name):
      raise ValueError(f"TPU name {self.name!r} must be lowercase letters, digits and hyphens, start with a "
                       "letter and be at most 63 characters")
    check_accelerator(self.accelerator)
    if self.provisioning not in PROVISIONING:
      raise ValueError(f"--provisioning must be one of {', '.join(PROVISIONING)}, got {self.provisioning!r}")
    if self.provisioning == "best-effort" and not self.queued:
      raise ValueError("best-effort capacity exists only for queued resources: add --queued, or use "
                       "--provisioning=spot")

  @property
  def hosts(self) -> int:
    return check_accelerator(self.accelerator) // 8

  @property
  def chips(self) -> int:
    return check_accelerator(self.accelerator) // 2

  @property
  def where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]


def _tpu_vm(verb: str, spec: TpuSpec, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, spec.name, *spec.where, *rest]


def create(spec: TpuSpec) -> list[str]:
  """Create the TPU VM now (fails if there is no capacity), or queue a request for it."""
  flag = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}
  if not spec.queued:
    return _tpu_vm("create", spec, f"--accelerator-type={spec.accelerator}", f"--version={spec.runtime_version}",
                   *flag[spec.provisioning])
  # --best-effort is only in gcloud's alpha track
  track = ["alpha"] if spec.provisioning == "best-effort" else []
  return ["gcloud", *track, "compute", "tpus", "queued-resources", "create", spec.name, f"--node-id={spec.name}",
          *spec.where, f"--accelerator-type={spec.accelerator}", f"--runtime-version={spec.runtime_version}",
          *flag[spec.provisioning]]


def describe_state(spec: TpuSpec) -> list[str]:
  """Prints the TPU VM's state: CREATING, READY, PREEMPTED, ... (NOT_FOUND on stderr if there is none)."""
  return _tpu_vm("describe", spec, "--format=value(state)")


def describe_queued_state(spec: TpuSpec) -> list[str]:
  """Prints the queued resource's state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ..."""
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", spec.name, *spec.where,
          "--format=value(state.state)"]


def delete(spec: TpuSpec) -> list[str]:
  if spec.queued:   # --force deletes the queued resource's TPU VM with it
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", spec.name, *spec.where, "--force", "--quiet"]
  return _tpu_vm("delete", spec, "--quiet")


# --quiet: never stop at a prompt (a first ssh key is generated without a passphrase)
def scp_to_all(spec: TpuSpec, local_path: str, remote_path: str = "") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_path, f"{spec.name}:{remote_path}", "--worker=all",
          *spec.where, "--quiet"]


def ssh(spec: TpuSpec, command: str, worker: str = "all") -> list[str]:
  return _tpu_vm("ssh", spec, f"--worker={worker}", f"--command={command}", "--quiet")


def storage_ls(url: str) -> list[str]:
  """Lists an object; fails with "matched no objects" when it does not exist."""
  return ["gcloud", "storage", "ls", url]


# Scripts run on every worker ---------------------------------------------------------------------------------
def setup_script(python: str = "python3.11") -> str:
  """Unpack the code, make a venv (installing `python` first if the image lacks it) and `pip install '.[tpu]'`."""
  install_python = (f"sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get -o DPkg::Lock::Timeout=600 "
                    f"install -y {python} {python}-venv")
  return "; ".join([
      "set -e",
      f"rm -rf {CODE} && mkdir -p {CODE} {LOGS} && tar -xzf $HOME/{ARCHIVE} -C {CODE}",
      f"command -v {python} >/dev/null || {{ {install_python}; }}",
      f"[ -x {VENV}/bin/python ] || {python} -m venv {VENV}",
      f"{VENV}/bin/pip install -q --upgrade pip",
      f'cd {CODE} && {VENV}/bin/pip install -q ".[tpu]"',
  ])


def _python(argv: list[str]) -> str:
  """argv → shell words, `python` meaning the venv's."""
  words = [f"{VENV}/bin/python" if argv[0] == "python" else shlex.quote(argv[0])]
  return " ".join(words + [shlex.quote(a) for a in argv[1:]])


def start_script(job: str, argv: list[str]) -> str:
  """Start argv detached (it outlives the ssh session), logging to LOGS/<job>.<host>.log, pid in LOGS/<job>.pid."""
  return (f"mkdir -p {LOGS} && cd {CODE} && nohup {_python(argv)} > {LOGS}/{job}.$(hostname).log 2>&1 "
          f"< /dev/null & echo $! > {LOGS}/{job}.pid")


def alive_script(job: str) -> str:
  """Prints `<job> ALIVE on <host>` or `<job> DEAD on <host>` on each worker (and always exits 0)."""
  return (f'if kill -0 "$(cat {LOGS}/{job}.pid 2>/dev/null)" 2>/dev/null; then echo "{job} ALIVE on $(hostname)"; '
          f'else echo "{job} DEAD on $(hostname)"; fi')


def tail_script(job: str, lines: int = 20) -> str:
  return f"tail -n {lines} {LOGS}/{job}.*.log"


def collect_script(job: str, destination: str) -> str:
  """Copy each worker's log of `job` to `destination` (a gs:// folder), from the worker itself."""
  return f"gcloud storage cp {LOGS}/{job}.*.log {destination.rstrip('/')}/"
