"""Run one command as N processes of one JAX job on this machine: rehearse a multi-host run before paying for TPUs.

  python -m launch.local --processes=4 -- python -m tokenformer_jax.cli.train \
      --config=experiments/demo.py:test_run --workdir=runs/four

Each process gets the coordinator's address (a free port here), the process count and its own index
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, which `sharding.initialize_distributed` reads),
`--devices_per_process` fake CPU devices, and JAX's CPU collectives (gloo): together they form one job of
N × devices devices, exactly as the hosts of a TPU slice do. Their output is streamed with a `[i]` prefix.

A Python command (`python -m MODULE ...` or `python SCRIPT.py ...`) is started as a fork of the launcher, which
imported jax, flax, Orbax and grain once (tokenformer_jax.cli.tools.preload) before any of them touched a device:
each process then builds its own JAX runtime, as a fresh interpreter would, without paying 2-3 s of imports
(`--nofork`: fresh interpreters; any other command always gets one).

SIGTERM or Ctrl-C to the launcher is forwarded to every process as SIGTERM (the trainer saves and exits 0). When
a process fails, the others get `--grace_seconds` to notice on their own (a dead peer stops sending heartbeats;
after TOKENFORMER_HEARTBEAT_SECONDS = `--heartbeat_seconds` the JAX runtime ends them) and are then killed. The
launcher's exit code is 0 if every process exited 0, else the first failure's.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from tokenformer_jax.cli import tools
from tokenformer_jax.cli.common import one_line_errors

PROCESSES = flags.DEFINE_integer("processes", 2, "How many processes (hosts) the job has.")
DEVICES = flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices per process.")
PORT = flags.DEFINE_integer("port", 0, "The coordinator's port on 127.0.0.1 (0: a free one).")
HEARTBEAT = flags.DEFINE_integer("heartbeat_seconds", 10, "A process silent this long is dead; the others stop.")
GRACE = flags.DEFINE_float("grace_seconds", 60, "After a process fails, how long the others get to stop on "
                           "their own before they are killed.")
FORK = flags.DEFINE_bool("fork", True, "Start a Python command's processes as forks of this one, which imported "
                         "the libraries once (--nofork: a fresh interpreter each).")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(index: int, count: int, port: int, devices: int = 1, heartbeat: int | None = None,
              base: dict | None = None) -> dict[str, str]:
  """The environment of process `index` of `count`: what makes it join the others."""
  env = dict(os.environ if base is None else base)
  flags_ = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index),
             JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags_ + [f"--xla_force_host_platform_device_count={devices}"]),
             PYTHONUNBUFFERED="1")
  if heartbeat:
    env["TOKENFORMER_HEARTBEAT_SECONDS"] = str(heartbeat)
  return env


def exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode   # killed by signal n: 128 + n, as a shell says


class Job:
  """The N processes: started, streamed, signalled, waited for."""

  def __init__(self, command: list[str], processes: int, devices: int, port: int, heartbeat: int, out=sys.stdout,
               fork: bool = False):
    if command and command[0] in ("python", "python3"):
      command = [sys.executable, *command[1:]]   # the same interpreter (and virtual environment) as the launcher
    self.out, self.lock = out, threading.Lock()
    main = tools.forkable(command) if fork else None
    if main:
      os.environ["JAX_PLATFORMS"] = "cpu"   # what jax reads as it is imported: the children's (child_env)
      tools.preload()
    self.children, self.threads = [], []
    for i in range(processes):
      env = child_env(i, processes, port, devices, heartbeat)
      child = tools.Forked(main, env) if main else subprocess.Popen(
          command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
          start_new_session=True)
      self.children.append(child)
      self.say(f"launch.local: process {i} of {processes} is pid {child.pid}")
    for i, child in enumerate(self.children):   # after the forks: a child forked while a thread held a lock
      thread = threading.Thread(target=self._stream, args=(i, child), daemon=True)   # (stdout's) would hang on it
      thread.start()
      self.threads.append(thread)

  def say(self, line: str) -> None:
    with self.lock:
      print(line, file=self.out, flush=True)

  def _stream(self, index: int, child: subprocess.Popen) -> None:
    for line in child.stdout:
      self.say(f"[{index}] {line.rstrip()}")

  def signal_all(self, signum: int) -> None:
    for child in self.children:
      if child.poll() is None:
        child.send_signal(signum)

  def wait(self, grace: float) -> int:
    """Wait for every process; after the first failure give the rest `grace` seconds, then kill them."""
    failed_at, failure, reported = None, 0, set()
    while True:
      for i, child in enumerate(self.children):
        code = child.poll()
        if code is None or i in reported:
          continue
        reported.add(i)
        self.say(f"launch.local: process {i} exited with code {exit_code(code)}")
        if code != 0 and failed_at is None:
          failed_at, failure = time.monotonic(), exit_code(code)
          if len(reported) < len(self.children):
            self.say(f"launch.local: process {i} failed; the others have {grace:g} s to stop on their own")
      if len(reported) == len(self.children):
        break
      if failed_at is not None and time.monotonic() - failed_at > grace:
        for i, child in enumerate(self.children):
          if child.poll() is None:
            self.say(f"launch.local: killing process {i} (still running {grace:g} s after a failure)")
            child.kill()
      time.sleep(0.05)
    for thread in self.threads:
      thread.join(timeout=5)
    return failure


@one_line_errors(ValueError)   # not cli.common.command: this parent of a job's processes keeps no library log
def main(argv: list[str]) -> None:
  command = argv[1:]
  if not command:
    raise ValueError("no command; usage: python -m launch.local --processes=N -- python -m MODULE [flags]")
  if PROCESSES.value < 1 or DEVICES.value < 1:
    raise ValueError("--processes and --devices_per_process must be at least 1")
  port = PORT.value or free_port()
  job, stopped = None, []

  def forward(signum, frame):   # a SIGTERM or Ctrl-C that comes while the processes start is forwarded once they have
    stopped.append(signum)
    if job is not None:
      job.signal_all(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  job = Job(command, PROCESSES.value, DEVICES.value, port, HEARTBEAT.value, fork=FORK.value)
  if stopped:
    job.signal_all(signal.SIGTERM)
  sys.exit(job.wait(GRACE.value))


if __name__ == "__main__":
  app.run(main)
