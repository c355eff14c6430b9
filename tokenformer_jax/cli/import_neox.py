"""Import one of the authors' PyTorch TokenFormer checkpoints (GPT-NeoX format) as a run directory here.

  python -m tokenformer_jax.cli.import_neox --src=TokenFormer-150M --dst=runs/tokenformer-150m

--src is a directory laid out as on the hub: `pytorch_model.bin` (or `model.safetensors`), `config.json` and the
tokenizer (`tokenizer.json` or a SentencePiece `tokenizer.model`; where --src has none, --tokenizer=PATH names it,
e.g. GPT-NeoX-20B's tokenizer.json for the released models). torch is not needed: the file is read with a
restricted unpickler and numpy, one tensor at a time (peak memory about the model's size). The result is a
params-only Orbax checkpoint at step 0 with its TrainConfig (the tokenizer copied beside it), which `cli.train
--init_from`, `cli.grow` and the evaluation tools accept. Every tensor of the file is used exactly once; a
missing, extra or misshapen tensor, or a config key this model cannot honour, ends with one line naming it, and
nothing is written.
"""
from __future__ import annotations

import os

# On CPU the parameters are spread over 8 host "devices" so that Orbax writes them in pieces, not whole
# leaves (peak memory; see interop/neox.py load_params). The flag only affects the CPU platform.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

from absl import app, flags  # noqa: E402  (after XLA_FLAGS, before anything imports jax)

from tokenformer_jax.checkpoint import CheckpointError  # noqa: E402
from tokenformer_jax.cli.common import command  # noqa: E402
from tokenformer_jax.data import DataError  # noqa: E402
from tokenformer_jax.interop.convert import import_checkpoint  # noqa: E402
from tokenformer_jax.interop.torch_format import FormatError  # noqa: E402

SRC = flags.DEFINE_string("src", None, "Directory with pytorch_model.bin (or model.safetensors), config.json "
                          "and tokenizer.json, as downloaded from the hub.")
DST = flags.DEFINE_string("dst", None, "The run directory to create (new or empty).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "The model's tokenizer (a tokenizer.json or SentencePiece "
                                "model) when --src has none.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "The vocabulary size the tokenizer must have (a check).")
NAME = flags.DEFINE_string("name", None, "The model's name in its config (default: the --src directory's name).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")


@command(CheckpointError, DataError, FormatError, log="import_neox")
def main(argv):
  if not SRC.value or not DST.value:
    raise ValueError("--src and --dst are required")
  train_cfg = import_checkpoint(SRC.value, DST.value, tokenizer=TOKENIZER.value, vocab_size=VOCAB_SIZE.value,
                                name=NAME.value, overwrite=OVERWRITE.value)
  print(f"next: python -m tokenformer_jax.cli.train --config=CONFIG --set data.tokenizer={train_cfg.data.tokenizer} "
        f"--workdir=RUN --init_from={DST.value}   (CONFIG of the same shape, e.g. experiments/paper.py:pile_150m "
        f"for TokenFormer-150M), or grow it: python -m tokenformer_jax.cli.grow --checkpoint={DST.value} ...")


if __name__ == "__main__":
  app.run(main)
