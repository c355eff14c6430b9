"""Tokenize a corpus once, into array_record files the pipeline reads without tokenizing (for TPU hosts).

  python -m tokenformer_jax.data.pretokenize --train_files='corpus/*.jsonl.gz' --tokenizer=bpe.model \\
      --output_dir=gs://bucket/tokens [--validation_files=... | --validation_fraction=0.05]

writes OUTPUT_DIR/train.tokens.array_record (and validation.tokens.array_record): the split's token stream,
exactly the one the in-memory pipeline builds ([eos] + doc + [eos] + ...), in records of CHUNK_TOKENS int32
ids (record 0 is a JSON header: token count, tokenizer fingerprint, special ids). Train on them with

  DataConfig(train_files=("OUT/train.tokens.array_record",),
             validation_files=("OUT/validation.tokens.array_record",), tokenizer="bpe.model")

The pipeline then reads windows by random access (any seq_len), batches and shuffles exactly as from text:
the same seed gives the same batches. The header's tokenizer fingerprint must match the tokenizer given.
Remote (gs://) files are copied to a local temporary directory first (array_record reads local files).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from etils import epath

from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import sources
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer

SUFFIX = ".tokens.array_record"
CHUNK_TOKENS = 8192
_FORMAT = "tokenformer_jax.tokens/1"


def is_pretokenized(patterns: Sequence[str]) -> bool:
  """True if every pattern names pre-tokenized files; DataError if they mix with text files."""
  flags = [p.endswith(SUFFIX) for p in patterns]
  if any(flags) and not all(flags):
    raise DataError(f"files {list(patterns)} mix pre-tokenized {SUFFIX} files with text files; "
                    "give one kind per split")
  return bool(flags) and all(flags)


def write_tokens(ids: np.ndarray, num_documents: int, tokenizer: Tokenizer, path: str, *,
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
  """Writes one split's stream to `path` (local or gs://) through a local temporary file."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  header = {"format": _FORMAT, "num_tokens": len(ids), "num_documents": int(num_documents),
            "chunk_tokens": chunk_tokens, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, target.name)
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    writer.write(json.dumps(header).encode("utf-8"))
    ids = np.asarray(ids, np.int32)
    for start in range(0, len(ids), chunk_tokens):
      writer.write(ids[start:start + chunk_tokens].tobytes())
    writer.close()
    epath.Path(local).copy(target, overwrite=True)


class ChunkedTokens:
  """Random-access view of a pre-tokenized stream: `len()` and `[a:b]` slices, as the pipeline needs."""

  def __init__(self, path: str, tokenizer: Tokenizer):
    import grain  # pylint: disable=g-import-not-at-top

    self.path = path
    local = _local_copy(path)
    try:
      self._source = grain.sources.ArrayRecordDataSource([local])
      header = json.loads(self._source[0].decode("utf-8"))
    except Exception as e:  # noqa: BLE001  (array_record raises RuntimeError or ValueError)
      raise DataError(f"{path}: not a pre-tokenized file ({type(e).__name__}); "
                      "make it with python -m tokenformer_jax.data.pretokenize") from None
    if header.get("format") != _FORMAT:
      raise DataError(f"{path}: not a pre-tokenized file (header {str(header)[:80]}); "
                      "make it with python -m tokenformer_jax.data.pretokenize")
    if header["tokenizer_fingerprint"] != tokenizer.fingerprint:
      raise DataError(f"{path} was tokenized with another tokenizer (fingerprint "
                      f"{header['tokenizer_fingerprint']}, the configured {tokenizer.path or 'tokenizer'} is "
                      f"{tokenizer.fingerprint}); set DataConfig.tokenizer to the one it was made with, or "
                      "pre-tokenize again")
    self.header = header
    self._chunk = header["chunk_tokens"]
    self._length = header["num_tokens"]

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, sl: slice) -> np.ndarray:
    if not isinstance(sl, slice) or sl.step not in (None, 1):
      raise TypeError("ChunkedTokens supports contiguous slices only")
    start, stop, _ = sl.indices(self._length)
    if stop <= start:
      return np.zeros(0, np.int32)
    first, last = start // self._chunk, (stop - 1) // self._chunk
    records = self._source.__getitems__([1 + c for c in range(first, last + 1)])
    ids = np.concatenate([np.frombuffer(r, np.int32) for r in records])
    offset = first * self._chunk
    return ids[start - offset: stop - offset]


def _local_copy(path: str) -> str:
  p = epath.Path(path)
  if not p.exists():
    raise DataError(f"pre-tokenized file {path} not found; check DataConfig.train_files / validation_files")
  if "://" not in path:
    return path
  local = os.path.join(tempfile.mkdtemp(prefix="tokens-"), p.name)
  p.copy(local)
  return local


def read_tokens(patterns: Sequence[str], tokenizer: Tokenizer, *, what: str) -> ChunkedTokens:
  files = sources.expand_patterns(patterns, what=what)
  if len(files) != 1:
    raise DataError(f"{what} must name exactly one {SUFFIX} file per split, got {len(files)}")
  return ChunkedTokens(str(files[0]), tokenizer)


def pretokenize(data: DataConfig, tokenizer: Tokenizer, output_dir: str, *, overwrite: bool = False,
                chunk_tokens: int = CHUNK_TOKENS) -> dict[str, str]:
  """Tokenizes the train and validation splits of `data`; returns {split: path} of the files written."""
  from tokenformer_jax.data.pipeline import tokenize_documents  # pylint: disable=g-import-not-at-top

  out = epath.Path(output_dir)
  paths = {split: str(out / f"{split}{SUFFIX}") for split in ("train", "validation")}
  for path in paths.values():
    if epath.Path(path).exists() and not overwrite:
      raise DataError(f"{path} already exists; pass overwrite=True (--overwrite) or another output dir")
  train_docs, validation_docs = sources.load_splits(data)
  written = {}
  for split, docs in (("train", train_docs), ("validation", validation_docs)):
    if docs:
      stream = tokenize_documents(docs, tokenizer)
      write_tokens(stream.ids, stream.num_documents, tokenizer, paths[split], chunk_tokens=chunk_tokens)
      written[split] = paths[split]
  return written


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  data = DataConfig(train_files=tuple(f.train_files or ()), validation_files=tuple(f.validation_files or ()),
                    validation_fraction=f.validation_fraction, text_field=f.text_field,
                    tfds_name=f.tfds_name, tfds_data_dir=f.tfds_data_dir, tokenizer=f.tokenizer)
  try:
    tokenizer = Tokenizer.load(f.tokenizer)
    written = pretokenize(data, tokenizer, f.output_dir, overwrite=f.overwrite)
  except DataError as e:
    raise SystemExit(f"error: {e}") from None
  for path in written.values():
    print(f"wrote {path}")
  settings = [f"{split}_files=({path!r},)" for split, path in written.items()]
  print(f"train with DataConfig({', '.join(settings)}, tokenizer={f.tokenizer!r})")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_list("train_files", None, "Globs of .jsonl/.jsonl.gz/.txt/.txt.gz files.")
  flags.DEFINE_list("validation_files", None, "Globs of validation files (default: hold out a fraction).")
  flags.DEFINE_float("validation_fraction", 0.05, "Fraction of documents held out when no validation files.")
  flags.DEFINE_string("text_field", "text", "The JSON field holding each document's text.")
  flags.DEFINE_string("tfds_name", "", "Read a TFDS dataset instead of files.")
  flags.DEFINE_string("tfds_data_dir", "", "Its data_dir.")
  flags.DEFINE_string("tokenizer", str(DataConfig().tokenizer), "SentencePiece .model to tokenize with.")
  flags.DEFINE_string("output_dir", None, "Directory to write {train,validation}.tokens.array_record into.")
  flags.DEFINE_boolean("overwrite", False, "Replace existing files.")
  flags.mark_flags_as_required(["output_dir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)
