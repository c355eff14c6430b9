"""`--checkpoint=RUN[/STEP]`: a run (its latest checkpoint) or one of its checkpoints, the one spelling of every
tool that reads a run (eval, generate, grow, export_neox; lm_eval takes it as `--model_args checkpoint=RUN[/STEP]`).

cli.grow's and cli.export_neox's old spelling, `--src=RUN --step=N`, is still accepted, with one warning line
naming the new one. (cli.import_neox's --src, a directory of hub files, is that tool's own flag; it and the
tools here cannot share one process, as they could not before.) `--tokenizer` and `--json_out` of eval and
generate are in inference_flags.py.
"""
from __future__ import annotations

import sys

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The run: RUN (its latest checkpoint) or RUN/STEP (one of "
                                 "its checkpoints); RUN may also be its checkpoints/ directory.")
OLD_SRC = flags.DEFINE_string("src", None, "Old spelling of --checkpoint=RUN (accepted, with a warning).")
OLD_STEP = flags.DEFINE_string("step", None, "Old spelling of the /STEP of --checkpoint=RUN/STEP: a step number "
                               "or 'latest' (accepted, with a warning).")


def checkpoint() -> tuple[str, int | None]:
  """(RUN, STEP or None for its latest checkpoint) from --checkpoint, or from the old --src/--step (warned)."""
  if OLD_SRC.value is None and OLD_STEP.value is None:
    if not CHECKPOINT.value:
      raise ValueError("--checkpoint is required: a run directory (RUN) or one of its checkpoints (RUN/STEP)")
    from tokenformer_jax.inference.loading import parse_checkpoint   # (it imports JAX; this module stays light)
    return parse_checkpoint(CHECKPOINT.value)
  if CHECKPOINT.value:
    raise ValueError("--src/--step are the old spelling of --checkpoint=RUN/STEP; give --checkpoint alone")
  if not OLD_SRC.value:
    raise ValueError("--step needs its run: --checkpoint=RUN/STEP")
  step = OLD_STEP.value or "latest"
  if step != "latest" and not step.isdigit():
    raise ValueError(f"--step={step}: a step number or 'latest'")
  step = None if step == "latest" else int(step)
  old = " ".join(f"--{flag.name}={flag.value}" for flag in (OLD_SRC, OLD_STEP) if flag.value is not None)
  new = OLD_SRC.value.rstrip("/") + ("" if step is None else f"/{step}")
  print(f"warning: {old} is the old spelling of --checkpoint={new}", file=sys.stderr, flush=True)
  return OLD_SRC.value, step
