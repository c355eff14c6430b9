"""The loss-spike guard (optim.spike_guard): skip an update whose loss spikes; roll back when they keep coming.

Each step's loss is compared with `spike_factor` × the mean of the last `spike_window` accepted losses (the guard
waits until it has that many). Above it, the jitted step has already kept the parameters and the optimizer state
as they were (steps.make_train_step(guarded=True)): the batch is consumed, not replayed. After `spike_patience`
skipped steps in a row the run restores its newest checkpoint and goes on at half the learning rate (halved
again at each later rollback) for the rest of the run.

The learning-rate factor and every event are kept in WORKDIR/guard.json, so a resumed run goes on at the
factor it had; the window of recent losses starts empty again after a restart or a rollback.
"""
from __future__ import annotations

import collections
import json
import math

from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.config import OptimConfig

FILE = "guard.json"


class SpikeGuard:
  def __init__(self, cfg: OptimConfig, workdir: epath.Path, writer: bool = True):
    """Every process keeps the same guard (the losses are global); only the `writer` writes guard.json."""
    self.writer = writer
    self.factor, self.patience = cfg.spike_factor, cfg.spike_patience
    self.recent = collections.deque(maxlen=cfg.spike_window)
    self.skipped_in_a_row = 0
    self.path = workdir / FILE
    saved = json.loads(self.path.read_text()) if self.path.exists() else {}
    self.lr_scale = float(saved.get("lr_scale", 1.0))
    self.events = list(saved.get("events", []))

  def threshold(self) -> float:
    """The loss above which the next step is skipped (inf until the window is full)."""
    if len(self.recent) < self.recent.maxlen:
      return math.inf
    return self.factor * sum(self.recent) / len(self.recent)

  def observe(self, step: int, loss: float, skipped: bool, threshold: float) -> str | None:
    """Account for one step's result; returns the line to log for a skip or "rollback" when it is time to."""
    if not skipped:
      self.recent.append(loss)
      self.skipped_in_a_row = 0
      return None
    self.skipped_in_a_row += 1
    self._record(step, "skipped", loss=loss, threshold=threshold)
    if self.skipped_in_a_row >= self.patience:
      return "rollback"
    return (f"step {step}: loss {loss:.4f} > {threshold:.4f} ({self.factor:g} × the recent mean): update skipped "
            f"({self.skipped_in_a_row} in a row of {self.patience} allowed)")

  def rolled_back(self, step: int, to_step: int | None) -> str:
    """Halve the learning rate after restoring checkpoint `to_step`; returns the line to log."""
    self.lr_scale /= 2
    self.recent.clear()
    self.skipped_in_a_row = 0
    self._record(step, "rollback", to_step=to_step, lr_scale=self.lr_scale)
    return (f"step {step}: {self.patience} updates skipped in a row: restored checkpoint {to_step}, learning rate "
            f"× {self.lr_scale:g} from now on")

  def _record(self, step: int, kind: str, **fields) -> None:
    self.events.append({"step": step, "event": kind, **fields})
    if self.writer:
      fileio.write_json(self.path, {"lr_scale": self.lr_scale, "events": self.events})
