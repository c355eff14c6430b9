"""Evaluate a trained run on a corpus: loss, perplexity and bits per byte; an image classifier's run on its
images' test split (or --split=train): loss, top-1 and top-5.

  python -m tokenformer_jax.cli.eval --checkpoint=runs/demo                     # its validation split
  python -m tokenformer_jax.cli.eval --checkpoint=runs/demo/400 --files='my/*.jsonl.gz' --json_out=eval.json
  python -m tokenformer_jax.cli.eval --checkpoint=runs/demo --tfds_name=my_corpus --tfds_split=test \
      --tfds_data_dir=/data/tfds --max_tokens=1000000
  python -m tokenformer_jax.cli.eval --checkpoint=runs/demo --store=gs://bucket/stores/owt --split=validation

The corpus is tokenized and windowed exactly as in training (data.seq_len of the run, or --set data.seq_len=N)
and evaluated with the trainer's eval step, sharded over all devices (--set mesh.data=... to choose), so the run's
validation split gives the trainer's validation loss. Bits per byte = nats / (ln 2 × UTF-8 bytes of the text).
"""
from __future__ import annotations

import sys

from absl import app, flags

from tokenformer_jax import fileio
from tokenformer_jax.checkpoint import CheckpointError
from tokenformer_jax.cli import checkpoint_flags
from tokenformer_jax.cli.common import command
from tokenformer_jax.cli.config_flags import OVERRIDES
from tokenformer_jax.cli.inference_flags import JSON_OUT, TOKENIZER
from tokenformer_jax.data import DataError
from tokenformer_jax.inference import eval_stream, evaluate, evaluate_images, load_model

SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train"], "The split of --store, or of the run's "
                          "own data config when none of --files, --tfds_name, --store is given.")
FILES = flags.DEFINE_list("files", [], "Globs of .jsonl/.jsonl.gz/.txt files (local or gs://) to evaluate.")
TFDS_NAME = flags.DEFINE_string("tfds_name", "", "A prepared TFDS dataset (array_record) to evaluate.")
TFDS_SPLIT = flags.DEFINE_string("tfds_split", "validation", "Its split.")
TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "Its data_dir.")
STORE = flags.DEFINE_string("store", "", "A token store (python -m tokenformer_jax.data.prepare), local or gs://; "
                            "--split picks its split.")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Evaluate only the first windows covering this many "
                                  "tokens (default: the whole corpus).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Windows per step (default: the run's global_batch).")


def show_progress(result: dict) -> None:
  print(f"\reval {result['batches']}/{result['num_batches']} batches | {result['tokens'] / 1e3:.1f}k tokens | "
        f"loss {result['loss']:.4f} | {result['tokens_per_second'] / 1e3:.1f}k tok/s", end="", file=sys.stderr,
        flush=True)


@command(CheckpointError, DataError, log="eval")
def main(argv):
  if sum(map(bool, (FILES.value, TFDS_NAME.value, STORE.value))) > 1:
    raise ValueError("give one of --files, --tfds_name and --store")
  run, step = checkpoint_flags.checkpoint()
  model = load_model(run, step=step, overrides=OVERRIDES.value, tokenizer=TOKENIZER.value)
  if model.model.vision is not None:
    return evaluate_classifier(model)
  stream = eval_stream(model, split=SPLIT.value, files=FILES.value, tfds_name=TFDS_NAME.value,
                       tfds_split=TFDS_SPLIT.value, tfds_data_dir=TFDS_DATA_DIR.value, store=STORE.value)
  result = evaluate(model, stream, batch_size=BATCH_SIZE.value, max_tokens=MAX_TOKENS.value, progress=show_progress)
  print(file=sys.stderr)
  source = (", ".join(FILES.value) if FILES.value else f"TFDS {TFDS_NAME.value}[{TFDS_SPLIT.value}]"
            if TFDS_NAME.value else f"store {STORE.value} [{SPLIT.value}]" if STORE.value
            else f"the run's {SPLIT.value} split")
  result.update(checkpoint=model.path, step=model.step, model=model.model.name, data=source,
                seq_len=model.config.data.seq_len)
  print(f"{model.model.name} step {model.step} on {source}: loss {result['loss']:.4f} | perplexity "
        f"{result['perplexity']:.3f} | bits per byte {result['bits_per_byte']:.4f} | {result['tokens']} tokens, "
        f"{result['bytes']} bytes | {result['tokens_per_second'] / 1e3:.1f}k tok/s")
  if JSON_OUT.value:
    fileio.write_json(JSON_OUT.value, result)


def evaluate_classifier(model) -> None:
  """An image classifier's run: loss, top-1 and top-5 on its images' test split (--split=validation, the one its
  training evaluated) or its train split, unaugmented."""
  if FILES.value or TFDS_NAME.value or STORE.value or MAX_TOKENS.value is not None:
    raise ValueError(f"{model.model.name} is an image classifier, evaluated on its own images "
                     f"(data.image_source={model.config.data.image_source!r}); --files, --tfds_name, --store and "
                     "--max_tokens are for language runs")
  split = "test" if SPLIT.value == "validation" else SPLIT.value
  result = evaluate_images(model, split=split, batch_size=BATCH_SIZE.value)
  source = f"{model.config.data.image_source} {split} split"
  result.update(checkpoint=model.path, step=model.step, model=model.model.name, data=source)
  print(f"{model.model.name} step {model.step} on the {source}: loss {result['loss']:.4f} | top-1 "
        f"{result['top1']:.2%} | top-5 {result['top5']:.2%} | {result['examples']} images")
  if JSON_OUT.value:
    fileio.write_json(JSON_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
