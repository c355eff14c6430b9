"""lm-evaluation-harness with this package's model registered as "tokenformer_jax".

  python -m tokenformer_jax.cli.lm_eval --model tokenformer_jax --model_args checkpoint=runs/demo \
      --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande --batch_size 16
  tokenformer-lm-eval ...      # the same, as a console script (pip install -e '.[eval]')

Every argument is lm_eval's own (`lm_eval run --help`). lm_eval discovers models only through its registry,
which nothing outside lm_eval can add to before its command line runs (it has no plugin entry points), so this
main registers the model and then runs lm_eval's command line unchanged. lm_eval's own lines stay on the
console; the libraries' (absl, Orbax, JAX) go to a log file, said in one line, unless lm_eval's --verbosity
(e.g. --verbosity=INFO) is given.
"""
from __future__ import annotations

import sys

from absl import flags

from tokenformer_jax.cli.common import TEMP_LOGS, quiet_console, say_library_log


def verbosity_given(argv: list[str]) -> bool:
  return any(arg in ("-v", "--verbosity") or arg.startswith(("-v=", "--verbosity=")) for arg in argv)


def main() -> None:
  flags.FLAGS.mark_as_parsed()   # the command line is lm_eval's; absl's log handler writes once flags are parsed
  say_library_log(quiet_console(TEMP_LOGS, "lm_eval", shown=verbosity_given(sys.argv[1:])), "--verbosity=INFO")
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
