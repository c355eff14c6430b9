"""A trained run's checkpoint → its config, tokenizer and parameters, restored onto a mesh.

The run's own config (saved in every checkpoint) says what model it is; the parameters are restored straight
onto the shardings the sharding table gives them on the mesh (any mesh: the run's, or one set with
`mesh=`), so a model trained on a TPU slice loads on a laptop and the other way round.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from tokenformer_jax import sharding
from tokenformer_jax.config import MeshConfig, TrainConfig, apply_overrides
from tokenformer_jax.data.tokenizer import Tokenizer
from tokenformer_jax.run import RunDir, load_tokenizer, split_checkpoint


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
  return split_checkpoint(spec)


def load_model(checkpoint: str, *, step: int | None = None, overrides=(), mesh: MeshConfig | None = None,
               tokenizer: str | None = None) -> LoadedModel:
  """Load RUN[/STEP] (latest step by default). `overrides`: "field=value" strings applied to the run's config
  (e.g. "mesh.data=-1", "data.seq_len=256"); `mesh` replaces its mesh; `tokenizer` its tokenizer path."""
  sharding.initialize_distributed()   # a multi-host slice: join the other hosts before touching devices
  run, parsed_step = RunDir.parse(checkpoint)
  with run:
    step = run.step(step if step is not None else parsed_step)
    cfg = apply_overrides(run.config(step), overrides)
    if mesh is not None:
      cfg = cfg.replace(mesh=mesh)
    if tokenizer:
      cfg = cfg.replace(data=cfg.data.replace(tokenizer=tokenizer))
    tok = None if cfg.model.vision is not None else load_tokenizer(cfg)   # an image classifier has none
    device_mesh = sharding.make_mesh(cfg.mesh)
    params = run.params(cfg.model, device_mesh, cfg.mesh.preset, step)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return LoadedModel(cfg, params, shardings, device_mesh, tok, step, str(run.checkpoints_dir))
