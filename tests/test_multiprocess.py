"""Real multi-process jobs on this machine: launch.local starts N processes that join through JAX's distributed
runtime (CPU collectives over gloo), each with its own fake devices, as the hosts of a TPU slice do.

One 2-process workdir goes through a whole life (SIGTERM to one process, then SIGKILL of one, then a rerun)
and must end where the uninterrupted 1-process run with the same devices and global batch ends; the grown
checkpoint of that run, made on 2 processes over an existing destination, must equal growth done on one
device here. A 4-process job repeats the SIGTERM agreement and saves the same step-2 state.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, TEST_RUN, losses, run_cli
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.config import load_config
from tokenformer_jax.growth import grow, grown_config, read_provenance
from tokenformer_jax.model import abstract_params

pytestmark = pytest.mark.slow   # every test here starts several processes

STEPS = 4
RUN = (TEST_RUN, f"--set=steps={STEPS}", "--set=checkpoint_every=100", f"--set=eval_every={STEPS}",
       "--set=eval_batches=1", "--set=log_every=1")
FAULT = ("tests/train_with_fault.py",)
# 2 × 2 or 4 × 1 devices, the 1-process reference has 4: one mesh, one global batch. Not bitwise: the all-reduce
# of the gradients sums the devices' parts in another order across processes (gloo) than within one.
TOLERANCE = 1e-6


def launch(processes: int, *command: str, fault: int | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **({"FAULT_PROCESS": str(fault)} if fault is not None else {})}
  env.pop("XLA_FLAGS", None)
  argv = [sys.executable, "-m", "launch.local", f"--processes={processes}", f"--devices_per_process={4 // processes}",
          "--heartbeat_seconds=15", "--grace_seconds=120", "--", "python", *command]
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def exit_codes(result) -> dict[int, int]:
  codes = {}
  for line in result.stdout.splitlines():
    if line.startswith("launch.local: process ") and " exited with code " in line:
      codes[int(line.split()[2])] = int(line.rsplit(" ", 1)[1])
  return codes


def steps_saved(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def on_one_device(model):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params(model))


def params(workdir, step=None):
  model = load_config("experiments/demo.py:test_run").model
  if (pathlib.Path(workdir) / "checkpoints" / "0" / "extra").exists():
    model = read_provenance(workdir).new_model
  return jax.device_get(RunCheckpoints(workdir, read_only=True).restore_params(on_one_device(model), step))


def assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: one process, 4 devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  result = run_cli("tokenformer_jax.cli.train", *RUN, f"--workdir={workdir}", devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes: SIGTERM to process 1 before step 2, then SIGKILL of process 1 at its first step, then a rerun."""
  workdir = tmp_path_factory.mktemp("two_processes")
  stopped = launch(2, *FAULT, "SIGTERM", "2", *RUN, f"--workdir={workdir}", fault=1)
  killed_rerun = launch(2, *FAULT, "SIGKILL", "1", *RUN, f"--workdir={workdir}", fault=1)
  after_kill = steps_saved(workdir)
  finished = launch(2, "-m", "tokenformer_jax.cli.train", *RUN, f"--workdir={workdir}")
  return workdir, stopped, killed_rerun, after_kill, finished


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(two_process_run):
  _, stopped, _, after_kill, _ = two_process_run
  assert stopped.returncode == 0 and exit_codes(stopped) == {0: 0, 1: 0}, stopped.stdout[-3000:]
  assert "stopped by SIGTERM at step 2" in stopped.stdout
  assert after_kill == [2]   # the SIGTERM checkpoint, and nothing from the killed run


def test_a_killed_process_stops_the_others_without_a_launcher_kill(two_process_run):
  _, _, killed, _, _ = two_process_run
  codes = exit_codes(killed)
  assert codes[1] == 128 + 9 and codes[0] != 0 and killed.returncode != 0, killed.stdout[-3000:]
  assert "killing process" not in killed.stdout   # process 0 noticed on its own (heartbeats), well before 120 s


def test_two_processes_equal_one_through_sigterm_sigkill_and_rerun(reference, two_process_run):
  workdir, _, _, _, finished = two_process_run
  assert finished.returncode == 0 and exit_codes(finished) == {0: 0, 1: 0}, finished.stdout[-3000:]
  assert "resumed" in finished.stdout and steps_saved(workdir) == [2, STEPS]
  expected, got = losses(reference), losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=0, atol=TOLERANCE)
  assert_close(params(workdir, STEPS), params(reference, STEPS))


def test_grow_on_two_processes_overwrites_once_and_equals_growth_here(two_process_run, tmp_path):
  workdir = two_process_run[0]
  dst = tmp_path / "grown"
  (dst / "checkpoints" / "7").mkdir(parents=True)          # an older checkpoint there: --overwrite replaces it
  (dst / "checkpoints" / "7" / "stale").write_text("old")
  result = launch(2, "-m", "tokenformer_jax.cli.grow", f"--src={workdir}", f"--step={STEPS}", "--init=random",
                  "--seed=3", "--config=experiments/demo.py:test_run_grown", f"--dst={dst}", "--overwrite")
  assert result.returncode == 0 and exit_codes(result) == {0: 0, 1: 0}, result.stdout[-3000:]
  assert result.stdout.count("grew test_run") == 1
  assert steps_saved(dst) == [0] and sorted(p.name for p in tmp_path.iterdir()) == ["grown"]   # no leftovers
  provenance = read_provenance(dst)
  assert (provenance.source_step, provenance.init, provenance.seed) == (STEPS, "random", 3)
  old = load_config("experiments/demo.py:test_run").model
  new = grown_config(old, load_config("experiments/demo.py:test_run_grown").model)
  here = jax.jit(lambda p: grow(p, old, new, init="random", rng=jax.random.key(3)))(params(workdir, STEPS))
  assert provenance.new_model == new
  for x, y in zip(jax.tree.leaves(params(dst)), jax.tree.leaves(here), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_of_four_processes(reference, two_process_run, tmp_path):
  # (no rerun here, to save a 4-process job: the 2-process run above shows that a rerun continues exactly)
  stopped = launch(4, *FAULT, "SIGTERM", "2", *RUN, f"--workdir={tmp_path}", fault=2)
  assert stopped.returncode == 0 and exit_codes(stopped) == {i: 0 for i in range(4)}, stopped.stdout[-3000:]
  assert "stopped by SIGTERM at step 2" in stopped.stdout and steps_saved(tmp_path) == [2]
  expected, got = losses(reference), losses(tmp_path)
  np.testing.assert_allclose([got[1], got[2]], [expected[1], expected[2]], rtol=0, atol=TOLERANCE)
  assert_close(params(tmp_path, 2), params(two_process_run[0], 2))   # the 2-process job's SIGTERM checkpoint


# The launcher itself, with plain Python children (no JAX): fast --------------------------------------------------
CHILD = """
import os, signal, sys, time
i = os.environ["JAX_PROCESS_ID"]
signal.signal(signal.SIGTERM, lambda *_: (print("stopping", i, flush=True), sys.exit(0)))
print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], "at", os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)
if i == sys.argv[1]:
  sys.exit(3)
time.sleep(600)
"""


def test_the_launcher_streams_forwards_sigterm_and_kills_the_rest_after_a_failure():
  command = [sys.executable, "-m", "launch.local", "--processes=3", "--grace_seconds=0.5", "--", "python", "-c", CHILD]
  failed = subprocess.run(command + ["1"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert failed.returncode == 3, failed.stdout
  port = failed.stdout.split("at 127.0.0.1:")[1].split()[0]
  for i in range(3):
    assert f"[{i}] process {i} of 3 at 127.0.0.1:{port}" in failed.stdout
  assert exit_codes(failed)[1] == 3 and "killing process 0" in failed.stdout and "killing process 2" in failed.stdout

  launcher = subprocess.Popen(command + ["none"], cwd=REPO, stdout=subprocess.PIPE, text=True)
  seen = []
  while sum("] process " in line for line in seen) < 3:
    seen.append(launcher.stdout.readline())
  launcher.send_signal(signal.SIGTERM)   # as a TPU VM's preemption notice: every process gets it, and exits 0
  out = "".join(seen) + launcher.stdout.read()
  assert launcher.wait(timeout=60) == 0, out
  assert exit_codes(subprocess.CompletedProcess([], 0, out, "")) == {0: 0, 1: 0, 2: 0}
  assert all(f"[{i}] stopping {i}" in out for i in range(3))
