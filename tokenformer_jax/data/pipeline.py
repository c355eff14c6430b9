"""The grain pipeline: documents → token stream → [seq_len + 1] windows → shuffle → host shard → batches.

Token accounting (each corpus token is a target exactly once per epoch)
-----------------------------------------------------------------------
A split becomes ONE stream of ids: an eos, then every document followed by an eos,

    stream = [eos] + doc_1 + [eos] + doc_2 + [eos] + ... + doc_n + [eos]

so eos is the separator the model sees before every document, the first included. The corpus's tokens are
`stream[1:]` (each document's tokens and its closing eos). Window k is `stream[k·S : k·S + S + 1]`
(S = seq_len): consecutive windows share one boundary token, which is the last *target* of window k and the
first *input* of window k + 1. The targets of window k are therefore `stream[k·S + 1 : (k + 1)·S + 1]`, and
the windows' targets tile `stream[1:]` exactly: every corpus token is a target exactly once per epoch, and
nothing else is. The last window is padded with pad_id (mask 0 there), and the number of windows is padded
up to a multiple of `global_batch` with all-padding windows (mask all 0), so an epoch is a whole number of
global batches and no token is dropped; at most global_batch - 1 such rows per epoch.

Order and sharding
------------------
Windows are shuffled by grain's index shuffle (a permutation per epoch, seeded by seed + epoch: a new order
every epoch, the same on every host and in every run). Global position i of the shuffled infinite sequence
is the (i mod W)-th element of epoch i // W. Host p of P takes positions p, p + P, p + 2P, ... and batches
`global_batch / P` of them, so step b's global batch is positions [b·G, (b + 1)·G) spread over the hosts
(row r of host p is position b·G + r·P + p): the same rows for any number of hosts, each read by one host.

Every corpus is read through a token store (store.py): `data.store` names one made by
`python -m tokenformer_jax.data.prepare`; otherwise the files or TFDS dataset are prepared once into a store in
a cache directory keyed by their fingerprint (prepare.cached_store). Windows are read by random access from the
store's shards (os.pread, or ranged reads for gs://), each host only its own rows, so start-up and memory
do not grow with the corpus. The iterator's state is the global position in the shuffled stream (TrainIterator):
`get_state()`/`set_state()` resume at exactly the next batch, on any number of hosts.
"""
from __future__ import annotations

import collections
import threading

import grain
import numpy as np
from absl import logging

from tokenformer_jax import fileio
from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import prepare, store
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer


class TokenStream:
  """One split as a flat int32 stream `[eos] + doc + [eos] + doc + [eos] ...` (see the module docstring).

  `ids` is a numpy array or a store.SplitTokens (len and [a:b] slices).
  """

  def __init__(self, ids, num_documents: int):
    self.ids = ids
    self.num_documents = num_documents

  @property
  def num_targets(self) -> int:
    return max(len(self.ids) - 1, 0)

  def num_windows(self, seq_len: int) -> int:
    return -(-self.num_targets // seq_len)


class Windows:
  """Random-access [seq_len + 1] windows of a TokenStream (a grain data source): {"tokens", "mask"}.

  `length` defaults to the stream's windows; indices past the last of them are all-padding windows (mask 0).
  """

  def __init__(self, stream: TokenStream, seq_len: int, pad_id: int, length: int | None = None):
    if seq_len < 1:
      raise DataError(f"seq_len must be positive, got {seq_len}")
    self._ids = stream.ids
    self.source_path = getattr(stream.ids, "location", None) and stream.ids.location.path or ""
    self._seq_len = seq_len
    self._pad_id = pad_id
    self.num_real = stream.num_windows(seq_len)
    self._length = self.num_real if length is None else length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"window {index} out of range [0, {self._length})")
    s = self._seq_len
    chunk = self._ids[index * s: index * s + s + 1]
    tokens = np.full(s + 1, self._pad_id, np.int32)
    tokens[:len(chunk)] = chunk
    mask = np.zeros(s, np.float32)
    mask[:max(len(chunk) - 1, 0)] = 1.0
    return {"tokens": tokens, "mask": mask}

  def __repr__(self) -> str:  # grain logs sources by repr; keep it short
    return f"Windows(real={self.num_real}, length={self._length}, seq_len={self._seq_len})"


REMOTE_THREADS = 64   # reader threads (and batches read ahead) for a remote store; see benchmarks/bench_store.py


# Loading (cached: the trainer asks for the train iterator and the eval batches of the same data) ----------
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


def store_path(data: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1) -> str:
  """`data.store`, or the cached store of `data`'s files / TFDS dataset (prepared now if it is not yet)."""
  if data.store:
    return data.store
  return prepare.cached_store(data, tokenizer, process_index=process_index, process_count=process_count)


def load_token_streams(data: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                       process_count: int = 1) -> tuple[TokenStream, TokenStream]:
  """(train, validation) streams of `data`'s store, opened once per process for the same store and tokenizer."""
  path = store_path(data, tokenizer, process_index=process_index, process_count=process_count)
  key = (path, tokenizer.fingerprint)
  with _CACHE_LOCK:
    if key in _CACHE:
      _CACHE.move_to_end(key)
      return _CACHE[key]
  token_store = store.TokenStore(path, tokenizer)
  train, validation = (TokenStream(token_store.splits[s], token_store.splits[s].num_documents)
                       for s in store.SPLITS)
  logging.info("data from store %s: train %d documents, %d tokens (%d windows of %d+1); "
               "validation %d documents, %d tokens (%d windows)", path,
               train.num_documents, train.num_targets, train.num_windows(data.seq_len), data.seq_len,
               validation.num_documents, validation.num_targets, validation.num_windows(data.seq_len))
  with _CACHE_LOCK:
    _CACHE[key] = (train, validation)
    while len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return train, validation


def _check_batch(global_batch: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"global_batch={global_batch} must be a positive multiple of the number of hosts "
                    f"({process_count})")
  return global_batch // process_count


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def train_windows(data: DataConfig, tokenizer: Tokenizer, global_batch: int, *, process_index: int = 0,
                  process_count: int = 1) -> Windows:
  """The training split as windows, padded to a whole number of global batches."""
  train, _ = load_token_streams(data, tokenizer, process_index=process_index, process_count=process_count)
  windows = Windows(train, data.seq_len, tokenizer.pad_id)
  return Windows(train, data.seq_len, tokenizer.pad_id, _round_up(windows.num_real, global_batch))


def make_train_iterator(data: DataConfig, tokenizer: Tokenizer, *, global_batch: int, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None) -> TrainIterator:
  """An endless iterator of this host's share of each global batch (see the module docstring).

  Yields {"tokens": int32 [global_batch // process_count, seq_len + 1],
          "mask": float32 [same, seq_len]}, mask[i, t] = 1 where tokens[i, t + 1] is a real target.
  Epochs repeat forever, reshuffled each epoch from `seed` (default `data.shuffle_seed`).
  """
  local_batch = _check_batch(global_batch, process_index, process_count)
  seed = data.shuffle_seed if seed is None else seed
  if not 0 <= seed < 2**32:
    raise DataError(f"shuffle seed must be in [0, 2**32), got {seed}")
  windows = train_windows(data, tokenizer, global_batch, process_index=process_index,
                          process_count=process_count)
  logging.info("train iterator: %d windows per epoch (%d padding), %d steps of %d per epoch; host %d of %d "
               "reads %d rows a step", len(windows), len(windows) - windows.num_real,
               len(windows) // global_batch, global_batch, process_index, process_count, local_batch)
  return windows_iterator(windows, seed=seed, local_batch=local_batch, process_index=process_index,
                          process_count=process_count, worker_count=data.worker_count)


POSITION_FORMAT = "tokenformer_jax.data_position/1"


def _with_position(position: int, index) -> tuple[int, int]:
  return position, index


class _ReadWindow:
  """(global position, window id) → its window, with the id kept (the iterator reports which rows each batch was
  made of). A source with `at_position(index, position)` (images.ImageExamples: augmentation drawn from the
  position) is read through it, so that a resumed iterator draws the same."""

  def __init__(self, windows: Windows):
    self.windows = windows
    self.at_position = getattr(windows, "at_position", None)

  def __call__(self, item) -> dict[str, np.ndarray]:
    position, index = item
    example = self.windows[int(index)] if self.at_position is None else self.at_position(int(index), int(position))
    return {**example, "window": np.int64(index)}


class TrainIterator:
  """This host's rows of each global batch, read from a global position of the shuffled stream.

  The position is the one thing a checkpoint needs to resume the data exactly: the number of windows of the
  shuffled, endlessly repeated sequence that the whole job has consumed (step b starts at b·global_batch). It
  does not depend on the number of hosts or devices, so a run saved by 4 hosts resumes on 1 or 2 with the same
  next windows: host p of P reads positions start + p, start + p + P, ... (`get_state`/`set_state` carry it as
  plain JSON; `stream` names the sequence it counts in, so that a position is never applied to another one).
  Image sources (images.ImageExamples) use the same state, with their `stream_record` in `stream`; mixtures (not
  built yet) are meant to as well.
  """

  def __init__(self, windows: Windows, *, seed: int, global_batch: int, process_index: int = 0,
               process_count: int = 1, worker_count: int = 0):
    self.windows, self.seed, self.global_batch = windows, seed, global_batch
    self.process_index, self.process_count, self.worker_count = process_index, process_count, worker_count
    self.local_batch = global_batch // process_count
    self.stream = {"windows": len(windows), "seed": seed, **getattr(windows, "stream_record", {})}
    self.last_windows: np.ndarray | None = None   # the window ids of the batch last returned
    self.position = 0   # windows of the stream the whole job has consumed
    self._it = None     # the grain pipeline from `position`, built on the first next() after a (re)start

  def _pipeline(self):
    """The grain pipeline whose first batch is this host's share of positions [position, position + global_batch)."""
    order = grain.MapDataset.range(len(self.windows)).shuffle(seed=self.seed).repeat()   # reseeded per epoch
    order = order.map_with_index(_with_position)                                         # its global position
    ds = order[self.position + self.process_index::self.process_count].map(_ReadWindow(self.windows))
    ds = ds.batch(self.local_batch, drop_remainder=True)
    # A local window is one pread (microseconds). A remote one is a ranged read (tens of ms on GCS), and a batch's
    # windows are read in turn by one thread: many threads, each on its own batch, hide that latency.
    if fileio.is_remote(self.windows.source_path):
      options = grain.ReadOptions(num_threads=REMOTE_THREADS, prefetch_buffer_size=REMOTE_THREADS)
    else:
      options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    it = ds.to_iter_dataset(options)
    if self.worker_count > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
    return iter(it)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._pipeline()
    batch = next(self._it)
    self.position += self.global_batch
    self.last_windows = batch.pop("window")
    return batch

  def get_state(self) -> dict:
    return {"format": POSITION_FORMAT, "position": self.position, "stream": dict(self.stream)}

  def set_state(self, state: dict) -> None:
    """Continue at `state`'s position (get_state's JSON, from a job of any number of hosts); a DataError if it
    counts in another stream (other data, seed, or a global batch that pads the epoch differently)."""
    if not isinstance(state, dict) or state.get("format") != POSITION_FORMAT:
      raise DataError(f"not a data position of format {POSITION_FORMAT!r}: {str(state)[:120]}")
    if state["stream"] != self.stream:
      raise DataError(f"the saved data position counts in a stream of {state['stream']} (windows per epoch, "
                      f"shuffle seed), but this run's is {self.stream}: the training data, data.seq_len, "
                      "data.shuffle_seed or global_batch differ from the run that saved it; resume with those")
    position = state["position"]
    if not isinstance(position, int) or position < 0:
      raise DataError(f"the saved data position {position!r} is not a window count (an integer ≥ 0)")
    self.close()
    self.position = position

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def windows_iterator(windows: Windows, *, seed: int, local_batch: int, process_index: int = 0, process_count: int = 1,
                     worker_count: int = 0) -> TrainIterator:
  """Shuffled epochs of `windows`, host `process_index`'s positions, batched (make_train_iterator's grain part)."""
  return TrainIterator(windows, seed=seed, global_batch=local_batch * process_count, process_index=process_index,
                       process_count=process_count, worker_count=worker_count)


def steps_per_epoch(data: DataConfig, tokenizer: Tokenizer, *, global_batch: int) -> int:
  """Global batches per epoch of the training split."""
  return len(train_windows(data, tokenizer, global_batch)) // global_batch


def make_eval_batches(data: DataConfig, tokenizer: Tokenizer, *, global_batch: int, max_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      split: str = "validation") -> list[dict[str, np.ndarray]]:
  """The validation split (or `split="train"`) in order (no shuffle), as at most `max_batches` host batches of
  the train format.

  The last batch is completed with all-padding rows (mask 0); rows are spread over hosts as in training.
  Raises DataError if the split is empty.
  """
  local_batch = _check_batch(global_batch, process_index, process_count)
  train, validation = load_token_streams(data, tokenizer, process_index=process_index, process_count=process_count)
  validation = train if split == "train" else validation
  if validation.num_targets == 0:
    raise DataError(f"the {split} split is empty: set DataConfig.validation_files, a validation_fraction "
                    "> 0 with at least two documents, or a TFDS validation split")
  real = validation.num_windows(data.seq_len)
  num_batches = min(max_batches, -(-real // global_batch))
  windows = Windows(validation, data.seq_len, tokenizer.pad_id, num_batches * global_batch)
  batches = []
  for b in range(num_batches):
    rows = [windows[b * global_batch + r * process_count + process_index] for r in range(local_batch)]
    batches.append({k: np.stack([row[k] for row in rows]) for k in ("tokens", "mask")})
  return batches
