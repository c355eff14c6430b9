"""Train a TokenFormer (or resume one; or start from another run's parameters).

  python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/demo
  python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/mine \
      --set data.train_files=my/*.jsonl.gz --set steps=5000

Rerunning the same command continues from the latest checkpoint in --workdir.
"""
from absl import app, flags

from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.cli.common import SET_HINT, command
from tokenformer_jax.cli.config_flags import load_experiment
from tokenformer_jax.data import DataError
from tokenformer_jax.train.loop import TrainingError, train

WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard logs, metrics.jsonl.")
INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from the parameters of this checkpoint (a run directory, e.g. a grown one) with a "
                       "fresh optimizer and schedule (a checkpoint grown with --optimizer=carry: with its AdamW "
                       "moments, the schedule still fresh). Ignored when --workdir already has a checkpoint.")


@command(TrainingError, CheckpointError, DataError, distributed=True, hint=SET_HINT)
def main(argv):   # library lines go to WORKDIR/logs/train.log once the run has started
  if not WORKDIR.value:
    raise ValueError("--workdir is required: where checkpoints and logs go")
  train(load_experiment(), WORKDIR.value, init_from=INIT_FROM.value)


if __name__ == "__main__":
  app.run(main)
