"""A trained run's checkpoint → its config, tokenizer and parameters, restored onto a mesh.

The run's own config (saved in every checkpoint) says what model it is; the parameters are restored straight
onto the shardings the sharding table gives them on the mesh (any mesh: the run's, or one set with
`mesh=`), so a model trained on a TPU slice loads on a laptop and the other way round.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath
from jax.sharding import Mesh

from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import CheckpointError, RunCheckpoints
from tokenformer_jax.config import MeshConfig, TrainConfig, apply_overrides, from_dict
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
  config: TrainConfig     # the run's config (model, data, mesh), with any overrides applied
  params: Any             # placed on `mesh` with the sharding table's shardings
  param_shardings: Any
  mesh: Mesh
  tokenizer: Tokenizer
  step: int
  path: str               # the checkpoints/ directory it came from

  @property
  def model(self):
    return self.config.model


def parse_checkpoint(spec: str) -> tuple[str, int | None]:
  """"RUN", "RUN/checkpoints", "RUN/STEP" or "RUN/checkpoints/STEP" → (run or checkpoints dir, step or None)."""
  path = epath.Path(spec.rstrip("/"))
  if path.name.isdigit() and not (path / "checkpoints").exists():
    return str(path.parent), int(path.name)
  return str(path), None


def check_tokenizer(tokenizer: Tokenizer, cfg: TrainConfig) -> None:
  if tokenizer.vocab_size != cfg.model.vocab_size:
    raise DataError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model "
                    f"{cfg.model.name} was trained with vocab_size={cfg.model.vocab_size}; use the tokenizer it "
                    f"was trained with (its config's data.tokenizer is {cfg.data.tokenizer})")


def load_model(checkpoint: str, *, step: int | None = None, overrides=(), mesh: MeshConfig | None = None,
               tokenizer: str | None = None) -> LoadedModel:
  """Load RUN[/STEP] (latest step by default). `overrides`: "field=value" strings applied to the run's config
  (e.g. "mesh.data=-1", "data.seq_len=256"); `mesh` replaces its mesh; `tokenizer` its tokenizer path."""
  sharding.initialize_distributed()   # a multi-host slice: join the other hosts before touching devices
  path, parsed_step = parse_checkpoint(checkpoint)
  checkpoints = RunCheckpoints(path, read_only=True)
  step = checkpoints.resolve_step(step if step is not None else parsed_step)
  saved = checkpoints.read_json(step)
  if "model" not in saved:
    raise CheckpointError(f"{checkpoints.directory / str(step)} has no run config; was it written by tokenformer_jax?")
  cfg = apply_overrides(from_dict(TrainConfig, saved), overrides)
  if mesh is not None:
    cfg = cfg.replace(mesh=mesh)
  if tokenizer:
    cfg = cfg.replace(data=cfg.data.replace(tokenizer=tokenizer))
  tok = Tokenizer.load(cfg.data.tokenizer)
  check_tokenizer(tok, cfg)
  device_mesh = sharding.make_mesh(cfg.mesh)
  abstract, shardings = sharding.place(cfg.model, device_mesh, cfg.mesh.preset)
  params = checkpoints.restore_params(abstract, step)
  checkpoints.close()
  return LoadedModel(cfg, params, shardings, device_mesh, tok, step, str(checkpoints.directory))
