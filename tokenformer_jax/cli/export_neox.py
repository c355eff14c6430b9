"""Export a TokenFormer run as the authors' PyTorch checkpoint (GPT-NeoX format), for their evaluation code.

  python -m tokenformer_jax.cli.export_neox --src=runs/tokenformer-150m-more --dst=exported/150m-more

Writes `pytorch_model.bin` (a torch.save zip of float32 tensors named as in the released models; written
without torch, readable by `torch.load`) and `config.json` (the NeoX keys of the model's shape), and copies a
`tokenizer.json` tokenizer along. Storage padding rows are dropped (they are zero); a model the authors' code
would compute differently (a ladder model, q/k/v token counts that differ, a norm scale kept through growth)
is refused with one line saying why. An imported run exported unchanged reproduces every tensor exactly.
"""
from __future__ import annotations

from absl import app, flags

from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.cli.common import one_line_errors
from tokenformer_jax.data import DataError
from tokenformer_jax.interop.convert import export_run
from tokenformer_jax.interop.torch_format import FormatError

SRC = flags.DEFINE_string("src", None, "The run (its directory, or its checkpoints/ directory).")
STEP = flags.DEFINE_string("step", "latest", "Which checkpoint of --src: a step number or 'latest'.")
DST = flags.DEFINE_string("dst", None, "Directory to write pytorch_model.bin and config.json to (new or empty).")
LIVE_SCALE = flags.DEFINE_bool("live_scale", False, "Export a model whose norm scale was kept through growth "
                               "anyway: the authors' code uses sqrt(live n), so its function then changes.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")


@one_line_errors(ValueError, FileNotFoundError, CheckpointError, DataError, FormatError)
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not SRC.value or not DST.value:
    raise ValueError("--src and --dst are required")
  export_run(SRC.value, DST.value, step=None if STEP.value == "latest" else int(STEP.value),
             live_scale=LIVE_SCALE.value, overwrite=OVERWRITE.value)


if __name__ == "__main__":
  app.run(main)
