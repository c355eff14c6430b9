"""What every command-line tool shares: the --config/--set flags, process setup, errors printed as one line,
and a quiet console (library log lines to a file, see `quiet_console`)."""
from __future__ import annotations

import functools
import sys

from absl import flags

from tokenformer_jax.config import apply_overrides, load_config

CONFIG = flags.DEFINE_string("config", None, "An experiment: 'experiments/FILE.py:NAME'.")
OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Override a config field, e.g. --set optim.learning_rate=3e-4 --set data.seq_len=256 "
               "(repeatable; tuples take comma-separated values).")


def load_experiment():
  if not CONFIG.value:
    raise ValueError("--config is required, e.g. --config=experiments/demo.py:demo")
  return apply_overrides(load_config(CONFIG.value), OVERRIDES.value)

# One --seed for every tool that draws random numbers (one process may import several mains, e.g. the tests).
SEED = flags.DEFINE_integer("seed", 0, "Random seed: the new tokens and noise of cli.grow, the samples of "
                            "cli.generate.")


def setup_process() -> None:
  """Join the job's other processes (TPU workers, or launch.local's processes) before touching a device. Every
  main that runs on all workers of a slice (train, grow, eval) calls it first."""
  from tokenformer_jax import sharding
  sharding.initialize_distributed()


def one_line_errors(*error_types):
  """Wrap a main so that the expected errors end the process with one clear line and exit code 1."""
  def decorate(main):
    @functools.wraps(main)
    def wrapped(argv):
      try:
        return main(argv)
      except error_types as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    return wrapped
  return decorate


def quiet_console(log_dir=None, name: str | None = None) -> None:
  """Keep library log lines (absl, Orbax, JAX INFO and Python warnings) off the console: they are held in memory
  and go to LOG_DIR/NAME.log once `log_dir` is given here or later (`train.logger.attach_library_log`; the
  trainer does it in WORKDIR/logs). absl's --verbosity (or --v) given on the command line leaves them on stderr.
  """
  from tokenformer_jax.train import logger   # pylint: disable=g-import-not-at-top (keeps this module light)
  if logger.verbosity_requested():
    return
  logger.capture_library_logs()
  if log_dir is not None:
    logger.attach_library_log(log_dir, name)
