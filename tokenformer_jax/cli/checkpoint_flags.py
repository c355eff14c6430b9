"""Flags of the tools that use a trained run (eval, generate), defined once so both can live in one process."""
from __future__ import annotations

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The run: RUN (latest step) or RUN/STEP.")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "Another tokenizer than the run's (must match the model).")
JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the result here as JSON (for scripts).")


def require_checkpoint() -> str:
  if not CHECKPOINT.value:
    raise ValueError("--checkpoint is required: a run directory (RUN) or one of its steps (RUN/STEP)")
  return CHECKPOINT.value
