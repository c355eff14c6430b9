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


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: starts a subprocess, compiles for a TPU or trains a run; the inner loop "
                          "is `pytest -m 'not slow'`")
