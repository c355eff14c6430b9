"""The command-line tools. Importing this package (every `python -m tokenformer_jax.cli.X` does, before X imports
JAX) keeps JAX off a TPU that is not there: see tokenformer_jax/accelerators.py."""
from tokenformer_jax import accelerators

accelerators.skip_absent_tpu()
