"""Orbax checkpoints of a run: parameters, optimizer state, data-iterator position and config.

A run directory holds `checkpoints/<step>/{params, opt_state, data_iterator, config}`. Orbax writes each step
to a temporary directory and renames it when complete, so a killed job never leaves a half checkpoint that a
restart would pick up. Restores go straight onto whatever mesh the abstract target's shardings name, so a
checkpoint saved on one mesh restores on any other (or on one device).
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, or does not fit the model it is restored into."""


def checkpoints_dir(path: str | epath.Path) -> epath.Path:
  """A run directory or its `checkpoints/` subdirectory → the `checkpoints/` directory (absolute: Orbax
  refuses relative paths)."""
  path = epath.Path(path)
  if "://" not in str(path):
    path = epath.Path(os.path.abspath(path))
  return path if path.name == "checkpoints" else path / "checkpoints"


def _leaf_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_same_structure(stored, target, what: str) -> None:
  """Refuse a restore whose leaves or shapes differ: Orbax would otherwise restore part of a tree silently."""
  stored, target = _leaf_shapes(stored), _leaf_shapes(target)
  for path in sorted(set(stored) | set(target)):
    if path not in stored:
      raise CheckpointError(f"{what}: the checkpoint has no {path}; it was saved from a different model")
    if path not in target:
      raise CheckpointError(f"{what}: the checkpoint has {path}, which this model does not; it was saved "
                            "from a different model")
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
                "config": ocp.JsonCheckpointHandler(), "extra": ocp.JsonCheckpointHandler(),
                "data_iterator": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                             enable_async_checkpointing=not read_only))

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
           extra: dict | None = None) -> None:
    """Start an asynchronous save; params-only when opt_state and data_iterator are left out."""
    items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
    if extra is not None:
      items["extra"] = ocp.args.JsonSave(extra)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_json(self, step: int | None = None, item: str = "config", default: dict | None = None) -> dict:
    """A JSON item of a checkpoint (the config, or growth's provenance "extra"); `default` if absent."""
    step = self.resolve_step(step)
    if default is not None and not (self.directory / str(step) / item).exists():
      return default
    return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def restore_params(self, abstract_params, step: int | None = None):
    """Parameters only, onto the shardings of `abstract_params` (a tree of ShapeDtypeStruct)."""
    step = self.resolve_step(step)
    stored = self.manager.item_metadata(step)["params"]
    check_same_structure(stored, abstract_params, f"parameters of {self.directory / str(step)}")
    return self.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

  def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator=None) -> tuple[Any, Any]:
    """(params, opt_state) of `step`, and the data iterator's position restored in place."""
    stored = self.manager.item_metadata(step)
    check_same_structure(stored["params"], abstract_params, f"parameters of {self.directory / str(step)}")
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "opt_state": ocp.args.StandardRestore(abstract_opt_state)}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["params"], restored["opt_state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
