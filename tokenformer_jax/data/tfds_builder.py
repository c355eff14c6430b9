"""Turn local (or gs://) .jsonl/.txt files into a TFDS dataset stored as array_record; no TensorFlow needed.

  python -m tokenformer_jax.data.tfds_builder --name=my_corpus --data_dir=/data/tfds \\
      --train_files='corpus/*.jsonl.gz' [--validation_files=... | --validation_fraction=0.05]

writes DATA_DIR/NAME/1.0.0/ with `train` (and `validation`) splits of {"id": text, "text": text}. Train on it
with `DataConfig(tfds_name="my_corpus", tfds_data_dir="/data/tfds")`: the pipeline reads it back with
`tfds.data_source` (random access over array_record), as it reads any TFDS dataset prepared in that format.
The split into train/validation is the one the file pipeline uses (`sources.load_splits`). The builder class is
made per dataset name and not registered, so reading needs only the files, not this code.
"""
from __future__ import annotations

import re
import types
from collections.abc import Sequence
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath

from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import sources
from tokenformer_jax.data.errors import DataError


class TextFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents given at construction → train/validation splits of {"id", "text"}. Use `build_tfds_dataset`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Documents from .jsonl/.txt files."}
  # No checksums file sits beside this code. Saying so also avoids a tfds 4.9.10 bug: for a builder defined
  # in an installed package, `code_path` imports the `importlib_resources` backport, which tfds only
  # declares as a dependency for Python < 3.9 (ModuleNotFoundError on 3.11 without it).
  code_path = None

  def __init__(self, *, train: Sequence[sources.Document] = (),
               validation: Sequence[sources.Document] = (), **kwargs):
    self._documents = {"train": list(train), "validation": list(validation)}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Text documents converted by tokenformer_jax.data.tfds_builder.",
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(docs) for split, docs in self._documents.items() if docs}

  def _generate_examples(self, documents):
    for index, doc in enumerate(documents):
      yield index, {"id": doc.key, "text": doc.text}


def builder_class(name: str) -> type[TextFilesBuilder]:
  """A TextFilesBuilder subclass whose TFDS name is `name` (unregistered: one per call is fine)."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise DataError(f"TFDS dataset name {name!r} must be snake_case (a-z, 0-9, _; starting with a letter)")
  return types.new_class(f"TextFiles_{name}", (TextFilesBuilder,), {"skip_registration": True},
                         lambda ns: ns.update(name=name, __module__=__name__))


def build_tfds_dataset(name: str, data_dir: str, train_files: Sequence[str], *,
                       validation_files: Sequence[str] = (), validation_fraction: float = 0.05,
                       text_field: str = "text", overwrite: bool = False) -> epath.Path:
  """Writes DATA_DIR/NAME/1.0.0 (array_record) from the files; returns that directory.

  Validation: the documents of `validation_files`, else `validation_fraction` of the train files held out
  by a stable hash of each document's id (no validation split when that is empty). Refuses to replace an
  existing dataset unless `overwrite=True`.
  """
  data = DataConfig(train_files=tuple(train_files), validation_files=tuple(validation_files),
                    validation_fraction=validation_fraction, text_field=text_field)
  train, validation = sources.load_splits(data)
  builder = builder_class(name)(train=train, validation=validation, data_dir=data_dir,
                                file_format="array_record")
  target = epath.Path(builder.data_dir)
  if target.exists() and not overwrite:
    raise DataError(f"TFDS dataset {name} already exists at {target}; pass overwrite=True (--overwrite) "
                    "to rebuild it")
  tfds.disable_progress_bar()
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return target


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  path = build_tfds_dataset(f.name, f.data_dir, f.train_files, validation_files=f.validation_files or (),
                            validation_fraction=f.validation_fraction, text_field=f.text_field,
                            overwrite=f.overwrite)
  splits = sources.tfds_builder(f.name, f.data_dir).info.splits
  counts = ", ".join(f"{split}: {info.num_examples} documents" for split, info in splits.items())
  print(f"wrote {path} ({counts}); train with DataConfig(tfds_name={f.name!r}, tfds_data_dir={f.data_dir!r})")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("name", None, "TFDS dataset name (snake_case).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write into (local or gs://).")
  flags.DEFINE_list("train_files", None, "Globs of .jsonl/.jsonl.gz/.txt/.txt.gz files.")
  flags.DEFINE_list("validation_files", None, "Globs of validation files (default: hold out a fraction).")
  flags.DEFINE_float("validation_fraction", 0.05, "Fraction of train documents held out when no validation files.")
  flags.DEFINE_string("text_field", "text", "The JSON field holding each document's text.")
  flags.DEFINE_boolean("overwrite", False, "Rebuild an existing dataset.")
  flags.mark_flags_as_required(["name", "data_dir", "train_files"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  from tokenformer_jax.cli.common import command  # pylint: disable=g-import-not-at-top (the shell of a main)
  _define_flags()
  app.run(command(DataError, log="tfds_builder")(main))
