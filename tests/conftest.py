"""Tests run on CPU; eight fake devices let sharding tests build real meshes."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The 8 devices' in-process collectives wait for each other; on 2 loaded cores a device thread can be starved for
# a while, so XLA waits 5 minutes before it calls a collective stuck and aborts (a real deadlock, such as several
# independent collective programs in flight at once, still ends the run instead of hanging it).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (" --xla_force_host_platform_device_count=8"
                                                             " --xla_cpu_collective_call_terminate_timeout_seconds=300")
# Token stores the pipeline prepares from test corpora go to one temporary cache per session (shared with the
# CLI subprocesses), not ~/.cache.
if "TOKENFORMER_JAX_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["TOKENFORMER_JAX_CACHE"] = tempfile.mkdtemp(prefix="tokenformer-stores-")
  atexit.register(shutil.rmtree, os.environ["TOKENFORMER_JAX_CACHE"], ignore_errors=True)
# One JAX compilation cache for the session, there too: the suite compiles the same small programs (a run's train
# and eval steps) in many processes, and a program compiled once is read back by every later process (a CLI test's
# train step: 15 s of CPU → 5 s). Every program is kept, not only those over JAX's 1 s threshold: the small test
# models' steps compile in under a second each, and there are many (cli.train of test_run: 11.6 s → 6.9 s with the
# threshold, → 5.0 s without it; the same losses, bitwise). (`pytest -n 2`'s workers are started with the
# environment above, so they share both.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["TOKENFORMER_JAX_CACHE"], "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is compile-bound (small programs, run a few steps), in this process and in every one it starts: jax
# compiles at XLA:CPU's LLVM -O0, without its expensive passes (jax_disable_most_optimizations; a flag of each
# program's compile options, so its own cache key). The rare test that trains hundreds of steps takes the
# `optimized_compiles` fixture (test_learning: 39 s of CPU at the defaults, 74 at -O0, measured side by side).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


import pytest  # noqa: E402  (after the environment above, which must precede any jax import)


@pytest.fixture(scope="session")
def trained_run_console(tmp_path_factory):
  """(workdir, finished process) of experiments/demo.py:test_run trained for its 12 steps, uninterrupted, by
  cli.train as a user runs it (its stdout and stderr are what the console showed), with two evaluations during
  training (eval.tasks: a local lm_eval task, a held-out text's perplexity) that test_inference.py checks, and
  an offline W&B run that test_train.py reads back."""
  from helpers import TEST_RUN, TRAINED_RUN_SETS, WANDB_OFFLINE, losses, run_cli
  workdir = tmp_path_factory.mktemp("trained_run")
  result = run_cli("tokenformer_jax.cli.train", TEST_RUN, f"--workdir={workdir}", *TRAINED_RUN_SETS,
                   *WANDB_OFFLINE)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "validation loss" in result.stdout and "tensorboard --logdir" in result.stdout
  assert sorted(losses(workdir)) == list(range(1, 13))
  return workdir, result


@pytest.fixture(scope="session")
def trained_run(trained_run_console):
  """The workdir of that run (shared by several test files)."""
  return trained_run_console[0]


@pytest.fixture
def optimized_compiles():
  """XLA's optimisations back on, as long as the test runs: for a test that trains hundreds of steps (the rest of
  the suite compiles at -O0, above)."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


# The files whose tests each take over a minute (long runs of several processes, whole ladders and studies in
# miniature): `-n 2` starts them first, so that they run beside the rest instead of forming a tail. A new test over
# a minute puts its file here.
LONGEST_FIRST = ("test_launch.py", "test_multiprocess.py", "test_report.py", "test_parity.py", "test_train.py",
                 "test_pattention_pallas.py", "test_vision.py", "test_goodput.py", "test_fast_tier.py",
                 "test_imagenet.py")


def pytest_collection_modifyitems(items):
  """The order of the files (their tests keep theirs): LONGEST_FIRST, then the other files with slow tests, then
  the rest."""
  slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST) + (name not in slow_files)
  items.sort(key=rank)


def pytest_configure(config):
  # `pytest -n 2` (pytest-xdist) sends whole files to a worker, in the order above: a file's module-scoped runs are
  # then built once, on one worker (xdist's default sends single tests, ordered by nothing).
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist, config.option.loadscopereorder = "loadfile", False
  config.addinivalue_line("markers", "slow: starts a subprocess, compiles for a TPU or trains a run; the inner loop "
                          "is `pytest -m 'not slow'`")
