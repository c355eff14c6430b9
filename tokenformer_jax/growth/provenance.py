"""Where a grown checkpoint came from: a typed record that cli.grow writes and the trainer reads in one call.

A grown checkpoint (params only, step 0) carries its grown TrainConfig (item "config") and this record (item
"extra"); with `optimizer="carry"` also AdamW's grown moments (item "moments", see cli/grow.py). Starting a run
from it (`--init_from`) needs from there: the norm scale the grown function depends on, for
optim.train_only_new_tokens which parameter-token rows growth appended, and whether to carry the moments.
"""
from __future__ import annotations

import dataclasses

from tokenformer_jax.config import PROJECTIONS, ModelConfig, ParamTokens, TrainConfig, from_dict, to_dict

OPTIMIZERS = ("reset", "carry")   # the grown run's AdamW state: fresh (paper App. E), or the source's moments grown


@dataclasses.dataclass(frozen=True)
class Provenance:
  """How a checkpoint was grown: from which run and step, by which init, from which model into which."""
  source: str                # the source run directory
  source_step: int
  init: str                  # zero_keys | random | net2net
  scale: str                 # keep | follow (the norm scale)
  old_noise: float
  seed: int
  old_model: ModelConfig
  new_model: ModelConfig     # as stored in the grown checkpoint's config (its norm scale included)
  optimizer: str = "reset"   # reset | carry (the checkpoint holds AdamW's grown moments); older records: reset

  def to_json(self) -> dict:
    """The "extra" item of the grown checkpoint (the new model is in its "config" item)."""
    record = to_dict(self)
    del record["new_model"]
    return record

  @classmethod
  def from_checkpoint(cls, extra: dict, config: TrainConfig | dict) -> Provenance:
    """The record in a grown checkpoint's "extra" item; `config`: its config (or the config item as saved)."""
    if isinstance(config, dict):
      from tokenformer_jax.run import train_config  # pylint: disable=g-import-not-at-top (run.py imports this)
      config = train_config(config, "the grown checkpoint's config")
    fields = {k: extra[k] for k in ("source", "source_step", "init", "scale", "old_noise", "seed")}
    return cls(**fields, old_model=from_dict(ModelConfig, extra["old_model"]), new_model=config.model,
               optimizer=extra.get("optimizer", "reset"))

  def adopt(self, cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """`cfg` with the norm scale the grown function depends on: a config that leaves the scale unset takes the
    checkpoint's (else training would switch to sqrt(new n) and undo the function-preserving growth); one that
    sets a different scale is refused. Also the note to log, if the scale was taken."""
    saved, current = self.new_model.norm_scale_tokens, cfg.model.norm_scale_tokens
    if saved is None or cfg.model.norm_scale != "fixed":
      return cfg, None
    if current is None:
      note = f"norm scale taken from {self.source} grown checkpoint: sqrt of {to_dict(saved)}"
      return cfg.replace(model=cfg.model.replace(norm_scale_tokens=saved)), note
    if current != saved:
      raise ValueError(f"the checkpoint was grown with norm_scale_tokens={to_dict(saved)} but the config sets "
                       f"{to_dict(current)}; leave model.norm_scale_tokens unset to use the checkpoint's")
    return cfg, None

  def new_token_rows(self, cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """The rows [n_old, n_new) of each Pattention that growth appended (for optim.train_only_new_tokens)."""
    old = self.old_model.param_tokens or ParamTokens(0, 0, 0, 0, 0)
    return {p: (old.as_dict()[p], cfg.model.tokens(p)) for p in PROJECTIONS}


def read_provenance(path) -> Provenance | None:
  """The record of the checkpoint at `path` (a run directory), or None if cli.grow did not make it."""
  from tokenformer_jax.run import RunDir  # pylint: disable=g-import-not-at-top (run.py imports this module)
  with RunDir(path) as run:
    return run.provenance()


def start_from_grown(cfg: TrainConfig, init_from: str | None) -> tuple[TrainConfig, dict | None, list[str]]:
  """Everything the trainer takes from `--init_from`, in one call: (the config with the checkpoint's norm
  scale adopted, the rows to train for optim.train_only_new_tokens or None, notes to log)."""
  grown = read_provenance(init_from) if init_from else None
  notes = []
  if grown is not None:
    cfg, note = grown.adopt(cfg)
    notes += [f"grown from {grown.source} at step {grown.source_step} ({grown.init}, optimizer {grown.optimizer})"]
    notes += [note] if note else []
  if not cfg.optim.train_only_new_tokens:
    return cfg, None, notes
  if grown is None:
    raise ValueError("optim.train_only_new_tokens needs --init_from a checkpoint made by tokenformer_jax.cli.grow "
                     "(it records which tokens are new)")
  return cfg, grown.new_token_rows(cfg), notes
