"""Documents from files (JSON lines, plain text; local or gs://) or a TFDS dataset, and the held-out split.

A document is `Document(key, text)`. `key` identifies it stably across runs and hosts: the JSON object's
"id" field when it has one, else "FILE_NAME:LINE" (JSON lines) or "FILE_NAME" (a .txt file is one
document), or "SPLIT:INDEX" for a TFDS record. The validation split held out by `validation_fraction` is
chosen from a hash of that key (BLAKE2b, not Python's per-process randomised `hash`), so every host and every
run agrees on it, and it does not change when files are listed in another order.

All reading goes through `etils.epath`, so `gs://bucket/dir/*.jsonl.gz` works wherever epath can reach GCS
(with `gcsfs` installed, or TensorFlow). Every problem with the input raises `DataError` with one line that
names the file (and line) and says what to do.

(Over 400 lines on purpose: every document source (files of each format, TFDS) and the held-out split share
the one key rule that makes the split agree across hosts and runs.)
"""
from __future__ import annotations

import glob as pyglob
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.data.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
_GLOB_CHARS = "*?["


class Document(NamedTuple):
  key: str
  text: str


# Files -------------------------------------------------------------------------------------------------
def _has_glob(text: str) -> bool:
  return any(c in text for c in _GLOB_CHARS)


def names_files(path: str) -> bool:
  """Whether `path` names corpus files (a glob, or a file of a supported suffix) rather than a directory."""
  return _has_glob(path) or path.endswith(SUPPORTED_SUFFIXES)


def expand_patterns(patterns: Sequence[str], *, what: str = "DataConfig.train_files") -> list[epath.Path]:
  """Files matching the globs, each pattern's matches sorted, duplicates dropped, directories skipped.

  Raises DataError if a pattern matches no file (or none is given).
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not patterns:
    raise DataError(f"no data files given: set {what} to one or more globs of .jsonl/.jsonl.gz/.txt files")
  seen: set[str] = set()
  files: list[epath.Path] = []
  for pattern in patterns:
    try:
      matches = [p for p in _glob(pattern) if not p.is_dir()]
    except ImportError as e:  # epath reaches gs:// through TensorFlow or fsspec + gcsfs
      raise DataError(f"cannot read {pattern!r}: {e}; `pip install gcsfs` to read gs:// paths") from None
    if not matches:
      raise DataError(f"no files match {pattern!r} (from {what}): check the path and glob "
                      f"(local paths are relative to {os.getcwd()})")
    for path in matches:
      if str(path) not in seen:
        seen.add(str(path))
        files.append(path)
  return files


def _glob(pattern: str) -> list[epath.Path]:
  if not _has_glob(pattern):
    path = epath.Path(pattern)
    return [path] if path.exists() else []
  if "**" in pattern:
    if fileio.is_remote(pattern):
      raise DataError(f"recursive '**' globs are not supported on remote storage ({pattern!r}): "
                      "use one '*' per directory level")
    return [epath.Path(p) for p in sorted(pyglob.glob(pattern, recursive=True))]
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if _has_glob(part))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  return sorted(epath.Path(base).glob("/".join(parts[first:])), key=str)


def _suffix(path: epath.Path) -> str:
  name = path.name.lower()
  for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
    if name.endswith(suffix):
      return suffix
  raise DataError(f"{path}: unsupported file type; data files must end in "
                  f"{', '.join(SUPPORTED_SUFFIXES)} (rename it or change the glob)")


def _utf8(raw: bytes, path: epath.Path, line: int | None = None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if line is None:
      line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                    "re-encode the file as UTF-8") from None


class _CountingReader:
  """A binary file that adds the bytes read from it to `counter[0]` (progress through compressed input)."""

  def __init__(self, f, counter: list[int]):
    self._f, self._counter = f, counter

  def read(self, size: int = -1) -> bytes:
    data = self._f.read(size)
    self._counter[0] += len(data)
    return data

  def readline(self, size: int = -1) -> bytes:
    data = self._f.readline(size)
    self._counter[0] += len(data)
    return data

  def __iter__(self):
    return iter(self.readline, b"")

  def __getattr__(self, name):
    return getattr(self._f, name)


def read_file(path: epath.Path | str, *, text_field: str = "text",
              bytes_read: list[int] | None = None) -> Iterator[Document]:
  """The documents of one file: one per JSON line (blank lines skipped), or the whole .txt file.

  `bytes_read[0]`, if given, grows by the bytes read from the file as it goes (for progress lines).
  """
  path = epath.Path(path)
  suffix = _suffix(path)
  try:
    with path.open("rb") as raw_file:
      if bytes_read is not None:
        raw_file = _CountingReader(raw_file, bytes_read)
      f = gzip.GzipFile(fileobj=raw_file, mode="rb") if suffix.endswith(".gz") else raw_file
      if suffix.startswith(".txt"):
        yield Document(path.name, _utf8(f.read(), path))
        return
      for line_number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        yield _json_document(_utf8(raw, path, line_number), path, line_number, text_field)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path}: not a readable gzip file ({e}); re-compress it or drop the .gz suffix") from None
  except FileNotFoundError:
    raise DataError(f"{path}: file not found (was it deleted while reading?)") from None


def _json_document(line: str, path: epath.Path, line_number: int, text_field: str) -> Document:
  where = f"{path}:{line_number}"
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line of a .jsonl file "
                    "must be one complete JSON object") from None
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object like {{{text_field!r}: ...}}, got {type(obj).__name__}")
  if text_field not in obj:
    keys = ", ".join(map(repr, list(obj)[:10])) or "none"
    raise DataError(f"{where}: the JSON object has no field {text_field!r} (its fields: {keys}); "
                    "set DataConfig.text_field to the field that holds the text")
  text = obj[text_field]
  if not isinstance(text, str):
    raise DataError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
                    "set DataConfig.text_field to the field that holds the text")
  key = obj.get("id")
  key = str(key) if isinstance(key, (str, int)) else f"{path.name}:{line_number}"
  return Document(key, text)


def read_documents(patterns: Sequence[str], *, text_field: str = "text",
                   what: str = "DataConfig.train_files") -> list[Document]:
  """Every non-empty document of the files matching `patterns`, in file then line order.

  Raises DataError if nothing matches, if a file is bad, or if the files hold no text at all.
  """
  return list(iter_documents(patterns, text_field=text_field, what=what))


def iter_documents(patterns: Sequence[str], *, text_field: str = "text", what: str = "DataConfig.train_files",
                   bytes_read: list[int] | None = None) -> Iterator[Document]:
  """`read_documents` as a stream: documents one at a time, in the same order, with the same errors

  (the "no text" one once every file has been read). `bytes_read` as in `read_file`.
  """
  files = expand_patterns(patterns, what=what)
  count = 0
  for path in files:
    for doc in read_file(path, text_field=text_field, bytes_read=bytes_read):
      if doc.text:
        count += 1
        yield doc
  if not count:
    shown = ", ".join(str(p) for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise DataError(f"no text in {shown} (every document is empty); point {what} at files with text")


def input_bytes(patterns: Sequence[str], *, what: str = "DataConfig.train_files") -> int:
  """The total size of the files matching `patterns` (what `bytes_read` counts up to)."""
  return sum(path.stat().length if fileio.is_remote(path) else os.path.getsize(path)
             for path in expand_patterns(patterns, what=what))


# TFDS --------------------------------------------------------------------------------------------------
def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import; only when used)
  return tfds


def tfds_builder(name: str, data_dir: str = ""):
  """The TFDS builder of `name` ("name", "name:version", "name/config"), read from `data_dir` if given."""
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # noqa: BLE001  (tfds raises DatasetNotFoundError, AssertionError, ...)
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"TFDS dataset {name!r} not found in data_dir={data_dir!r} ({first_line}); "
                    "prepare it first (e.g. python -m tokenformer_jax.data.tfds_builder) or fix "
                    "DataConfig.tfds_name / tfds_data_dir") from None


def tfds_split_names(name: str, data_dir: str = "") -> list[str]:
  return list(tfds_builder(name, data_dir).info.splits.keys())


def read_tfds_split(name: str, split: str, *, data_dir: str = "", text_field: str = "text") -> list[Document]:
  """Every non-empty document of one split of a prepared TFDS dataset, read with `tfds.data_source`

  (random access over array_record files: no TensorFlow needed). Text features arrive as bytes.
  """
  return list(iter_tfds_split(name, split, data_dir=data_dir, text_field=text_field))


def tfds_split_size(name: str, split: str, data_dir: str = "") -> int:
  """Records in one split (0 if the dataset has no such split)."""
  info = tfds_builder(name, data_dir).info.splits
  return info[split].num_examples if split in info else 0


def iter_tfds_split(name: str, split: str, *, data_dir: str = "", text_field: str = "text",
                    records_read: list[int] | None = None) -> Iterator[Document]:
  """`read_tfds_split` as a stream; `records_read[0]`, if given, counts the records read."""
  builder = tfds_builder(name, data_dir)
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise DataError(f"TFDS dataset {name!r} has no split {split!r} (it has: {', '.join(splits) or 'none'}); "
                    "set DataConfig.tfds_train_split / tfds_validation_split")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001  (tfds: NotImplementedError, ValueError, ... by file format)
    raise DataError(f"TFDS dataset {name!r} split {split!r} cannot be read as a data source ({e}); "
                    "it must be prepared with file_format='array_record'") from None
  for index in range(len(source)):
    if records_read is not None:
      records_read[0] += 1
    record = source[index]
    where = f"TFDS {name}[{split}][{index}]"
    if text_field not in record:
      raise DataError(f"{where}: no feature {text_field!r} (features: {', '.join(map(repr, record))}); "
                      "set DataConfig.text_field to the feature that holds the text")
    text = record[text_field]
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError:
        raise DataError(f"{where}: feature {text_field!r} is not valid UTF-8 text") from None
    if not isinstance(text, str):
      raise DataError(f"{where}: feature {text_field!r} is {type(text).__name__}, not text")
    key = record.get("id")
    key = key.decode("utf-8", "replace") if isinstance(key, bytes) else f"{split}:{index}"
    if text:
      yield Document(key, text)


# The held-out split ------------------------------------------------------------------------------------
def stable_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key` alone (BLAKE2b), the same on every host and in every run."""
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def hold_out(documents: Sequence[Document], fraction: float) -> tuple[list[Document], list[Document]]:
  """(train, validation): a document is held out when stable_fraction(key) < fraction.

  With fraction > 0 and at least two documents, at least one is held out (the one with the smallest hash),
  so a small corpus still has a validation split. Raises DataError if nothing would be left to train on.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"validation_fraction must be in [0, 1), got {fraction}")
  scores = [stable_fraction(doc.key) for doc in documents]
  held = [s < fraction for s in scores]
  if fraction > 0 and not any(held) and len(documents) >= 2:
    held[min(range(len(scores)), key=scores.__getitem__)] = True
  train = [d for d, h in zip(documents, held) if not h]
  validation = [d for d, h in zip(documents, held) if h]
  if not train:
    raise DataError(f"validation_fraction={fraction} holds out all {len(documents)} documents; "
                    "lower it or give more documents")
  return train, validation


def load_splits(data) -> tuple[list[Document], list[Document]]:
  """(train, validation) documents for a `DataConfig`.

  Files: `train_files`, and `validation_files` if given, else `validation_fraction` held out by hash.
  TFDS: `tfds_train_split`; `tfds_validation_split` if the dataset has it (or it is named and missing:
  an error), else `validation_fraction` held out of the train split when `tfds_validation_split` is "".
  """
  if data.tfds_name:
    train = read_tfds_split(data.tfds_name, data.tfds_train_split, data_dir=data.tfds_data_dir,
                            text_field=data.text_field)
    if not train:
      raise DataError(f"TFDS dataset {data.tfds_name!r} split {data.tfds_train_split!r} holds no text")
    if data.tfds_validation_split:
      validation = read_tfds_split(data.tfds_name, data.tfds_validation_split, data_dir=data.tfds_data_dir,
                                   text_field=data.text_field)
      return train, validation
    return hold_out(train, data.validation_fraction)
  train = read_documents(data.train_files, text_field=data.text_field, what="DataConfig.train_files")
  if data.validation_files:
    validation = read_documents(data.validation_files, text_field=data.text_field,
                                what="DataConfig.validation_files")
    return train, validation
  return hold_out(train, data.validation_fraction)


class SplitProgress:
  """What `iter_splits` has read so far: for progress lines and for `hold_out`'s smallest-hash rule."""

  def __init__(self):
    self.done = [0]          # bytes (files) or records (TFDS) read
    self.total = 0           # what `done` counts up to (0: unknown)
    self.documents = 0       # documents of the held-out stream seen (the hash decides their split)
    self.held = 0            # of those, held out
    self.smallest = (2.0, -1)   # (stable_fraction, index) of the document with the smallest hash


def iter_splits(data, *, forced_index: int = -1,
                progress: SplitProgress | None = None) -> Iterator[tuple[str, Document]]:
  """`load_splits(data)` as a stream of ("train" | "validation", document), each split in its order.

  With `validation_fraction` held out of one stream, a document goes to validation when its
  stable_fraction(key) < fraction, or when it is the `forced_index`-th document of that stream: hold_out's
  rule for a corpus where no hash falls below the fraction (the caller sees that at the end, in
  `progress.held == 0`, and streams again with forced_index=progress.smallest[1]).

  (Over 60 lines on purpose: the three source kinds and the split rule in one generator, the order a document
  goes through them.)
  """
  progress = progress or SplitProgress()
  fraction = data.validation_fraction
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"validation_fraction must be in [0, 1), got {fraction}")

  def held_out(documents):
    for index, doc in enumerate(documents):
      score = stable_fraction(doc.key)
      progress.documents += 1
      if score < progress.smallest[0]:
        progress.smallest = (score, index)
      held = score < fraction or index == forced_index
      progress.held += held
      yield ("validation" if held else "train"), doc

  if data.tfds_name:
    name, data_dir, field = data.tfds_name, data.tfds_data_dir, data.text_field
    splits = [data.tfds_train_split] + ([data.tfds_validation_split] if data.tfds_validation_split else [])
    available = tfds_split_names(name, data_dir)
    for split in splits:   # before reading anything
      if split not in available:
        raise DataError(f"TFDS dataset {name!r} has no split {split!r} (it has: {', '.join(available) or 'none'}); "
                        "set DataConfig.tfds_train_split / tfds_validation_split")
    progress.total = sum(tfds_split_size(name, split, data_dir) for split in splits)
    train = iter_tfds_split(name, data.tfds_train_split, data_dir=data_dir, text_field=field,
                            records_read=progress.done)
    if not data.tfds_validation_split:
      yield from held_out(train)
      if not progress.documents:
        raise DataError(f"TFDS dataset {name!r} split {data.tfds_train_split!r} holds no text")
      return
    count = 0
    for doc in train:
      count += 1
      yield "train", doc
    if not count:
      raise DataError(f"TFDS dataset {name!r} split {data.tfds_train_split!r} holds no text")
    for doc in iter_tfds_split(name, data.tfds_validation_split, data_dir=data_dir, text_field=field,
                               records_read=progress.done):
      yield "validation", doc
    return
  field = data.text_field
  progress.total = input_bytes(data.train_files, what="DataConfig.train_files")
  if data.validation_files:
    progress.total += input_bytes(data.validation_files, what="DataConfig.validation_files")
  train = iter_documents(data.train_files, text_field=field, what="DataConfig.train_files",
                         bytes_read=progress.done)
  if not data.validation_files:
    yield from held_out(train)
    return
  for doc in train:
    yield "train", doc
  for doc in iter_documents(data.validation_files, text_field=field, what="DataConfig.validation_files",
                            bytes_read=progress.done):
    yield "validation", doc


def fingerprint_inputs(data) -> tuple:
  """What identifies the documents `load_splits(data)` returns: file names, sizes and times, or the TFDS name."""
  fields = (data.text_field, data.validation_fraction)
  if data.tfds_name:
    return fields + (data.tfds_name, data.tfds_data_dir, data.tfds_train_split, data.tfds_validation_split)
  def stats(patterns, what):
    out = []
    for path in expand_patterns(patterns, what=what):
      if fileio.is_remote(path):
        st = path.stat()
        out.append((str(path), st.length, st.mtime))
      else:
        st = os.stat(path)
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)
  validation = stats(data.validation_files, "DataConfig.validation_files") if data.validation_files else ()
  return fields + (stats(data.train_files, "DataConfig.train_files"), validation)
