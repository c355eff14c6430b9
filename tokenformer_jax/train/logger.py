"""Where training metrics go: a progress line on the console, TensorBoard event files, and metrics.jsonl.

Only process 0 writes. metrics.jsonl gets one JSON object per logged step; after a resume, steps that were
re-run appear again and the last occurrence is the one that counts.
"""
from __future__ import annotations

import json
import sys
import time

import jax
from etils import epath
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# Peak dense bf16 FLOP/s per device, for MFU. Devices not listed (CPUs) report no MFU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  # The longest matching name wins ("TPU v5 lite" before "TPU v5").
  matches = sorted((name for name in PEAK_FLOPS if kind.startswith(name)), key=len)
  return PEAK_FLOPS[matches[-1]] if matches else None


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
  def __init__(self, workdir: str | epath.Path, enabled: bool = True):
    self.enabled = enabled
    self.tensorboard_dir = epath.Path(workdir) / "tensorboard"
    if enabled:
      self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
      self.writer = EventFileWriter(str(self.tensorboard_dir))
      self.jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in metrics.items() if v is not None]
    self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items() if v is not None}}) + "\n")
    self.jsonl.flush()

  def say(self, line: str) -> None:
    if self.enabled:
      print(line, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self.writer.close()
      self.jsonl.close()
