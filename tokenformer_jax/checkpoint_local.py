"""The host-local fast tier: a checkpoint every `local_checkpoint_every` steps on each host's own disk, of the
shards that host holds, between the persistent checkpoints (checkpoint.py, every `checkpoint_every` steps).

A failure with notice (SIGTERM) already saves the current step. One without notice (a host that dies, an OOM
kill, a kernel panic) loses every step since the last persistent save; the local tier makes that the last local
save, which can come far more often: each host writes only what is on its own devices, to its own disk, in a
thread, and nothing crosses the network.

Layout: `<local_checkpoint_dir>/host_<process index>/<step>/` holds one `.npy` file per distinct shard on the
host's devices and `manifest.json`: the step, the run directory it belongs to, the config, the data position,
each leaf's shape, dtype and shards (global index, file, SHA-256 of the file), and the checksums of the whole
state (checkpoint.checksums, computed across the job as the persistent tier computes them). A step is written
under a temporary name and renamed when complete (fileio), so a kill leaves no half step behind.

On restart every host offers the steps it holds whole: the manifest reads, every file is there with its SHA-256,
the run directory is this one, and every shard this host's devices need (by global index, so a mesh or host
count that asks for other pieces does not match) is among them. The job takes the newest step every host offers,
if it is at least as new as the newest persistent checkpoint; else, or if its restored arrays do not match the
checksums recorded for that step (pieces of two steps can never pass: they match neither record), the persistent
checkpoint. A replaced VM (an empty disk) offers nothing, so the job falls back to the persistent tier.

The local tier never hides a failed persistent save: those raise as before (Orbax reports a failed asynchronous
save when the next one starts or the run waits), and a failed local write is only reported (the persistent tier
still protects the run).

Why not Orbax's emergency checkpointing (orbax.checkpoint.experimental.emergency): its CheckpointManager needs at
least two data-parallel replicas (slices), restoring a lost host's shards from a peer replica and saving the
persistent tier from one replica only. On the single v4 slice this project trains on there is one replica, so it
refuses to start (and it is marked experimental, "do not use without specific approval").
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import threading

import jax
import numpy as np

from tokenformer_jax import fileio
from tokenformer_jax.checkpoint import checksums, everywhere, first_mismatch, say_once_per_job

MANIFEST = "manifest.json"
MAX_OFFERED = 16   # steps a host can offer (newest first); more than any sane keep_local_checkpoints
WRITERS = 4        # threads writing (and hashing) one step's files, and reading them back


def _index(index: tuple, shape: tuple) -> list[list[int]]:
  """A shard's global index (slices) as [[start, stop], ...], the form the manifest keeps."""
  return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


class _Hashing:
  """A file that hashes what goes through it (np.save then writes in chunks, not straight from memory)."""

  def __init__(self, file):
    self.file, self.digest = file, hashlib.sha256()

  def write(self, data) -> int:
    self.digest.update(data)
    return self.file.write(data)


def _write_array(path: str, array: np.ndarray) -> str:
  """Write `array` as .npy, fsynced; the file's SHA-256, hashed on the way (the file is not read back)."""
  with open(path, "wb") as f:
    hashing = _Hashing(f)
    np.save(hashing, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  return hashing.digest.hexdigest()


def agreed_step(offers: list[list[int]], persistent: int | None) -> int | None:
  """The local step the job restores: the newest one every host offers, if none older than the newest persistent
  checkpoint (at the same step the local copy is taken: it is faster to read); None → the persistent tier."""
  common = set.intersection(*(set(o) for o in offers)) if offers else set()
  newest = max(common, default=None)
  return newest if newest is not None and (persistent is None or newest >= persistent) else None


class LocalTier:
  """The local checkpoints of one run on this host."""

  def __init__(self, root: str, workdir, *, every: int, keep: int):
    self.directory = os.path.join(os.path.abspath(root), f"host_{jax.process_index()}")
    self.workdir, self.every, self.keep = os.path.abspath(str(workdir)), every, keep
    self._thread: threading.Thread | None = None
    self.last_error: str | None = None

  # Saving ------------------------------------------------------------------------------------------------
  def save(self, step: int, state: dict, *, config: dict, data_position: dict) -> None:
    """Start writing `state` ({"params", "opt_state"}) at `step`: the checksums across the job and this host's
    shards copied to host memory now (the stall), the files in a thread. One write at a time."""
    self.wait()
    sums = {item: checksums(tree) for item, tree in state.items()}
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves, pieces = [], []
    for n, (path, leaf) in enumerate(flat):
      shards, seen = [], set()
      for shard in leaf.addressable_shards:
        index = _index(shard.index, leaf.shape)
        if str(index) not in seen:   # replicas on this host's devices: one file
          seen.add(str(index))
          shards.append({"index": index, "file": f"{n}.{len(shards)}.npy"})
          pieces.append(shard.data)
      leaves.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                     "shards": shards})
    host = iter(jax.device_get(pieces))
    arrays = [[next(host) for _ in leaf["shards"]] for leaf in leaves]
    manifest = {"step": step, "workdir": self.workdir, "config": config, "data_position": data_position,
                "checksums": sums, "leaves": leaves}
    self._thread = threading.Thread(target=self._write, args=(step, manifest, arrays), daemon=True,
                                    name=f"local checkpoint {step}")
    self._thread.start()

  def _write(self, step: int, manifest: dict, arrays: list) -> None:
    try:
      os.makedirs(self.directory, exist_ok=True)
      target = os.path.join(self.directory, str(step))
      temporary = fileio.temporary_directory(target)
      jobs = [(shard, array) for leaf, data in zip(manifest["leaves"], arrays)
              for shard, array in zip(leaf["shards"], data)]
      with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:   # hashing and writing release the GIL
        hashes = pool.map(lambda job: _write_array(os.path.join(temporary, job[0]["file"]), np.asarray(job[1])), jobs)
        for (shard, _), digest in zip(jobs, hashes):
          shard["sha256"] = digest
      fileio.write_json(os.path.join(temporary, MANIFEST), manifest)
      fileio.commit_directory(temporary, target)
      for old in self.steps()[:-self.keep]:
        shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)
    except OSError as failure:
      self.last_error = f"the local checkpoint of step {step} in {self.directory} failed ({failure})"

  def wait(self) -> None:
    """Let the write in flight finish; a failed one is reported once (the persistent tier still holds)."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.last_error:
      say_once_per_job(f"warning: {self.last_error}; training goes on, protected by the persistent checkpoints")
      self.last_error = None

  # Restoring ---------------------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    """The complete local steps on this host (renamed into place), oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory)
                  if name.isdigit() and os.path.exists(os.path.join(self.directory, name, MANIFEST)))

  def manifest(self, step: int) -> dict:
    with open(os.path.join(self.directory, str(step), MANIFEST), encoding="utf-8") as f:
      return json.load(f)

  def _needed(self, abstract) -> dict[str, list]:
    """leaf path → the global indices this host's devices hold of it under `abstract`'s shardings."""
    needed = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      indices = leaf.sharding.addressable_devices_indices_map(leaf.shape).values()
      needed[jax.tree_util.keystr(path)] = [_index(i, leaf.shape) for i in indices]
    return needed

  def usable(self, step: int, abstract) -> bool:
    """`step` is whole on this host and holds every piece of `abstract` its devices need."""
    try:
      manifest = self.manifest(step)
      if manifest["step"] != step or manifest["workdir"] != self.workdir:
        return False
      leaves = {leaf["path"]: leaf for leaf in manifest["leaves"]}
      for path, indices in self._needed(abstract).items():
        held = [shard["index"] for shard in leaves[path]["shards"]] if path in leaves else []
        if any(index not in held for index in indices):
          return False
      folder = os.path.join(self.directory, str(step))
      shards = [shard for leaf in manifest["leaves"] for shard in leaf["shards"]]
      with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
        hashes = list(pool.map(lambda shard: _sha256(os.path.join(folder, shard["file"])), shards))
      return all(digest == shard["sha256"] for digest, shard in zip(hashes, shards))
    except (OSError, ValueError, KeyError, TypeError):
      return False

  def offers(self, abstract) -> list[int]:
    """This host's usable steps, newest first."""
    return [step for step in reversed(self.steps()) if self.usable(step, abstract)][:MAX_OFFERED]

  def restore(self, step: int, abstract) -> tuple[dict, dict, dict] | None:
    """(state, data position, config) of local `step` onto `abstract`'s shardings, or None when the arrays do
    not match the checksums recorded with the step on every host (the job then restores the persistent tier)."""
    manifest, folder = self.manifest(step), os.path.join(self.directory, str(step))
    leaves = {leaf["path"]: leaf for leaf in manifest["leaves"]}
    flat, tree = jax.tree_util.tree_flatten_with_path(abstract)

    def load(path, leaf):
      files = {str(s["index"]): s["file"] for s in leaves[jax.tree_util.keystr(path)]["shards"]}
      placed = leaf.sharding.addressable_devices_indices_map(leaf.shape)
      arrays = [jax.device_put(np.load(os.path.join(folder, files[str(_index(index, leaf.shape))])), device)
                for device, index in placed.items()]
      return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)
    state = jax.tree_util.tree_unflatten(tree, [load(path, leaf) for path, leaf in flat])
    good = all(first_mismatch(manifest["checksums"][item], checksums(state[item])) is None for item in state)
    return (state, manifest["data_position"], manifest["config"]) if everywhere(good) else None


def gather_offers(offers: list[int]) -> list[list[int]]:
  """Every host's offered steps (the same list on every host)."""
  if jax.process_count() == 1:
    return [offers]
  from jax.experimental import multihost_utils
  padded = np.full(MAX_OFFERED, -1, np.int32)
  padded[:len(offers)] = offers
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), MAX_OFFERED)
  return [[int(s) for s in row if s >= 0] for row in gathered]
