"""lm-evaluation-harness with this package's model registered as "tokenformer_jax".

  python -m tokenformer_jax.cli.lm_eval --model tokenformer_jax --model_args checkpoint=runs/demo \
      --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande --batch_size 16
  tokenformer-lm-eval ...      # the same, as a console script (pip install -e '.[eval]')

Every argument is lm_eval's own (`lm_eval run --help`). lm_eval discovers models only through its registry,
which nothing outside lm_eval can add to before its command line runs (it has no plugin entry points), so this
main registers the model and then runs lm_eval's command line unchanged.
"""
from __future__ import annotations

import sys


def main() -> None:
  try:
    import tokenformer_jax.inference.lm_eval_adapter  # noqa: F401  (registers "tokenformer_jax")
    from lm_eval.__main__ import cli_evaluate
  except ImportError as error:
    print(f"error: lm-evaluation-harness is not importable ({error}); pip install -e '.[eval]'", file=sys.stderr)
    sys.exit(1)
  from tokenformer_jax.checkpoint import CheckpointError
  from tokenformer_jax.data import DataError
  try:
    cli_evaluate()
  except (CheckpointError, DataError) as error:   # a bad checkpoint or tokenizer: one line, as everywhere here
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
