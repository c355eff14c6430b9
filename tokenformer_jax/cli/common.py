"""What every command-line tool shares: the --config/--set flags, and errors printed as one line."""
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
