"""The flags of the tools that take an experiment: --config, --set, and the one --seed."""
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
