"""What every command-line tool shares: the --config/--set flags, process setup, errors printed as one line."""
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
