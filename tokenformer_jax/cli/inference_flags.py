"""Flags of the tools that use a trained model (eval, generate), defined once so both can live in one process."""
from __future__ import annotations

from absl import flags

TOKENIZER = flags.DEFINE_string("tokenizer", None, "Another tokenizer than the run's (must match the model).")
JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the result here as JSON (for scripts).")
