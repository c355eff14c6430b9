"""The token store: a corpus tokenized once into shards of raw ids, read by random access (`prepare.py` writes it).

Layout of a store directory (local, or any fsspec URL: gs://, memory://, ...):

  manifest.json             written last: a store without it is unfinished (`prepare` resumes it)
  train-00000.tokens        raw little-endian uint16 ids (uint32 when the vocabulary exceeds 65,536)
  train-00000.docs          int64: each document's end offset in the shard (its closing eos included)
  train-00000.json          the shard's counts and sha256 checksums (written after the two files: "finished")
  ...
  validation-00000.tokens   ... the same for the validation split

A split is the stream the pipeline windows (see pipeline.py), `[eos] + doc_1 + [eos] + ... + doc_n + [eos]`:
the shards hold `doc + [eos]` for each document in order, and the leading eos is implied (an empty split is an
empty stream). `SplitTokens` gives `len()` and `[a:b]` int32 slices of that stream, reading only the shards the
slice touches:

* local stores by `os.pread` from each shard (opened on first use; `TOKENFORMER_JAX_STORE_READ=memmap` maps
  them with np.memmap instead): nothing is loaded up front, start-up is a manifest read and one `stat` per shard,
  and resident memory does not grow with what is read (mapped pages would: see LOCAL_READ);
* remote stores through fsspec ranged reads (`cat_file(path, start, end)`: one request per shard a window
  touches, ~2 KB for a 1024-token window): no local disk, nothing copied first, memory flat. Latency (tens of
  ms per request on GCS) is hidden by grain's reader threads; see the README's data section for the figures.

Opening checks what costs nothing at any size: the manifest's format, tokenizer fingerprint, counts that add
up, and each shard's size (a missing or truncated shard is a one-line DataError naming it). Checksums are
verified by `verify_store` (`python -m tokenformer_jax.data.prepare --verify=STORE`), which reads everything.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading

import numpy as np

from tokenformer_jax import fileio
from tokenformer_jax.data.errors import DataError

FORMAT = "tokenformer_jax.store/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
_DOC_DTYPE = np.dtype("<i8")
# Local shards are read with os.pread by default: a window costs one system call, and the process's resident
# memory stays flat (the kernel's page cache holds what was read, outside the process). "memmap" maps the shards
# instead: as fast, but every page read stays mapped, so RSS (file-backed) grows towards the store's size over
# an epoch (benchmarks/bench_store.py measures both).
LOCAL_READ = os.environ.get("TOKENFORMER_JAX_STORE_READ", "pread")


class Location:
  """A directory, local (os) or remote (fsspec), with the few operations the store needs."""

  def __init__(self, path: str):
    self.path = str(path).rstrip("/")
    if fileio.is_remote(self.path):
      import fsspec  # pylint: disable=g-import-not-at-top
      try:
        self.fs, self._root = fsspec.core.url_to_fs(self.path)
      except (ImportError, ValueError) as e:
        raise DataError(f"cannot reach {self.path}: {e}; `pip install gcsfs` to read gs:// paths") from None
      self._root = self._root.rstrip("/")
    else:
      self.fs = None
      self._root = os.path.abspath(self.path.removeprefix("file://"))

  @property
  def local(self) -> bool:
    return self.fs is None

  def name(self, name: str) -> str:
    """The path of `name` as the user knows it (for messages)."""
    return f"{self.path}/{name}"

  def full(self, name: str) -> str:
    return os.path.join(self._root, name) if self.local else f"{self._root}/{name}"

  def url(self, name: str) -> str:
    """The path of `name` for the atomic writer (fileio): absolute locally, the URL remotely."""
    return self.full(name) if self.local else self.name(name)

  def exists(self, name: str = "") -> bool:
    path = self.full(name) if name else self._root
    return os.path.exists(path) if self.local else self.fs.exists(path)

  def size(self, name: str) -> int | None:
    try:
      return os.path.getsize(self.full(name)) if self.local else int(self.fs.size(self.full(name)))
    except (FileNotFoundError, OSError):
      return None

  def listdir(self) -> list[str]:
    if not self.exists():
      return []
    if self.local:
      return sorted(os.listdir(self._root))
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._root, detail=False))

  def makedirs(self) -> None:
    if self.local:
      os.makedirs(self._root, exist_ok=True)
    else:
      self.fs.makedirs(self._root, exist_ok=True)

  def open(self, name: str, mode: str = "rb"):
    return open(self.full(name), mode) if self.local else self.fs.open(self.full(name), mode)

  def read_bytes(self, name: str) -> bytes:
    with self.open(name) as f:
      return f.read()

  def read_range(self, name: str, start: int, end: int) -> bytes:
    if self.local:
      with open(self.full(name), "rb") as f:
        f.seek(start)
        return f.read(end - start)
    return self.fs.cat_file(self.full(name), start=start, end=end)

  def remove(self, name: str) -> None:
    fileio.remove(self.url(name))

  def write_atomically(self, name: str, data: bytes) -> None:
    fileio.write_bytes(self.url(name), data)

  def open_atomically(self, name: str) -> fileio.AtomicFile:
    """`name` written as a stream, published whole by its commit()."""
    return fileio.AtomicFile(self.url(name))


def store_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_manifest(location: Location) -> dict:
  where = location.name(MANIFEST)
  try:
    manifest = json.loads(location.read_bytes(MANIFEST))
  except FileNotFoundError:
    raise DataError(f"{where} not found: {location.path} is not a finished token store; prepare it with "
                    "python -m tokenformer_jax.data.prepare") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{where}: not a token store manifest ({e}); prepare the store again") from None
  found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
  if found != FORMAT:
    raise DataError(f"{where}: not a token store manifest (format {str(found)[:40]!r}, expected {FORMAT!r}); "
                    "prepare the store again")
  return manifest


class SplitTokens:
  """One split's stream `[eos] + shards` as a random-access int32 sequence: `len()` and `[a:b]` slices.

  Shards are opened on first touch (pread or memmap locally, ranged reads remotely); pickling drops open handles,
  so grain worker processes reopen what they read.
  """

  def __init__(self, location: Location, split: str, info: dict, dtype: np.dtype, eos_id: int):
    self.location = location
    self.split = split
    self.dtype = np.dtype(dtype)
    self.eos_id = eos_id
    self.num_documents = int(info["documents"])
    self.shards = [(s["name"], int(s["tokens"])) for s in info["shards"]]
    self._starts = np.cumsum([1] + [tokens for _, tokens in self.shards])   # shard i: stream [starts[i], [i+1])
    self._length = int(self._starts[-1]) if self.num_documents else 0
    self._maps: dict = {}   # shard -> file descriptor, np.memmap, or True (a remote shard whose size was checked)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_maps"], state["_lock"] = {}, None
    return state

  def __del__(self):
    for handle in getattr(self, "_maps", {}).values():
      if isinstance(handle, int) and not isinstance(handle, bool):
        with contextlib.suppress(OSError):
          os.close(handle)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __getitem__(self, sl: slice) -> np.ndarray:
    if not isinstance(sl, slice) or sl.step not in (None, 1):
      raise TypeError("SplitTokens supports contiguous slices only")
    start, stop, _ = sl.indices(self._length)
    out = np.empty(max(stop - start, 0), np.int32)
    pos = start
    if pos == 0 and stop > 0:
      out[0] = self.eos_id
      pos = 1
    shard = int(np.searchsorted(self._starts, pos, side="right")) - 1
    while pos < stop:
      end = min(stop, int(self._starts[shard + 1]))
      base = int(self._starts[shard])
      out[pos - start:end - start] = self._read(shard, pos - base, end - base)
      pos, shard = end, shard + 1
    return out

  def _read(self, shard: int, a: int, b: int) -> np.ndarray:
    name, tokens = self.shards[shard]
    size = self.dtype.itemsize
    if self.location.local:
      handle = self._maps.get(shard)
      if handle is None:
        with self._lock:
          handle = self._maps.get(shard)
          if handle is None:
            check_shard_size(self.location, name, tokens, self.dtype)
            path = self.location.full(f"{name}.tokens")
            if LOCAL_READ == "memmap":
              handle = np.memmap(path, self.dtype, mode="r", shape=(tokens,))
            else:
              handle = os.open(path, os.O_RDONLY)
            self._maps[shard] = handle
      if LOCAL_READ == "memmap":
        return handle[a:b]
      return np.frombuffer(os.pread(handle, (b - a) * size, a * size), self.dtype)
    if shard not in self._maps:   # remote: check the size once per shard, then ranged reads
      check_shard_size(self.location, name, tokens, self.dtype)
      self._maps[shard] = True
    raw = self.location.read_range(f"{name}.tokens", a * size, b * size)
    if len(raw) != (b - a) * size:
      raise DataError(f"{self.location.name(name + '.tokens')}: short read ({len(raw)} of {(b - a) * size} bytes at "
                      f"{a * size}); the shard is truncated: re-copy the store or prepare it again")
    return np.frombuffer(raw, self.dtype)

  def __repr__(self) -> str:
    return f"SplitTokens({self.location.path}, {self.split}, {len(self.shards)} shards, {self._length} ids)"


def check_shard_size(location: Location, name: str, tokens: int, dtype: np.dtype, documents: int | None = None):
  """DataError naming the file if a shard's .tokens (or .docs, given `documents`) is missing or the wrong size."""
  files = [(f"{name}.tokens", tokens * np.dtype(dtype).itemsize)]
  if documents is not None:
    files.append((f"{name}.docs", documents * _DOC_DTYPE.itemsize))
  for file, want in files:
    size = location.size(file)
    if size is None:
      raise DataError(f"{location.name(file)}: missing (the store's manifest lists it); re-copy the store or "
                      "prepare it again into a new directory")
    if size != want:
      how = "truncated" if size < want else "longer than the manifest says"
      raise DataError(f"{location.name(file)}: {size} bytes, the manifest says {want} ({how}); re-copy the "
                      "store or prepare it again into a new directory")


class TokenStore:
  """A finished store, checked against `tokenizer` (its fingerprint) and its own shards' sizes."""

  def __init__(self, path: str, tokenizer=None):
    self.location = Location(path)
    self.path = self.location.path
    manifest = read_manifest(self.location)
    self.manifest = manifest
    where = self.location.name(MANIFEST)
    if tokenizer is not None and manifest["tokenizer_fingerprint"] != tokenizer.fingerprint:
      raise DataError(f"{where}: the store was tokenized with another tokenizer (fingerprint "
                      f"{manifest['tokenizer_fingerprint']} from {manifest.get('tokenizer', '?')}; "
                      f"{tokenizer.path or 'the configured tokenizer'} is {tokenizer.fingerprint}); set "
                      "data.tokenizer to the one it was made with, or prepare the store again")
    self.dtype = np.dtype(manifest["dtype"])
    self.splits: dict[str, SplitTokens] = {}
    for split in SPLITS:
      info = manifest["splits"][split]
      shards = info["shards"]
      if (sum(s["tokens"] for s in shards) != info["tokens"] or sum(s["documents"] for s in shards)
          != info["documents"]):
        raise DataError(f"{where}: the {split} split's totals ({info['tokens']} tokens, {info['documents']} "
                        "documents) are not the sums of its shards'; the manifest does not match its shards: "
                        "prepare the store again")
      if self.location.local:   # remote shards are checked on first read (one request each, not N at start)
        for s in shards:
          check_shard_size(self.location, s["name"], s["tokens"], self.dtype)
      self.splits[split] = SplitTokens(self.location, split, info, self.dtype, manifest["eos_id"])

  def __repr__(self) -> str:
    counts = ", ".join(f"{s} {len(t.shards)} shards {t.num_documents} documents" for s, t in self.splits.items())
    return f"TokenStore({self.path}: {counts})"


def shard_checksums(location: Location, name: str) -> tuple[str, str]:
  """sha256 of a shard's .tokens and .docs files, read in 16 MB pieces."""
  digests = []
  for suffix in (".tokens", ".docs"):
    h = hashlib.sha256()
    with location.open(name + suffix) as f:
      while chunk := f.read(1 << 24):
        h.update(chunk)
    digests.append(h.hexdigest())
  return digests[0], digests[1]


def verify_store(path: str, tokenizer=None) -> dict:
  """Opens the store and checks every shard's size, document offsets and checksums; returns the manifest."""
  store = TokenStore(path, tokenizer)
  for split in SPLITS:
    for s in store.manifest["splits"][split]["shards"]:
      check_shard_size(store.location, s["name"], s["tokens"], store.dtype, s["documents"])
      tokens_sha, docs_sha = shard_checksums(store.location, s["name"])
      if (tokens_sha, docs_sha) != (s["sha256"], s["docs_sha256"]):
        bad = f"{s['name']}.tokens" if tokens_sha != s["sha256"] else f"{s['name']}.docs"
        raise DataError(f"{store.location.name(bad)}: checksum differs from the manifest's; the file is damaged: "
                        "re-copy the store or prepare it again into a new directory")
      ends = np.frombuffer(store.location.read_bytes(s["name"] + ".docs"), _DOC_DTYPE)
      if len(ends) and (ends[-1] != s["tokens"] or np.any(np.diff(ends) < 1)):
        raise DataError(f"{store.location.name(s['name'] + '.docs')}: document offsets do not end at the shard's "
                        f"{s['tokens']} tokens; prepare the store again")
  return store.manifest
