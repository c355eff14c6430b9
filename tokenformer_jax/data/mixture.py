"""Mixtures of token stores: every window of training drawn from one of several sources by weight, by a schedule
that depends on nothing but the global position, so that resume is exact on any number of hosts.

`data.mixture` lists the sources: `STORE=WEIGHT` strings (the source named by its store directory's name), or in
a config file `(NAME, STORE, WEIGHT)` triples, which name two stores of the same directory name apart. Weights
are relative (they are normalised). `data.mixture_stages` changes them at given steps: `STEP=W1/W2/...` (one
weight per source, in the order of `data.mixture`), from that step on.

The schedule. Global position i (window i of the run, step b holding positions [b·G, (b+1)·G), row r of host p
of P being position b·G + r·P + p, as for one corpus: pipeline.py) goes to the source whose deficit is largest:
w_s · (i − i0 + 1) − (n_s − n0_s), with n_s the windows source s has given so far and (i0, n0) where the
current weights took effect (ties: the first source). So after any number of positions each source has given
its weighted share to within one window, and the assignment of the next positions is a function of (position,
counts, where the weights took effect): that is the iterator's state, saved in checkpoints. Every host computes
the whole global batch's assignment (G choices, microseconds) and reads only its own rows.

Each source reads its own shuffled epochs (grain's index shuffle, seeded by data.shuffle_seed and the source's
name, a new permutation each epoch): its n-th window is element n of that endless order. So a source never gives a
window twice within its epoch, and keeps its own position and epoch count whatever the others do. When a source
reaches the end of an epoch it starts its next one (`data.mixture_exhausted="repeat"`) or the run stops with a
one-line error (`"error"`).

What "exact" means when the weights change. At a stage's step k (`mixture_stages`), positions before k·G are drawn
exactly as by the old weights (the run up to k is the old run, bitwise), and from k·G on the deficit counts from
there with the new weights. A resume with other weights than the checkpoint was saved under (a config edited
between jobs) does the same at the resume position, and says so. Either way no source's window is skipped or
drawn again within its epoch: each source simply goes on from its own count.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import zlib

import grain
import numpy as np
from absl import logging

from tokenformer_jax import fileio
from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import pipeline
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer

STATE_FORMAT = "tokenformer_jax.mixture_position/1"


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  store: str
  weight: float


def _weight(text, where: str) -> float:
  try:
    weight = float(text)
  except (TypeError, ValueError):
    raise DataError(f"{where}: the weight {text!r} is not a number") from None
  if not np.isfinite(weight) or weight < 0:
    raise DataError(f"{where}: the weight {text!r} must be a finite number >= 0")
  return weight


def parse_sources(entries) -> list[Source]:
  """`data.mixture` → its sources, weights normalised; a DataError naming the entry for anything malformed."""
  sources = []
  for entry in entries:
    where = f"data.mixture entry {entry!r}"
    if isinstance(entry, str):
      store, sep, weight = entry.rpartition("=")
      if not sep or not store:
        raise DataError(f"{where} must look like STORE=WEIGHT (e.g. gs://bucket/stores/web=0.5)")
      name = os.path.basename(store.rstrip("/"))
    elif isinstance(entry, (tuple, list)) and len(entry) == 3:
      name, store, weight = entry
    else:
      raise DataError(f"{where} must be STORE=WEIGHT or a (NAME, STORE, WEIGHT) triple")
    if not name or "/" in str(name):
      raise DataError(f"{where}: the source name {name!r} must be a non-empty word without '/'")
    sources.append(Source(str(name), str(store), _weight(weight, where)))
  names = [s.name for s in sources]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise DataError(f"data.mixture names {', '.join(twice)} twice (sources are named by their store directory's "
                    "name): name them apart in a config file, as (NAME, STORE, WEIGHT) triples")
  total = sum(s.weight for s in sources)
  if sources and total <= 0:
    raise DataError(f"data.mixture's weights sum to {total:g}: they must sum to a positive number")
  return [dataclasses.replace(s, weight=s.weight / total) for s in sources]


def parse_stages(entries, count: int) -> list[tuple[int, tuple[float, ...]]]:
  """`data.mixture_stages` → [(step, normalised weights)] in step order."""
  stages = []
  for entry in entries:
    where = f"data.mixture_stages entry {entry!r}"
    step, sep, weights = str(entry).partition("=")
    if not sep or not step.strip().isdigit() or int(step) < 1:
      raise DataError(f"{where} must look like STEP=W1/W2/... with STEP >= 1")
    values = [_weight(w, where) for w in weights.split("/")]
    if len(values) != count:
      raise DataError(f"{where} has {len(values)} weights, but data.mixture has {count} sources")
    if sum(values) <= 0:
      raise DataError(f"{where}: the weights must sum to a positive number")
    stages.append((int(step), tuple(v / sum(values) for v in values)))
  if len({s for s, _ in stages}) != len(stages):
    raise DataError("data.mixture_stages names a step twice")
  return sorted(stages)


def weights_at(step: int, base: tuple[float, ...], stages) -> tuple[float, ...]:
  """The weights in force for step `step` (counted from 0: the step being drawn)."""
  weights = base
  for start, stage in stages:
    if step >= start:
      weights = stage
  return weights


class Schedule:
  """Which source each global position draws from (the largest deficit; see the module docstring)."""

  def __init__(self, counts: list[int], start: int, start_counts: list[int], weights: tuple[float, ...]):
    self.counts, self.start, self.start_counts, self.weights = list(counts), start, list(start_counts), weights

  def restart_at(self, position: int, weights: tuple[float, ...]) -> None:
    self.start, self.start_counts, self.weights = position, list(self.counts), weights

  def draw(self, position: int, n: int) -> list[tuple[int, int]]:
    """(source, its window count) for positions [position, position + n); the counts advance."""
    drawn, w = [], np.asarray(self.weights)
    for i in range(position, position + n):
      deficit = w * (i - self.start + 1) - (np.asarray(self.counts) - np.asarray(self.start_counts))
      s = int(np.argmax(deficit))
      drawn.append((s, self.counts[s]))
      self.counts[s] += 1
    return drawn


class MixtureIterator:
  """This host's rows of each global batch of a mixture (the interface of pipeline.TrainIterator: `position`,
  `last_windows`, `get_state`/`set_state`), plus `last_sources` and `consumed()` for the metrics."""

  def __init__(self, sources: list[Source], windows: list[pipeline.Windows], *, seed: int, global_batch: int,
               stages=(), exhausted: str = "repeat", process_index: int = 0, process_count: int = 1):
    self.sources, self.windows, self.stages, self.exhausted = sources, windows, list(stages), exhausted
    self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
    self.local_batch = pipeline._check_batch(global_batch, process_index, process_count)
    self.base = tuple(s.weight for s in sources)
    self.seeds = [(seed ^ zlib.crc32(s.name.encode())) % 2**32 for s in sources]
    self.orders = [grain.MapDataset.range(len(w)).shuffle(seed=sd).repeat() for w, sd in zip(windows, self.seeds)]
    self.stream = {"sources": [{"name": s.name, "windows": len(w), "seed": sd}
                               for s, w, sd in zip(sources, windows, self.seeds)]}
    self.position = 0
    self.schedule = Schedule([0] * len(sources), 0, [0] * len(sources), weights_at(0, self.base, self.stages))
    self.last_windows: np.ndarray | None = None
    self.last_sources: np.ndarray | None = None
    remote = any(fileio.is_remote(w.source_path) for w in windows)
    self.pool = concurrent.futures.ThreadPoolExecutor(pipeline.REMOTE_THREADS if remote else 4)
    self.changes: list[str] = []   # weight changes made on resume, for the console

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    weights = weights_at(self.position // self.global_batch, self.base, self.stages)
    if weights != self.schedule.weights:   # a stage starts at this step
      self.schedule.restart_at(self.position, weights)
    drawn = self.schedule.draw(self.position, self.global_batch)
    mine = drawn[self.process_index::self.process_count]
    for s, n in mine:
      if n >= len(self.windows[s]) and self.exhausted == "error":
        raise DataError(f"mixture source {self.sources[s].name!r} ran out of windows at step "
                        f"{self.position // self.global_batch + 1} (its {len(self.windows[s])} windows drawn once); "
                        "give it a lower weight, more data, or set data.mixture_exhausted=repeat")
    ids = [int(self.orders[s][n]) for s, n in mine]
    rows = list(self.pool.map(lambda sn: self.windows[sn[0][0]][sn[1]], zip(mine, ids)))
    self.position += self.global_batch
    self.last_windows, self.last_sources = np.asarray(ids), np.asarray([s for s, _ in mine])
    return {k: np.stack([row[k] for row in rows]) for k in ("tokens", "mask")}

  def current_weights(self) -> dict[str, float]:
    """{source name: weight} in force for the next step (what the validation total weighs by)."""
    weights = weights_at(self.position // self.global_batch, self.base, self.stages)
    return {source.name: w for source, w in zip(self.sources, weights)}

  def consumed(self) -> dict[str, float]:
    """Windows and epochs each source has given the whole job (the metrics' data/<source>/...)."""
    out = {}
    for s, source in enumerate(self.sources):
      n, size = self.schedule.counts[s], len(self.windows[s])
      out[f"data/{source.name}/windows"] = n
      out[f"data/{source.name}/epochs"] = n / size
    return out

  def get_state(self) -> dict:
    schedule = self.schedule
    return {"format": STATE_FORMAT, "position": self.position, "counts": list(schedule.counts),
            "weights_from": {"position": schedule.start, "counts": list(schedule.start_counts),
                             "weights": list(schedule.weights)},
            "stream": {"sources": [dict(s) for s in self.stream["sources"]]}}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise DataError(f"the saved data position is not a mixture's (format {STATE_FORMAT!r}): "
                      f"{str(state)[:120]}; resume with the data the run was saved with")
    if state["stream"]["sources"] != self.stream["sources"]:   # in order: the counts are per source, by index
      raise DataError(f"the saved mixture position counts in sources {state['stream']['sources']}, but this run's "
                      f"are {self.stream['sources']}: the stores, their order, data.seq_len or data.shuffle_seed "
                      "differ; resume with those")
    self.position = int(state["position"])
    held = state["weights_from"]
    self.schedule = Schedule(state["counts"], int(held["position"]), held["counts"], tuple(held["weights"]))
    # Weights other than those saved take effect at this position in __next__, as a stage's do at its step.
    step = self.position // self.global_batch
    weights, staged = weights_at(step, self.base, self.stages), any(start == step for start, _ in self.stages)
    if weights != self.schedule.weights and not staged:
      old = "/".join(f"{w:.3g}" for w in self.schedule.weights)
      self.changes.append(f"mixture weights changed on resume at step {step}: {old} → "
                          f"{'/'.join(f'{w:.3g}' for w in weights)} (each source goes on from its own position)")
      logging.info(self.changes[-1])

  def close(self) -> None:
    pass


def source_data(data: DataConfig, source: Source) -> DataConfig:
  """The DataConfig that reads one source alone (its store; everything else as `data`)."""
  return data.replace(store=source.store, mixture=(), mixture_stages=())


def make_train_iterator(data: DataConfig, tokenizer: Tokenizer, *, global_batch: int, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None) -> MixtureIterator:
  sources = parse_sources(data.mixture)
  windows = []
  for source in sources:
    train, _ = pipeline.load_token_streams(source_data(data, source), tokenizer, process_index=process_index,
                                           process_count=process_count)
    if train.num_targets == 0:
      raise DataError(f"mixture source {source.name!r} ({source.store}) has an empty train split")
    windows.append(pipeline.Windows(train, data.seq_len, tokenizer.pad_id))
  return MixtureIterator(sources, windows, seed=data.shuffle_seed if seed is None else seed,
                         global_batch=global_batch, stages=parse_stages(data.mixture_stages, len(sources)),
                         exhausted=data.mixture_exhausted, process_index=process_index, process_count=process_count)


def make_eval_batches(data: DataConfig, tokenizer: Tokenizer, *, global_batch: int, max_batches: int,
                      process_index: int = 0, process_count: int = 1) -> dict[str, list]:
  """{source name: its validation batches} (pipeline.make_eval_batches of each source's store)."""
  return {source.name: pipeline.make_eval_batches(source_data(data, source), tokenizer, global_batch=global_batch,
                                                  max_batches=max_batches, process_index=process_index,
                                                  process_count=process_count)
          for source in parse_sources(data.mixture)}
