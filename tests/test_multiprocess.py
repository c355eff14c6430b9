"""Real multi-process jobs on this machine: launch.local starts N processes that join through JAX's distributed
runtime (CPU collectives over gloo), each with its own fake devices, as the hosts of a TPU slice do.

One workdir goes through a whole life (conftest's elastic_run: jobs of 4, 2, 1 and 2 processes; SIGTERM to one
process of 4 and of 2, a process killed outright, reruns): every process of a job stops at the same step, a killed
one stops the others, and test_elastic.py checks that the run ends where the uninterrupted 2-process run ends. The
grown checkpoint of that run, made on 2 processes over an existing destination, must equal growth done on one
device here.
"""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import JOB_STEPS, REPO, exit_codes, launch_local
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.config import load_config
from tokenformer_jax.growth import grow, grown_config, read_provenance
from tokenformer_jax.model import abstract_params

pytestmark = pytest.mark.slow   # every test here starts several processes

STEPS = JOB_STEPS


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


def test_sigterm_to_one_of_two_or_four_processes_stops_them_all_at_one_step(elastic_run):
  _, results, saved = elastic_run
  for result, processes, step in [(results[0], 4, 2), (results[1], 2, 4)]:   # SIGTERM to process 2, to process 1
    assert result.returncode == 0 and exit_codes(result) == {i: 0 for i in range(processes)}, result.stdout[-3000:]
    assert f"stopped by SIGTERM at step {step}" in result.stdout
  assert saved[:2] == [[2], [2, 4]]   # one checkpoint each, at the step they stopped


def test_a_killed_process_stops_the_others_without_a_launcher_kill(elastic_run):
  _, results, saved = elastic_run
  killed = results[3]
  codes = exit_codes(killed)
  assert codes[1] == 128 + 9 and codes[0] != 0 and killed.returncode != 0, killed.stdout[-3000:]
  assert "killing process" not in killed.stdout   # process 0 noticed on its own (heartbeats), well before 120 s
  assert saved[3] == saved[2]                      # nothing saved by the killed job; the next one resumed (elastic)


def test_grow_on_two_processes_overwrites_once_and_equals_growth_here(elastic_run, tmp_path):
  workdir = elastic_run[0]
  dst = tmp_path / "grown"
  (dst / "checkpoints" / "7").mkdir(parents=True)          # an older checkpoint there: --overwrite replaces it
  (dst / "checkpoints" / "7" / "stale").write_text("old")
  result = launch_local(2, 2, "-m", "tokenformer_jax.cli.grow", f"--src={workdir}", f"--step={STEPS}", "--init=random",
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
