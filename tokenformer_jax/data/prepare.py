"""Tokenize a corpus once, with every core, into a token store (store.py) that every host reads by random access.

  python -m tokenformer_jax.data.prepare --store=gs://BUCKET/stores/owt --tfds_name=openwebtext \\
      --tfds_data_dir=gs://BUCKET/tensorflow_datasets --tokenizer=gs://BUCKET/tok.model
  python -m tokenformer_jax.data.prepare --store=/data/mystore --train_files='corpus/*.jsonl.gz' \\
      [--validation_files=... | --validation_fraction=0.05] [--tokenizer=...] [--shard_mb=256] [--workers=N]
  python -m tokenformer_jax.data.prepare --verify=STORE [--tokenizer=...]    # check sizes and checksums

then train with `--set data.store=STORE` (and the same data.tokenizer). The splits are exactly `load_splits`'s
(validation by document hash, as before), each stored as the pipeline's stream (see store.py), so a store gives
the same windows and batches as the documents it came from.

How it runs: documents stream from the source (files line by line, TFDS record by record) in chunks to a pool
of `--workers` processes (default: all cores) that tokenize; results come back in order, at most 4 chunks per
worker in flight, and are appended to the open shard of their split on disk (for gs://, to a local temporary
file uploaded whole when the shard closes). Memory is bounded by that, whatever the corpus size. A shard closes
after the document that brings it to `--shard_mb`; its .tokens and .docs are written whole by the one atomic
writer (tokenformer_jax.fileio: a temporary renamed into place, or one upload on gs://), then it is marked
finished by its .json (counts and checksums). The settings file (.prepare.json) is written first and says "an
unfinished store of mine"; manifest.json is written last and says "finished". The assignment of documents to
shards depends only on the inputs, so a preparation killed anywhere (at any write: tests/test_store.py kills it
at each) resumes after its finished shards when the same command is run again, and yields a byte-identical
store. A finished store is never overwritten.

Small corpora need no command: the pipeline prepares them into a cache directory keyed by the inputs'
fingerprint (`cached_store`), so the main job and the ladder read data the same way.

(Over 400 lines on purpose: the parallel pass, its resumable shards and the manifest that says which are done
are one idea (a killed prepare reruns to a byte-identical store) and are tested as one.)
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from tokenformer_jax import fileio
from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import sources, store
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer

SHARD_MB = 256
_CHUNK_DOCS = 256               # documents per tokenizer call
_CHUNK_BYTES = 4 << 20          # ... or fewer when they hold more text than this
_IN_FLIGHT_PER_WORKER = 4
_PROGRESS_SECONDS = 2.0
_SETTINGS = ".prepare.json"     # the preparation's settings (and hold_out's forced document), for resuming
_POOL_BYTES = 64 << 20          # cached (automatic) preparations use a pool only for inputs larger than this


# Tokenizing (in the worker processes, or in-process with workers=0) -------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
  _WORKER["tokenizer"], _WORKER["dtype"] = tokenizer, np.dtype(dtype)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Each text's ids followed by eos, concatenated, and the length of each (eos included)."""
  tokenizer, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
  encoded = tokenizer.encode_batch(texts)
  lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)
  flat = np.full(int(lengths.sum()), tokenizer.eos_id, dtype)
  ends = np.cumsum(lengths)
  for ids, end, length in zip(encoded, ends, lengths):
    flat[end - length:end - 1] = ids
  return flat, lengths


class _InProcess:
  """The pool's interface, tokenizing in this process (tests, small corpora)."""

  def __init__(self, tokenizer: Tokenizer, dtype: str):
    _init_worker(tokenizer, dtype)

  def apply_async(self, fn, args):
    result = fn(*args)
    return type("Done", (), {"get": lambda self: result})()

  def close(self):
    pass

  def terminate(self):
    pass


# Writing shards ---------------------------------------------------------------------------------------------
def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}"


class _ShardWriter:
  """The open shard of one split: appends documents, closes at `shard_tokens`, then marks it finished."""

  def __init__(self, location: store.Location, split: str, first_index: int, shard_tokens: int, dtype: np.dtype,
               on_finished):
    self.location, self.split, self.index = location, split, first_index
    self.shard_tokens, self.dtype, self.on_finished = shard_tokens, dtype, on_finished
    self._file = None

  def add(self, ids: np.ndarray) -> None:
    if self._file is None:
      self._name = shard_name(self.split, self.index)
      self._file = self.location.open_atomically(f"{self._name}.tokens")
      self._sha, self._ends, self._tokens = hashlib.sha256(), [], 0
    data = np.ascontiguousarray(ids, self.dtype).tobytes()
    self._file.write(data)
    self._sha.update(data)
    self._tokens += len(ids)
    self._ends.append(self._tokens)
    if self._tokens >= self.shard_tokens:
      self.finish()

  def finish(self) -> None:
    if self._file is None:
      return
    self._file.commit()
    self._file = None
    name = self._name
    docs = np.array(self._ends, store._DOC_DTYPE).tobytes()  # pylint: disable=protected-access
    self.location.write_atomically(f"{name}.docs", docs)
    info = {"name": name, "tokens": self._tokens, "documents": len(self._ends), "sha256": self._sha.hexdigest(),
            "docs_sha256": hashlib.sha256(docs).hexdigest()}
    self.location.write_atomically(f"{name}.json", json.dumps(info, sort_keys=True).encode())   # last: finished
    self.index += 1
    self.on_finished(self.split, info)

  def abandon(self) -> None:
    if self._file is not None:
      with contextlib.suppress(Exception):
        self._file.discard()
      self._file = None


def _finished_shards(location: store.Location, split: str, dtype: np.dtype) -> list[dict]:
  """The split's shards finished by an earlier, interrupted preparation: the leading run of valid ones."""
  finished = []
  while True:
    name = shard_name(split, len(finished))
    try:
      info = json.loads(location.read_bytes(f"{name}.json"))
      store.check_shard_size(location, name, info["tokens"], dtype, info["documents"])
    except (FileNotFoundError, DataError, ValueError, KeyError):
      return finished
    finished.append(info)


def _clear_unfinished(location: store.Location, keep: set[str]) -> None:
  """Removes temporaries (a killed write's) and any shard file not in `keep` (later than a gap, or half-written)."""
  for file in location.listdir():
    if file == _SETTINGS:
      continue
    if file.startswith(".") or file.split(".")[0] not in keep:
      location.remove(file)


def describe_source(data: DataConfig) -> dict:
  if data.tfds_name:
    return {"tfds_name": data.tfds_name, "tfds_data_dir": data.tfds_data_dir, "train_split": data.tfds_train_split,
            "validation_split": data.tfds_validation_split, "text_field": data.text_field,
            "validation_fraction": data.validation_fraction if not data.tfds_validation_split else None}
  return {"train_files": list(data.train_files), "validation_files": list(data.validation_files),
          "text_field": data.text_field,
          "validation_fraction": data.validation_fraction if not data.validation_files else None}


# The preparation ---------------------------------------------------------------------------------------------
class _Progress:
  def __init__(self, enabled: bool, split_progress: sources.SplitProgress):
    self.enabled, self.split_progress = enabled, split_progress
    self.start = self.last = time.monotonic()
    self.documents = self.tokens = 0

  def update(self, documents: int, tokens: int, force: bool = False) -> None:
    self.documents += documents
    self.tokens += tokens
    now = time.monotonic()
    if not self.enabled or (now - self.last < _PROGRESS_SECONDS and not force):
      return
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    done, total = self.split_progress.done[0], self.split_progress.total
    eta = ""
    if total and done:
      left = elapsed * (total - done) / done
      eta = (f", {done / total:6.1%} of the input, "
             f"ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")
    sys.stderr.write(f"\rprepare: {self.documents:,} documents ({self.documents / elapsed:,.0f}/s), "
                     f"{self.tokens / 1e6:,.1f}M tokens ({self.tokens / elapsed / 1e6:,.2f}M/s){eta}   ")
    if force:
      sys.stderr.write("\n")
    sys.stderr.flush()


def prepare(data: DataConfig, tokenizer: Tokenizer, store_path: str, *, shard_mb: float = SHARD_MB,
            shard_tokens: int = 0, workers: int | None = None, progress: bool = True,
            _stop_after_shards: int = -1) -> dict:
  """Tokenizes `data`'s train and validation splits into a store at `store_path`; returns its manifest.

  Resumes an unfinished store made with the same settings; refuses a finished one. `shard_tokens`, if given,
  overrides `shard_mb`. `workers`: tokenizer processes (None: all cores; 0: in this process).
  `_stop_after_shards` (tests) raises KeyboardInterrupt once that many shards are finished, as a kill would.
  """
  location = store.Location(store_path)
  if location.exists(store.MANIFEST):
    raise DataError(f"{location.name(store.MANIFEST)} exists: {location.path} is a finished token store and is "
                    "never overwritten; choose another --store, or delete it to prepare it again")
  if not 0.0 <= data.validation_fraction < 1.0:
    raise DataError(f"validation_fraction must be in [0, 1), got {data.validation_fraction}")
  dtype = store.store_dtype(tokenizer.vocab_size)
  shard_tokens = shard_tokens or max(int(shard_mb * (1 << 20)) // dtype.itemsize, 1)
  inputs = hashlib.sha256(repr(sources.fingerprint_inputs(data)).encode()).hexdigest()[:20]   # names, sizes, mtimes
  settings = {"format": store.FORMAT, "source": describe_source(data), "tokenizer_fingerprint": tokenizer.fingerprint,
              "dtype": dtype.str, "shard_tokens": shard_tokens, "inputs": inputs, "forced_validation_index": -1}
  if not location.exists(_SETTINGS):
    # Nothing but temporaries of the settings file: this preparation's own first write, killed before it landed.
    if any(not fileio.is_temporary(file, of=_SETTINGS) for file in location.listdir()):
      raise DataError(f"{location.path} is a directory that holds other files, not an unfinished token store; "
                      "choose a new or empty --store directory")
    for file in location.listdir():
      location.remove(file)
  location.makedirs()
  if location.exists(_SETTINGS):
    earlier = json.loads(location.read_bytes(_SETTINGS))
    if {k: v for k, v in earlier.items() if k != "forced_validation_index"} != {
        k: v for k, v in settings.items() if k != "forced_validation_index"}:
      raise DataError(f"{location.name(_SETTINGS)}: {location.path} holds an unfinished preparation of other inputs "
                      "or settings (or its files changed since); give the same ones to resume it, or choose another "
                      "--store")
    settings = earlier
  else:
    location.write_atomically(_SETTINGS, json.dumps(settings, sort_keys=True).encode())
  while True:
    manifest = _prepare_pass(data, tokenizer, location, settings, dtype, workers, progress, _stop_after_shards)
    if manifest is not None:
      return manifest
    # hold_out's rule: no hash fell below the fraction; the smallest-hash document is held out (again, from start)


def _prepare_pass(data, tokenizer, location, settings, dtype, workers, show_progress, stop_after) -> dict | None:
  """One pass of prepare over the documents not yet in a finished shard. (Over 60 lines on purpose: the workers,
  the shard writers and the manifest updates interleave, and read best in the order they happen.)"""
  finished = {split: _finished_shards(location, split, dtype) for split in store.SPLITS}
  _clear_unfinished(location, {info["name"] for shards in finished.values() for info in shards})
  skip = {split: sum(info["documents"] for info in shards) for split, shards in finished.items()}
  counter = {"shards": 0}

  def on_finished(split, info):
    finished[split].append(info)
    counter["shards"] += 1
    if stop_after >= 0 and counter["shards"] >= stop_after:
      raise KeyboardInterrupt(f"stopped after {stop_after} shards (test hook)")

  writers = {split: _ShardWriter(location, split, len(finished[split]), settings["shard_tokens"], dtype, on_finished)
             for split in store.SPLITS}
  split_progress = sources.SplitProgress()
  progress = _Progress(show_progress, split_progress)
  if workers is None:
    workers = os.cpu_count() or 1
  if workers > 0:
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer, dtype.str))
  else:
    pool = _InProcess(tokenizer, dtype.str)
  pending: collections.deque = collections.deque()
  max_pending = _IN_FLIGHT_PER_WORKER * max(workers, 1)
  seen = {split: 0 for split in store.SPLITS}

  def drain(limit: int) -> None:
    while len(pending) > limit:
      chunk_splits, result = pending.popleft()
      flat, lengths = result.get()
      ends = np.cumsum(lengths)
      for split, end, length in zip(chunk_splits, ends, lengths):
        writers[split].add(flat[end - length:end])
      progress.update(len(lengths), len(flat))

  chunk_texts, chunk_splits, chunk_bytes = [], [], 0
  try:
    for split, doc in sources.iter_splits(data, forced_index=settings["forced_validation_index"],
                                          progress=split_progress):
      seen[split] += 1
      if seen[split] <= skip[split]:
        continue
      chunk_texts.append(doc.text)
      chunk_splits.append(split)
      chunk_bytes += len(doc.text)
      if len(chunk_texts) >= _CHUNK_DOCS or chunk_bytes >= _CHUNK_BYTES:
        pending.append((chunk_splits, pool.apply_async(_encode_chunk, (chunk_texts,))))
        chunk_texts, chunk_splits, chunk_bytes = [], [], 0
        drain(max_pending)
    if chunk_texts:
      pending.append((chunk_splits, pool.apply_async(_encode_chunk, (chunk_texts,))))
    drain(0)
    for writer in writers.values():
      writer.finish()
  finally:
    for writer in writers.values():
      writer.abandon()
    pool.terminate()
  progress.update(0, 0, force=True)

  fraction = data.validation_fraction
  holding_out = not (data.validation_files if not data.tfds_name else data.tfds_validation_split)
  if holding_out and fraction > 0 and split_progress.held == 0 and split_progress.documents >= 2:
    if settings["forced_validation_index"] >= 0:
      raise DataError("internal: the forced validation document was not held out")
    # The train shards go before the settings say which document is held out: a kill in between reruns the
    # first pass (which decides the same), never keeps shards that hold that document.
    for info in finished["train"]:
      for suffix in (".json", ".tokens", ".docs"):
        location.remove(info["name"] + suffix)
    settings["forced_validation_index"] = split_progress.smallest[1]
    location.write_atomically(_SETTINGS, json.dumps(settings, sort_keys=True).encode())
    return None
  if holding_out and seen["train"] == 0 and split_progress.documents:
    raise DataError(f"validation_fraction={fraction} holds out all {split_progress.documents} documents; "
                    "lower it or give more documents")

  manifest = {"format": store.FORMAT, "dtype": dtype.str, "vocab_size": tokenizer.vocab_size,
              "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "tokenizer": tokenizer.path,
              "tokenizer_fingerprint": tokenizer.fingerprint, "source": settings["source"],
              "shard_tokens": settings["shard_tokens"], "splits": {}}
  for split in store.SPLITS:
    shards = finished[split]
    manifest["splits"][split] = {"tokens": sum(s["tokens"] for s in shards),
                                 "documents": sum(s["documents"] for s in shards), "shards": shards}
  location.write_atomically(store.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
  return manifest


# The cache for small corpora --------------------------------------------------------------------------------
def cache_root(data: DataConfig) -> str:
  """data.cache_dir, else $TOKENFORMER_JAX_CACHE, else beside remote inputs (a TFDS data_dir or the first train
  file's directory on gs://: one store that every host and every later run shares), else
  ~/.cache/tokenformer_jax/stores (local inputs: each host prepares its own copy).
  """
  if data.cache_dir or os.environ.get("TOKENFORMER_JAX_CACHE"):
    return data.cache_dir or os.environ["TOKENFORMER_JAX_CACHE"]
  if data.tfds_name and fileio.is_remote(data.tfds_data_dir):
    return f"{data.tfds_data_dir.rstrip('/')}/tokenformer_stores"
  if not data.tfds_name and data.train_files and fileio.is_remote(data.train_files[0]):
    first = str(sources.expand_patterns(data.train_files[:1])[0])
    return f"{first.rsplit('/', 1)[0]}/tokenformer_stores"
  return os.path.join(os.path.expanduser("~"), ".cache", "tokenformer_jax", "stores")


def cache_key(data: DataConfig, tokenizer: Tokenizer) -> str:
  """A hash of what the store's bytes depend on: the inputs (names, sizes, mtimes), the splitting, the tokenizer."""
  key = repr((store.FORMAT, sources.fingerprint_inputs(data), tokenizer.fingerprint))
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def cached_store(data: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                 wait_seconds: float = 6 * 3600) -> str:
  """The store of `data`'s files or TFDS dataset in the cache directory, prepared there if it is not yet.

  Local cache: whichever process takes the lock file first prepares, the others (on this host) wait for it;
  every host with its own disk prepares its own copy. Remote cache (gs://): process 0 prepares, the others poll
  for its manifest (or the error it left).
  """
  path = f"{cache_root(data).rstrip('/')}/{cache_key(data, tokenizer)}"
  location = store.Location(path)
  if location.exists(store.MANIFEST):
    return path
  if process_count == 1 and "jax" in sys.modules:   # a caller that did not say which process it is (cli/grow.py)
    jax = sys.modules["jax"]
    process_index, process_count = jax.process_index(), jax.process_count()
  size = 0 if data.tfds_name else sources.input_bytes(data.train_files)
  workers = None if size > _POOL_BYTES else 0
  if location.local:
    import fcntl  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(location.full("")) or ".", exist_ok=True)
    with open(location.full("").rstrip("/") + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not location.exists(store.MANIFEST):
        prepare(data, tokenizer, path, workers=workers, progress=workers is None)
    return path
  error = store.Location(f"{path}.error")
  if process_index == 0:
    if error.exists("message"):   # a failure of an earlier run; this one tries again
      error.remove("message")
    try:
      prepare(data, tokenizer, path, workers=workers, progress=workers is None)
    except DataError as e:
      error.makedirs()
      error.write_atomically("message", str(e).encode())
      raise
    return path
  deadline = time.monotonic() + wait_seconds
  while not location.exists(store.MANIFEST):
    if error.exists("message"):
      raise DataError(error.read_bytes("message").decode())
    if time.monotonic() > deadline:
      raise DataError(f"waited {wait_seconds:.0f} s for process 0 to prepare {path}; is it running?")
    time.sleep(2.0)
  return path


# Command line ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  tokenizer = Tokenizer.load(f.tokenizer)
  if f.verify:
    manifest = store.verify_store(f.verify, tokenizer)
    print(f"{f.verify}: ok ({_summary(manifest)})")
    return
  if not f.store:
    raise DataError("give --store=DIR (local or gs://) to prepare into, or --verify=STORE")
  if not f.train_files and not f.tfds_name:
    raise DataError("give --train_files=GLOBS or --tfds_name=NAME to read documents from")
  data = DataConfig(train_files=tuple(f.train_files or ()), validation_files=tuple(f.validation_files or ()),
                    validation_fraction=f.validation_fraction, text_field=f.text_field, tfds_name=f.tfds_name,
                    tfds_data_dir=f.tfds_data_dir, tfds_train_split=f.tfds_train_split,
                    tfds_validation_split=f.tfds_validation_split, tokenizer=f.tokenizer)
  started = time.monotonic()
  manifest = prepare(data, tokenizer, f.store, shard_mb=f.shard_mb, workers=f.workers)
  print(f"wrote {f.store} in {time.monotonic() - started:.1f} s ({_summary(manifest)})")
  print(f"train with --set data.store={f.store} --set data.tokenizer={f.tokenizer}")


def _summary(manifest: dict) -> str:
  return "; ".join(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['shards'])} "
                   f"shards" for split, info in manifest["splits"].items()) + f"; {np.dtype(manifest['dtype']).name}"


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("store", "", "Directory (local or gs://) to write the store into.")
  flags.DEFINE_string("verify", "", "Instead: check a finished store's shards against its manifest.")
  flags.DEFINE_list("train_files", None, "Globs of .jsonl/.jsonl.gz/.txt/.txt.gz files (local or gs://).")
  flags.DEFINE_list("validation_files", None, "Globs of validation files (default: hold out a fraction).")
  flags.DEFINE_float("validation_fraction", 0.05, "Fraction of documents held out (by hash) when no validation set.")
  flags.DEFINE_string("text_field", "text", "The JSON field (or TFDS feature) holding each document's text.")
  flags.DEFINE_string("tfds_name", "", "Read a TFDS dataset (array_record) instead of files.")
  flags.DEFINE_string("tfds_data_dir", "", "Its data_dir (local or gs://).")
  flags.DEFINE_string("tfds_train_split", "train", "TFDS split to train on.")
  flags.DEFINE_string("tfds_validation_split", "validation",
                      "TFDS validation split ('' to hold out --validation_fraction of the train split).")
  flags.DEFINE_string("tokenizer", str(DataConfig().tokenizer), "Tokenizer model to tokenize with.")
  flags.DEFINE_float("shard_mb", SHARD_MB, "Shard size in MB (a shard closes after the document that fills it).")
  flags.DEFINE_integer("workers", None, "Tokenizer processes (default: all cores; 0: in this process).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  from tokenformer_jax.cli.common import command  # pylint: disable=g-import-not-at-top (the shell of a main)
  _define_flags()
  app.run(command(DataError, log="prepare")(main))
