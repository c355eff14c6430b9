"""Tests run on CPU; eight fake devices let sharding tests build real meshes."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Token stores the pipeline prepares from test corpora go to one temporary cache per session (shared with the
# CLI subprocesses), not ~/.cache.
if "TOKENFORMER_JAX_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["TOKENFORMER_JAX_CACHE"] = tempfile.mkdtemp(prefix="tokenformer-stores-")
  atexit.register(shutil.rmtree, os.environ["TOKENFORMER_JAX_CACHE"], ignore_errors=True)


import pytest  # noqa: E402  (after the environment above, which must precede any jax import)


@pytest.fixture(scope="session")
def trained_run_console(tmp_path_factory):
  """(workdir, finished process) of experiments/demo.py:test_run trained for its 12 steps, uninterrupted, by
  cli.train as a user runs it (its stdout and stderr are what the console showed)."""
  from helpers import TEST_RUN, losses, run_cli
  workdir = tmp_path_factory.mktemp("trained_run")
  result = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "validation loss" in result.stdout and "tensorboard --logdir" in result.stdout
  assert sorted(losses(workdir)) == list(range(1, 13))
  return workdir, result


@pytest.fixture(scope="session")
def trained_run(trained_run_console):
  """The workdir of that run (shared by several test files)."""
  return trained_run_console[0]


@pytest.fixture
def fast_compiles():
  """Smoke runs are all compile time: XLA's optimisations off, as long as the test runs."""
  import jax
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="session")
def elastic_run(tmp_path_factory):
  """(workdir, each job's result, the steps saved after each job) of helpers.JOB_RUN trained through the jobs of
  helpers.ELASTIC_JOBS, each resuming what the one before saved: 4 processes → 2 → 1 → 2 (killed) → 2. Shared by
  test_elastic.py (the same losses and windows as one uninterrupted job) and test_multiprocess.py (SIGTERM, a
  killed process, growth on 2 processes)."""
  from helpers import ELASTIC_JOBS, train_job
  workdir = tmp_path_factory.mktemp("elastic_run") / "run"
  results, saved = [], []
  for processes, devices, flags, fault, fault_process in ELASTIC_JOBS:
    results.append(train_job(workdir, processes, devices, *flags, fault=fault, fault_process=fault_process))
    saved.append(sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()))
  return workdir, results, saved


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: starts a subprocess, compiles for a TPU or trains a run; the inner loop "
                          "is `pytest -m 'not slow'`")
