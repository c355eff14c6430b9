"""Run cli.train, sending this very process a signal before training step N (a deterministic preemption).

  python tests/train_with_fault.py SIGNAL N [cli.train flags...]      (SIGNAL "none": no fault)

For SIGKILL it first waits until checkpoint 4 is complete, so the kill lands after a save (and may land
while a later one is still being written). With FAULT_PROCESS=i in the environment (a job of several processes,
launch.local) only process i faults, at its N-th step call, without waiting, unless FAULT_AFTER=PATH:PATH...
names files to wait for first (the saves the kill must land after). With ROWS_DIR=DIR every process
appends the window ids of each batch it trains on to DIR/rows.jsonl (record_rows).
"""
import json
import os
import pathlib
import signal
import sys
import time

from absl import app

from tokenformer_jax.cli import train as train_cli
from tokenformer_jax.train import steps

signal_name, fault_step = sys.argv[1], int(sys.argv[2])
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
make_train_step = steps.make_train_step


def faulty_make_train_step(*args, **kwargs):
  step_fn = make_train_step(*args, **kwargs)
  calls = [0]

  def step(state, batch):
    calls[0] += 1
    if calls[0] == fault_step and os.environ.get("FAULT_PROCESS", os.environ.get("JAX_PROCESS_ID")) == \
        os.environ.get("JAX_PROCESS_ID"):
      waits = ([pathlib.Path(workdir) / "checkpoints" / "4"] if "FAULT_PROCESS" not in os.environ else
               [pathlib.Path(p) for p in os.environ.get("FAULT_AFTER", "").split(":") if p])
      if signal_name == "SIGKILL":
        deadline = time.time() + 60
        while not all(p.exists() for p in waits) and time.time() < deadline:
          time.sleep(0.05)
      os.kill(os.getpid(), getattr(signal, signal_name))
    return step_fn(state, batch)
  return step


def record_rows(directory: str) -> None:
  """Append, for every batch the train iterator hands out, its job (the coordinator's address), position, process
  and window ids to DIRECTORY/rows.jsonl."""
  from tokenformer_jax.data import pipeline
  take = pipeline.TrainIterator.__next__

  def recording(self):
    position, batch = self.position, take(self)
    with open(os.path.join(directory, "rows.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"job": os.environ.get("JAX_COORDINATOR_ADDRESS", ""), "position": position,
                          "process": self.process_index, "windows": self.last_windows.tolist()}) + "\n")
    return batch
  pipeline.TrainIterator.__next__ = recording


if signal_name != "none":
  steps.make_train_step = faulty_make_train_step
if os.environ.get("ROWS_DIR"):
  record_rows(os.environ["ROWS_DIR"])
app.run(train_cli.main, argv=[sys.argv[0]] + sys.argv[3:])
