"""Orbax checkpoints of a run: parameters, optimizer state, data-iterator position and config, verified.

A run directory holds `checkpoints/<step>/{params, opt_state, data_position, job, config, checksums}`. (A grown
checkpoint made by `cli.grow --optimizer=carry` holds `moments` instead of `opt_state`: AdamW's grown moments,
{"count", "mu", "nu"}, mu and nu shaped like the parameters.) Orbax writes
each step to a temporary directory and renames it when complete, so a killed job never leaves a half checkpoint
that a restart would pick up. Restores go straight onto whatever mesh the abstract target's shardings name, so a
checkpoint saved on one mesh restores on any other (or on one device).

Orbax does not check what it reads back: a flipped byte in a tensor file restores as a wrong number. So every
save records a checksum of every array (`checksums`, computed on the devices that hold the array: only one
scalar per array reaches the host) and every restore recomputes and compares them. The checksum is two wrapping
uint32 sums of mixed (bits, position) pairs: exact integer arithmetic, so the same on any mesh. A resume that
finds its newest checkpoint broken moves it aside to `<step>.corrupt` (never deleting it) and takes the newest
good one (`restore_newest`).

Nothing in a checkpoint depends on the shape of the job that wrote it, so it resumes on any number of hosts and
devices: arrays restore onto the new mesh, and the data position (`data_position`) is the global position in the
shuffled stream, from which every host derives its own rows (data/pipeline.py, TrainIterator). `job` records the
shape that wrote it (processes, devices), for messages. Checkpoints written before this kept grain's iterator
state per process (`data_iterator/process_<i>-of-<n>.json`); they are converted to the global position on
resume, on any shape, and one whose state cannot be converted is refused with one line, never set aside: a
checkpoint is set aside as broken only when it is damaged, never because the job's shape changed.

(Over 400 lines on purpose: the format, its verification and its fallback are one idea; apart, the rule of what
a good checkpoint is would live in two places.)
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental.multihost_utils import sync_global_devices
from jax.sharding import NamedSharding, PartitionSpec

from tokenformer_jax import fileio
from tokenformer_jax.run import CHECKPOINTS

CHECKSUM_VERSION = 1
LEGACY_DATA_ITEM = "data_iterator"   # grain's per-process iterator states, as checkpoints before data_position held


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, or does not fit the model it is restored into."""


class BrokenCheckpoint(CheckpointError):
  """A checkpoint that cannot be read back or whose arrays do not match the checksums saved with them."""

  def __init__(self, directory, step: int, reason: str, advice: str = ""):
    self.step, self.reason = step, reason
    super().__init__(f"checkpoint {epath.Path(directory) / str(step)} is broken: {reason}{advice}")


def job_shape() -> dict[str, int]:
  """The shape of this job (what a checkpoint records of the job that wrote it)."""
  return {"processes": jax.process_count(), "devices": jax.device_count()}


def describe_shape(shape: dict) -> str:
  """`2 processes × 4 devices` (devices per process; left out when unknown)."""
  plural = lambda n, word: f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"   # noqa: E731
  devices = f" × {plural(shape['devices'] // shape['processes'], 'device')}" if shape.get("devices") else ""
  return plural(shape["processes"], "process") + devices


def say_once_per_job(line: str) -> None:
  """A line for the user, from process 0 only (the trainer's other lines come from there too)."""
  if jax.process_index() == 0:
    print(line, file=sys.stdout, flush=True)


# Checksums ------------------------------------------------------------------------------------------------
def _mix(x: jax.Array) -> jax.Array:
  """A bijective avalanche of uint32 (murmur3's finaliser): one flipped input bit changes about half the bits."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 of the same shape (64-bit types: an extra trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def array_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: wrapping sums over the elements of h = mix(bits ^ mix(position)), plain and weighted by the odd
  number 2·position + 1. Integer sums in any order give the same words, so the mesh does not matter.

  Positions come from iotas over the array's own shape (no reshape, so a sharded array is never relaid out);
  the sums run where the shards live and only the two words are combined across devices. About 15 integer
  operations per element: memory-bound on a TPU.
  """
  bits = _bits(x)
  position = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  h = _mix(bits ^ _mix(position + jnp.uint32(0x9E3779B9)))
  lanes = jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(h * (position * 2 + 1), dtype=jnp.uint32)])
  return lanes ^ _mix(jnp.uint32(bits.size % 2**32))


@functools.lru_cache(maxsize=None)
def _checksum_program(out_sharding):
  """One small jitted program per (shape, dtype, sharding), quick to compile; its two words replicated over the
  array's mesh, so that every host can read them."""
  return jax.jit(array_checksum, out_shardings=out_sharding)


def _replicated_over(leaf):
  placed = getattr(leaf, "sharding", None)
  return NamedSharding(placed.mesh, PartitionSpec()) if isinstance(placed, NamedSharding) else None


def checksums(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits} of every array in `tree`, computed on the arrays' own devices.

  One leaf's program at a time: XLA's in-process CPU collectives deadlock when several independent programs with
  all-reduces are in flight over the same devices (7 of 8 participants arrive, the 8th waits for a thread), as
  these programs are over a test's fake devices. On a TPU the wait costs a round trip per leaf, ~0.1 s a state."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = [jax.device_get(_checksum_program(_replicated_over(leaf))(leaf)) for _, leaf in flat]
  return {jax.tree_util.keystr(path): "".join(f"{int(word):08x}" for word in np.asarray(value))
          for (path, _), value in zip(flat, values)}


def first_mismatch(saved: dict[str, str], restored: dict[str, str]) -> str | None:
  for path in sorted(set(saved) | set(restored)):
    if saved.get(path) != restored.get(path):
      return path
  return None


def checkpoints_dir(path: str | epath.Path) -> epath.Path:
  """A run directory or its `checkpoints/` subdirectory → the `checkpoints/` directory (absolute: Orbax
  refuses relative paths)."""
  path = epath.Path(path)
  if "://" not in str(path):
    path = epath.Path(os.path.abspath(path))
  return path if path.name == CHECKPOINTS else path / CHECKPOINTS


def _dotted(path) -> str:
  """`opt_state.1.0.mu.embedding`: a leaf's path as Orbax names it, alike for a saved tree's metadata (dicts and
  lists) and the tree it restores into (optax's named tuples)."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaf_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_dotted(path): tuple(leaf.shape) for path, leaf in flat}


def check_same_structure(stored, target, what: str, kind: str = "model") -> None:
  """Refuse a restore whose leaves or shapes differ: Orbax would otherwise restore part of a tree silently.
  `kind`: what a mismatch means the checkpoint was saved from a different one of (model, optimizer)."""
  stored, target = _leaf_shapes(stored), _leaf_shapes(target)
  for path in sorted(set(stored) | set(target)):
    if path not in stored:
      raise CheckpointError(f"{what}: the checkpoint has no {path}; it was saved from a different {kind}")
    if path not in target:
      raise CheckpointError(f"{what}: the checkpoint has {path}, which this {kind} does not; it was saved "
                            f"from a different {kind}")
    if stored[path] != target[path]:
      raise CheckpointError(f"{what}: {path} is {stored[path]} in the checkpoint but {target[path]} in this "
                            "model; restore it into the config it was saved with (or grow it first)")


class RunCheckpoints:
  """Save and restore the checkpoints of one run."""

  def __init__(self, path: str | epath.Path, *, keep: int | None = None, read_only: bool = False,
               save_concurrent_gb: float | None = None):
    """`save_concurrent_gb`: cap on the parameter bytes being written at once (Orbax's default, 96 GB, lets a
    whole model's encoded copy be in flight: twice its size in memory)."""
    self.directory = checkpoints_dir(path)
    if read_only and not self.directory.exists():
      raise CheckpointError(f"no checkpoints at {self.directory}")
    # Handlers named up front, so a fresh process can read item metadata before restoring anything.
    params_handler = (ocp.StandardCheckpointHandler() if save_concurrent_gb is None
                      else ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb))
    handlers = {"params": params_handler, "opt_state": ocp.StandardCheckpointHandler(),
                "moments": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "extra": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler(), "data_position": ocp.JsonCheckpointHandler(),
                "job": ocp.JsonCheckpointHandler(), LEGACY_DATA_ITEM: grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                             enable_async_checkpointing=not read_only))
    self._said_unverified = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def resolve_step(self, step: int | None) -> int:
    """`None` → the latest complete step; an explicit step must exist."""
    steps = self.manager.all_steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has steps {sorted(steps)}")
    return step

  def save(self, step: int, *, params, config: dict, opt_state=None, data_iterator=None,
           extra: dict | None = None, moments=None) -> None:
    """Start an asynchronous save; params-only when opt_state and data_iterator are left out (`moments`: a grown
    checkpoint's carried AdamW moments). `data_iterator`: anything with `get_state()` → the JSON of its global
    position (pipeline.TrainIterator), saved once for the whole job.

    The checksums of the arrays are computed first, on their devices (one short pass over the state)."""
    sums = {"version": CHECKSUM_VERSION, "params": checksums(params)}
    items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config)}
    for name, tree in (("opt_state", opt_state), ("moments", moments)):
      if tree is not None:
        items[name] = ocp.args.StandardSave(tree)
        sums[name] = checksums(tree)
    items["checksums"] = ocp.args.JsonSave(sums)
    items["job"] = ocp.args.JsonSave(job_shape())
    if data_iterator is not None:
      items["data_position"] = ocp.args.JsonSave(data_iterator.get_state())
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(extra)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  # Reading: every failure to read is a BrokenCheckpoint naming the step, every mismatch too ------------------
  def _read(self, step: int, read: Callable[[], Any]) -> Any:
    """`read()`, with any failure of the files (missing, truncated, garbled) turned into a BrokenCheckpoint.
    A checkpoint that reads but does not fit the model stays a plain CheckpointError (it is not broken).
    Every host must agree: one host's failed read fails the step on all of them."""
    error = None
    try:
      result = read()
    except (BrokenCheckpoint, MemoryError):
      raise
    except CheckpointError as mismatch:   # deterministic: every host raises it alike
      raise mismatch
    except Exception as failure:  # noqa: BLE001 (tensorstore, JSON, OS and Orbax errors all mean "unreadable")
      if "RESOURCE_EXHAUSTED" in str(failure):   # out of device memory: the checkpoint is not to blame
        raise
      lines = str(failure).strip().splitlines() or [""]
      detail = f"{type(failure).__name__}: {lines[0][:240]}"
      written = self.written_by(step)
      if "Topology mismatch" in lines[0]:   # Orbax: a target without shardings, on another number of devices
        error = CheckpointError(f"checkpoint {self.directory / str(step)} was saved on another number of devices "
                                f"and is restored here into arrays without shardings ({detail}); give the restore "
                                "target's ShapeDtypeStructs shardings on this job's devices")
      elif written is not None and written["processes"] != jax.process_count():
        # Not set aside: what a job of another shape cannot read may be whole (only checksums prove damage).
        error = CheckpointError(f"checkpoint {self.directory / str(step)} was written by a job of "
                                f"{describe_shape(written)} and cannot be read by this one of "
                                f"{describe_shape(job_shape())} ({detail}); it is left in place: resume it with "
                                f"{written['processes']} processes")
      else:
        error = BrokenCheckpoint(self.directory, step, f"cannot be read ({detail})", self._other_steps(step))
    if not everywhere(error is None):
      raise error or BrokenCheckpoint(self.directory, step, "another host could not read it")
    return result

  def written_by(self, step: int) -> dict | None:
    """{"processes", "devices"} of the job that wrote `step` (a checkpoint before `job` was recorded: the process
    count its per-process data files name, devices unknown); None if that cannot be told."""
    folder = self.directory / str(step)
    try:
      if (folder / "job").exists():
        return self.manager.restore(step, args=ocp.args.Composite(job=ocp.args.JsonRestore()))["job"]
      counts = {name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in self._legacy_files(step)}
      return {"processes": int(counts.pop()), "devices": None} if len(counts) == 1 else None
    except Exception:  # noqa: BLE001 (only for messages: an unreadable record tells nothing)
      return None

  def _legacy_files(self, step: int) -> list[str]:
    folder = self.directory / str(step) / LEGACY_DATA_ITEM
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("process_")) if folder.exists() else []

  def _verify(self, step: int, restored: dict[str, Any]) -> None:
    """Recompute the checksums of the restored items and compare them with those saved with them."""
    if not (self.directory / str(step) / "checksums").exists():
      if not self._said_unverified:
        say_once_per_job(f"note: {self.directory / str(step)} has no checksums (it was saved before "
                         "tokenformer_jax verified checkpoints); restoring it unverified")
        self._said_unverified = True
      return
    saved = self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"])
    if saved.get("version") != CHECKSUM_VERSION:
      raise CheckpointError(f"{self.directory / str(step)} has checksums of version {saved.get('version')}, but "
                            f"this tokenformer_jax computes version {CHECKSUM_VERSION}; restore it with the "
                            "version that wrote it")
    for item, tree in restored.items():
      if item not in saved:
        raise BrokenCheckpoint(self.directory, step, f"its checksums have no entry for {item}")
      path = first_mismatch(saved[item], checksums(tree))
      if path is not None:
        raise BrokenCheckpoint(self.directory, step, f"{item}{path} does not match the checksum saved with it "
                               "(its files changed after the save)", self._other_steps(step))

  def _other_steps(self, step: int) -> str:
    others = sorted(s for s in self.manager.all_steps() if s != step)
    if not others:
      return "; the run has no other checkpoint to use instead"
    return f"; use another of the run's checkpoints (steps {others}; resuming falls back by itself)"

  def has_item(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).exists()

  def read_json(self, step: int | None = None, item: str = "config", default: dict | None = None) -> dict:
    """A JSON item of a checkpoint (the config, or growth's provenance "extra"); `default` if absent."""
    step = self.resolve_step(step)
    if default is not None and not self.has_item(step, item):
      return default
    return self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item])

  def _stored(self, step: int, item: str = "params"):
    stored = self.manager.item_metadata(step)[item]
    if stored is None:
      raise FileNotFoundError(f"its {item} item is missing")
    return stored

  def _restore_item(self, item: str, abstract, step: int | None):
    """One array item (params, or a grown checkpoint's moments) onto the shardings of `abstract`, verified."""
    step = self.resolve_step(step)

    def read():
      what = {"params": "parameters"}.get(item, item)
      check_same_structure(self._stored(step, item), abstract, f"{what} of {self.directory / str(step)}")
      return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
    restored = self._read(step, read)
    self._verify(step, {item: restored})
    return restored

  def restore_params(self, abstract_params, step: int | None = None):
    """Parameters only, onto the shardings of `abstract_params` (a tree of ShapeDtypeStruct), verified."""
    return self._restore_item("params", abstract_params, step)

  def restore_moments(self, abstract_moments, step: int | None = None):
    """A grown checkpoint's carried AdamW moments ({"count", "mu", "nu"}), verified."""
    return self._restore_item("moments", abstract_moments, step)

  def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator=None, *,
              check_optimizer: bool = False) -> tuple[Any, Any]:
    """(params, opt_state) of `step`, verified, and the data iterator's position restored in place.
    `check_optimizer`: refuse an optimizer state of another structure than `abstract_opt_state` (CheckpointError)
    before reading it (what a tool that carries it elsewhere wants; resuming leaves that to Orbax)."""
    def read():
      stored = self._stored(step)
      check_same_structure(stored, abstract_params, f"parameters of {self.directory / str(step)}")
      if check_optimizer:
        check_same_structure(self._stored(step, "opt_state"), abstract_opt_state,
                             f"optimizer state of {self.directory / str(step)}", kind="optimizer")
      items = {"params": ocp.args.StandardRestore(abstract_params),
               "opt_state": ocp.args.StandardRestore(abstract_opt_state)}
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    position = None if data_iterator is None else self.data_position(step, data_iterator)
    restored = self._read(step, read)
    self._verify(step, {"params": restored["params"], "opt_state": restored["opt_state"]})
    if position is not None:
      data_iterator.set_state(position)   # a position in another stream: its own one-line error, nothing set aside
    return restored["params"], restored["opt_state"]

  def data_position(self, step: int, data_iterator) -> dict:
    """The data position saved at `step`, as `data_iterator.set_state` takes it. An older checkpoint's per-process
    grain states ({"next_index": k}: k batches of global_batch / n rows taken by each of its n hosts) become the
    global position k · global_batch, the same for any shape; a state of another form (grain's worker processes,
    data.worker_count > 0) is a CheckpointError, and the checkpoint stays where it is."""
    where = self.directory / str(step)
    if self.has_item(step, "data_position"):
      return self.read_json(step, "data_position")
    files = self._legacy_files(step)
    if not files and self.has_item(step, "job"):   # saved with a data position that is gone: damaged
      raise BrokenCheckpoint(self.directory, step, "its data_position item is missing", self._other_steps(step))
    if not files:
      raise CheckpointError(f"{where} has no data position (a parameters-only checkpoint: grown or imported); "
                            "start a run from it with --init_from instead of resuming it")
    state = self._read(step, lambda: json.loads((where / LEGACY_DATA_ITEM / files[0]).read_text()))
    if not (isinstance(state, dict) and set(state) == {"next_index"}):
      raise CheckpointError(f"{where} holds its data position as grain's per-process state of worker processes "
                            f"({files[0]}: {str(state)[:80]}), which cannot be carried over; resume it with the "
                            "tokenformer_jax that wrote it")
    saved_batch = self.read_json(step)["global_batch"]
    if saved_batch != data_iterator.global_batch:
      raise CheckpointError(f"{where} was saved with global_batch={saved_batch}, this run has "
                            f"global_batch={data_iterator.global_batch}; its per-process data position counts in "
                            f"batches of {saved_batch}: resume with --set global_batch={saved_batch}")
    return {**data_iterator.get_state(), "position": int(state["next_index"]) * saved_batch}

  # Falling back past broken checkpoints --------------------------------------------------------------------
  def restore_newest(self, abstract_params, abstract_opt_state, data_iterator=None,
                     check_config: Callable[[dict], None] | None = None):
    """(step, params, opt_state) of the newest checkpoint that reads and verifies, or (None, None, None) in a
    run without checkpoints. Each broken newer one is reported in one line and moved aside to
    `<step>.corrupt`. `check_config(saved config)` may refuse the run (its error passes through untouched)."""
    moved = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        if check_config is not None:
          check_config(self.read_json(step))
        params, opt_state = self.restore(step, abstract_params, abstract_opt_state, data_iterator)
        return step, params, opt_state
      except BrokenCheckpoint as broken:
        aside = self.move_aside(step)
        say_once_per_job(f"checkpoint at step {step} is broken ({broken.reason}); "
                         f"moved it to {aside.name} and falling back to the one before")
        moved.append(aside.name)
    if moved or self.moved_aside():
      names = ", ".join(moved or self.moved_aside())
      raise CheckpointError(f"no good checkpoint in {self.directory}: {names} were moved aside as broken; start "
                            "over with a new --workdir (or move those directories out of it to start over there)")
    return None, None, None

  def moved_aside(self) -> list[str]:
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if ".corrupt" in p.name)

  def move_aside(self, step: int) -> epath.Path:
    """Rename `<step>` to `<step>.corrupt` (`.corrupt.2`, ... if taken): kept for a post-mortem, out of the
    way of the steps Orbax lists. Process 0 renames; every process waits for it."""
    source, target = self.directory / str(step), self.directory / f"{step}.corrupt"
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f"{step}.corrupt.{n}"
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"tokenformer_jax moved checkpoint {step} aside")
    self.manager.reload()
    return target

  def good_steps(self, abstract_params_of: Callable[[int], Any]) -> list[int]:
    """The steps whose parameters read and verify (`abstract_params_of(step)` builds each step's target)."""
    good = []
    for step in sorted(self.manager.all_steps()):
      try:
        self.restore_params(abstract_params_of(step), step)
        good.append(step)
      except BrokenCheckpoint:
        pass
    return good

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def everywhere(ok: bool) -> bool:
  """True when `ok` holds on every host (one host's failed read fails a checkpoint on all of them)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def write_new_run(dst: str | epath.Path, *, files=(), save_concurrent_gb: float | None = None, **items) -> None:
  """A params-only checkpoint at step 0 of the run directory `dst` (with `files` copied beside it), complete or
  not there at all: what cli.grow and cli.import_neox write.

  Every process of the job calls it: each writes its own shards (Orbax) into the one directory that fileio's
  writer names for the job (locally `.NAME.tmp-job` beside `dst`, renamed or swapped into place when complete;
  on GCS `dst` itself, committed by Orbax's marker). Only the first process clears and commits, with every
  other process waiting at a barrier until it has.
  """
  dst = epath.Path(dst)
  primary = jax.process_index() == 0
  target = epath.Path(fileio.temporary_directory(dst, tag="job", create=primary))   # the same in every process
  sync_global_devices("write_new_run: destination cleared")
  try:
    written = RunCheckpoints(target, keep=None, save_concurrent_gb=save_concurrent_gb)
    written.save(0, **items)
    written.wait()
    written.close()
    if primary:
      for file in files:
        epath.Path(file).copy(target / os.path.basename(file))
  except BaseException:
    if primary and fileio.is_temporary(target):
      shutil.rmtree(target, ignore_errors=True)
    raise
  sync_global_devices("write_new_run: checkpoint written")
  if primary:
    fileio.commit_directory(target, dst)   # empty, or --overwrite: the old one goes once the new is in place
  sync_global_devices("write_new_run: checkpoint in place")
