"""`RunDir`: the one owner of a run directory on disk, what is where in it and how each piece is read and written.

  RUN/
    checkpoints/<step>/     Orbax checkpoints (checkpoint.py: params, opt_state, data_position, job, config,
                            checksums); a grown or imported run: params only, at step 0, its record in `extra`
    config.json             the TrainConfig the trainer last started the run with
    metrics.jsonl           one JSON object per logged step (train/logger.py)
    tensorboard/            event files
    logs/                   library log lines (train.log, grow.log, ...)
  LADDER/<stage>/           a ladder's stage is a run; `LADDER/<stage>_grown/` is a run too: the stage before,
                            grown into <stage>'s model (`RunDir.grown`)

A run's config is read back from a checkpoint (`config(step)`) or from config.json (`written_config()`), both
through `train_config`; its record says whether it was grown (growth.Provenance) or imported (`Imported`); its
tokenizer comes with the one vocabulary check; its parameters are restored onto a mesh through the sharding table.
New runs (grow, import) are made by `RunDir.create`, which refuses a destination the way every tool does
(fileio.check_destination), and written by `write_checkpoint`, complete or not at all (checkpoint.write_new_run,
over fileio's one atomic writer). It is a record of a directory, not a trainer: training happens in train/.
"""
from __future__ import annotations

import dataclasses
import json

from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.config import TrainConfig, from_dict, to_dict
from tokenformer_jax.data.errors import DataError

CHECKPOINTS, CONFIG, METRICS, LOGS, TENSORBOARD = "checkpoints", "config.json", "metrics.jsonl", "logs", "tensorboard"
TRACKER = "tracker.json"                # the W&B run's id (train/logger.py)
GROWN = "_grown"                        # LADDER/<stage>_grown: the grown start of a ladder's stage
COMMIT_MARKER = "commit_success.txt"    # what Orbax writes last into a step on GCS (locally it renames the step)


def train_config(values, where) -> TrainConfig:
  """A saved config (a checkpoint's config item, or config.json) → its TrainConfig; the one reader of them."""
  if not isinstance(values, dict) or "model" not in values:
    from tokenformer_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
    raise CheckpointError(f"{where} has no run config; was it written by tokenformer_jax?")
  return from_dict(TrainConfig, values)


def vocabulary_mismatch(tokenizer, cfg: TrainConfig, *, trained: bool = True) -> str | None:
  """The one vocabulary check: None when `tokenizer` has the pieces `cfg`'s model has, else the line saying so
  and what to do (a trained run: use its own tokenizer; a new one, `trained=False`: make them equal)."""
  pieces, vocab = tokenizer.vocab_size, cfg.model.vocab_size
  if pieces == vocab:
    return None
  if trained:
    return (f"the tokenizer {tokenizer.path} has {pieces} pieces but the model {cfg.model.name} was trained with "
            f"vocab_size={vocab}; use the tokenizer it was trained with (its config's data.tokenizer is "
            f"{cfg.data.tokenizer})")
  return (f"the tokenizer {cfg.data.tokenizer} has {pieces} pieces but model.vocab_size is {vocab}; make them "
          f"equal (--set model.vocab_size={pieces}, or another tokenizer)")


def load_tokenizer(cfg: TrainConfig, *, trained: bool = True):
  """`cfg.data.tokenizer`, loaded and checked against the model's vocabulary (a DataError if it does not fit)."""
  from tokenformer_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer.load(cfg.data.tokenizer)
  if (mismatch := vocabulary_mismatch(tokenizer, cfg, trained=trained)) is not None:
    raise DataError(mismatch)
  return tokenizer


def read_metrics(path) -> dict[str, dict[int, float]]:
  """metrics.jsonl → {key: {step: value}}; the last occurrence of a step wins (a resumed run repeats steps)."""
  out: dict[str, dict[int, float]] = {}
  for line in epath.Path(path).read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:   # a line cut short by a kill: the rest is still good
      continue
    step = int(record.pop("step"))
    for key, value in record.items():
      out.setdefault(key, {})[step] = float(value)
  return out


def split_checkpoint(spec: str) -> tuple[str, int | None]:
  """"RUN", "RUN/checkpoints", "RUN/STEP" or "RUN/checkpoints/STEP" → (RUN or RUN/checkpoints as spelled, the step
  or None)."""
  path = epath.Path(spec.rstrip("/"))
  if path.name.isdigit() and not (path / CHECKPOINTS).exists():
    return str(path.parent), int(path.name)
  return str(path), None


@dataclasses.dataclass(frozen=True)
class Imported:
  """Where an imported run came from (cli.import_neox): the authors' weights file and their config.json."""
  imported_from: str         # the weights file, absolute
  neox_config: dict          # its config.json, kept for the export back (interop/neox.py: neox_config)

  def to_json(self) -> dict:
    return {"imported_from": self.imported_from, "neox_config": self.neox_config}


class RunDir:
  """One run directory (local or gs://). Reading opens its checkpoints once, read-only; `close()` (or `with`)."""

  def __init__(self, path):
    """`path`: the run directory, or its checkpoints/ subdirectory (kept as spelled: it is what messages show)."""
    path = epath.Path(str(path).rstrip("/"))
    self.path = path.parent if path.name == CHECKPOINTS else path
    self._reader = None

  def __repr__(self) -> str:
    return f"RunDir({self.path})"

  def __enter__(self) -> RunDir:
    return self

  def __exit__(self, *_) -> None:
    self.close()

  @classmethod
  def parse(cls, spec: str) -> tuple[RunDir, int | None]:
    """"RUN", "RUN/checkpoints", "RUN/STEP" or "RUN/checkpoints/STEP" → (the run, the step or None: its latest)."""
    path, step = split_checkpoint(spec)
    return cls(path), step

  @classmethod
  def create(cls, dst, *, overwrite: bool, source=None, flag: str = "--dst") -> RunDir:
    """A new run at `dst`, after the one refusal of a destination (a file, a non-empty directory without
    `overwrite`, one overlapping `source`: a ValueError in one line). Nothing is written until
    `write_checkpoint`."""
    fileio.check_destination(dst, overwrite=overwrite, source=source, flag=flag)
    return cls(dst)

  @classmethod
  def grown(cls, ladder_dir, stage: str) -> RunDir:
    """LADDER/<stage>_grown: the previous stage's parameters grown into `stage`'s model."""
    return cls(epath.Path(ladder_dir) / f"{stage}{GROWN}")

  # The layout ------------------------------------------------------------------------------------------------
  @property
  def checkpoints_dir(self) -> epath.Path:
    return self.path / CHECKPOINTS

  def step_dir(self, step: int) -> epath.Path:
    return self.checkpoints_dir / str(step)

  @property
  def config_file(self) -> epath.Path:
    return self.path / CONFIG

  @property
  def metrics_file(self) -> epath.Path:
    return self.path / METRICS

  @property
  def logs_dir(self) -> epath.Path:
    return self.path / LOGS

  @property
  def tensorboard_dir(self) -> epath.Path:
    return self.path / TENSORBOARD

  @property
  def tracker_file(self) -> epath.Path:
    """The W&B run this run writes to (train/logger.py), so that a resumed run continues it."""
    return self.path / TRACKER

  # What is there ---------------------------------------------------------------------------------------------
  def has_checkpoints(self) -> bool:
    return self.checkpoints_dir.exists()

  def finished(self, steps: int) -> bool:
    """Whether the checkpoint of step `steps` is complete: a local step directory is renamed into place only
    when complete (Orbax), one on GCS has its commit marker."""
    if fileio.is_remote(self.path):
      return (self.step_dir(steps) / COMMIT_MARKER).exists()
    return self.step_dir(steps).is_dir()

  def is_training_run(self) -> bool:
    """Whether the trainer has written here (its config.json and metrics.jsonl), what the report reads."""
    return self.metrics_file.exists() and self.config_file.exists()

  def metrics(self) -> dict[str, dict[int, float]]:
    return read_metrics(self.metrics_file)

  # Reading ---------------------------------------------------------------------------------------------------
  @property
  def checkpoints(self):
    """The run's checkpoints (checkpoint.RunCheckpoints), opened read-only on first use."""
    if self._reader is None:
      from tokenformer_jax.checkpoint import RunCheckpoints  # pylint: disable=g-import-not-at-top
      self._reader = RunCheckpoints(self.path, read_only=True)
    return self._reader

  def step(self, step: int | None = None) -> int:
    """`None` → the latest complete step; an explicit one must exist (CheckpointError)."""
    return self.checkpoints.resolve_step(step)

  def config(self, step: int | None = None) -> TrainConfig:
    """The config saved in checkpoint `step` (default: the latest)."""
    step = self.step(step)
    return train_config(self.checkpoints.read_json(step), self.step_dir(step))

  def written_config(self) -> TrainConfig:
    """The config the trainer wrote to config.json."""
    return train_config(json.loads(self.config_file.read_text()), self.config_file)

  def record(self, step: int | None = None):
    """How checkpoint `step` (default: the latest) was made, if not by training: a growth.Provenance (cli.grow),
    an `Imported` (cli.import_neox), or None."""
    from tokenformer_jax.growth.provenance import Provenance  # pylint: disable=g-import-not-at-top
    step = self.step(step)
    extra = self.checkpoints.read_json(step, item="extra", default={})
    if "old_model" in extra:
      return Provenance.from_checkpoint(extra, self.config(step))
    if "imported_from" in extra or "neox_config" in extra:
      return Imported(extra.get("imported_from", ""), extra.get("neox_config") or {})
    return None

  def provenance(self, step: int | None = None):
    """The growth.Provenance of a grown checkpoint, else None."""
    record = self.record(step)
    return None if isinstance(record, Imported) else record

  def tokenizer(self, cfg: TrainConfig | None = None):
    """The run's tokenizer (`cfg`'s, default: its latest checkpoint's config), checked against its vocabulary."""
    return load_tokenizer(cfg if cfg is not None else self.config())

  def params(self, model, mesh, preset: str, step: int | None = None):
    """Checkpoint `step`'s parameters (default: the latest), verified, placed on `mesh` by the sharding table's
    `preset` (each array carries its sharding)."""
    from tokenformer_jax import sharding  # pylint: disable=g-import-not-at-top
    abstract, _ = sharding.place(model, mesh, preset)
    return self.checkpoints.restore_params(abstract, step)

  # Writing ---------------------------------------------------------------------------------------------------
  def write_config(self, cfg: TrainConfig) -> None:
    fileio.write_json(self.config_file, to_dict(cfg))

  def write_checkpoint(self, *, params, config: TrainConfig, record=None, moments=None, files=(),
                       save_concurrent_gb: float | None = None) -> None:
    """The run's params-only checkpoint at step 0 with `config` and `record` (a Provenance or an Imported), and
    `files` copied beside it, complete or not there at all (every process of the job calls it)."""
    from tokenformer_jax.checkpoint import write_new_run  # pylint: disable=g-import-not-at-top
    write_new_run(self.path, params=params, config=to_dict(config), moments=moments, files=files,
                  extra=None if record is None else record.to_json(), save_concurrent_gb=save_concurrent_gb)

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None
