"""Export a TokenFormer run as the authors' PyTorch checkpoint (GPT-NeoX format), for their evaluation code.

  python -m tokenformer_jax.cli.export_neox --checkpoint=runs/tokenformer-150m-more --dst=exported/150m-more

Writes `pytorch_model.bin` (a torch.save zip of float32 tensors named as in the released models; written
without torch, readable by `torch.load`) and `config.json` (the NeoX keys of the model's shape), and copies the
run's tokenizer along (`tokenizer.json`, or a SentencePiece `tokenizer.model`; config.json's tokenizer_type says
which). Storage padding rows are dropped (they are zero); a model the authors' code would compute differently
(a ladder model, q/k/v token counts that differ, a norm scale kept through growth) is refused with one line
saying why. An imported run exported unchanged reproduces every tensor exactly.
"""
from __future__ import annotations

from absl import app, flags

from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.cli import checkpoint_flags
from tokenformer_jax.cli.common import command
from tokenformer_jax.data import DataError
from tokenformer_jax.interop.convert import export_run
from tokenformer_jax.interop.torch_format import FormatError

DST = flags.DEFINE_string("dst", None, "Directory to write pytorch_model.bin and config.json to (new or empty).")
LIVE_SCALE = flags.DEFINE_bool("live_scale", False, "Export a model whose norm scale was kept through growth "
                               "anyway: the authors' code uses sqrt(live n), so its function then changes.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")


@command(CheckpointError, DataError, FormatError, log="export_neox")
def main(argv):
  run, step = checkpoint_flags.checkpoint()
  if not DST.value:
    raise ValueError("--dst is required: the directory to write the authors' files to")
  export_run(run, DST.value, step=step, live_scale=LIVE_SCALE.value, overwrite=OVERWRITE.value)


if __name__ == "__main__":
  app.run(main)
