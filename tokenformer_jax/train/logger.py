"""Where training metrics go: a progress line on the console, TensorBoard event files, metrics.jsonl and, with
logging.wandb set, a Weights & Biases run; and where library log lines go (absl/Orbax/JAX INFO): a log file in
the run, not the console.

Only process 0 writes metrics. metrics.jsonl gets one JSON object per logged step; after a resume, steps that
were re-run appear again and the last occurrence is the one that counts. On a terminal the progress line
rewrites itself; into a file or a pipe every progress line is a line of its own.

The W&B run (WandbSink) gets the run's config, where its starting checkpoint came from (config key "init_from":
a grown checkpoint's provenance or an imported one's source) and every metric written here. Its id is kept in
RUN/tracker.json, so running the same command again (a resume, on any job shape) continues the same W&B run.
The steps a resume re-runs are logged again with equal values (resume is exact): online, W&B ignores steps below
the run's current one; offline, the new file holds them again. logging.wandb_mode=offline writes under RUN/wandb
only, for `wandb sync` later.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import sys
import tempfile
import time

import jax
from etils import epath
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from tokenformer_jax import accelerators, fileio
from tokenformer_jax.run import RunDir


def peak_flops_per_device() -> float | None:
  """Peak dense bf16 FLOP/s of this job's devices, for MFU (tokenformer_jax/accelerators.py's table); None for devices
  not listed there (CPUs), which report no MFU."""
  return accelerators.peak_flops(jax.devices()[0].device_kind)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LibraryLog:
  """A stream for library log lines: held in memory (the newest `capacity` lines) until `attach(path)`, then
  appended to that file. Nothing goes to stderr, so a console read late can never fill up and block."""

  def __init__(self, capacity: int = 20000):
    self.pending: collections.deque[str] = collections.deque(maxlen=capacity)
    self.written = 0
    self.file = None
    self.path: str | None = None
    self.in_file = 0                 # lines written to the file
    self.note: str | None = None     # one line for stderr, said when the file gets its first line

  def write(self, text: str) -> int:
    if self.file is not None:
      self.file.write(text)
      self.in_file += 1
      self.say_note()
    else:
      self.pending.append(text)
      self.written += 1
    return len(text)

  def flush(self) -> None:
    if self.file is not None:
      self.file.flush()

  def isatty(self) -> bool:
    return False

  def say_note(self) -> None:
    if self.note and self.in_file:
      note, self.note = self.note, None
      print(note, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None

  def attach(self, path: str) -> None:
    if self.file is not None:
      if self.path == path:
        return
      self.file.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self.file, self.path = open(path, "a", encoding="utf-8"), path   # noqa: SIM115 (open for the process)
    self.file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    if self.written > len(self.pending):
      self.file.write(f"({self.written - len(self.pending)} earlier lines were dropped)\n")
    self.file.writelines(self.pending)
    self.in_file += len(self.pending)
    self.pending.clear()
    self.file.flush()


_library_log: LibraryLog | None = None


def capture_library_logs() -> None:
  """Send absl's handler (absl, Orbax, JAX and Python warnings all reach it) to a LibraryLog at INFO."""
  global _library_log
  from absl import logging as absl_logging
  if _library_log is None:
    _library_log = LibraryLog()
  absl_logging.use_absl_handler()   # app.run installs it on the root logger; a main that is not absl's does not
  absl_logging.get_absl_handler().python_handler.stream = _library_log
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.captureWarnings(True)


def attach_library_log(directory: str | epath.Path, name: str) -> str | None:
  """Write the captured library lines to DIRECTORY/NAME.log (a local directory; for a gs:// one, the same
  path under the temporary directory). Returns the file, or None when the lines are not captured."""
  if _library_log is None:
    return None
  _library_log.attach(os.path.join(local_directory(directory), f"{name}.log"))
  return _library_log.path


def local_directory(directory: str | epath.Path) -> str:
  """`directory` if it is local; for a gs:// one, the same path under the temporary directory (for the writers
  that need a local file: the library log, W&B)."""
  directory = str(directory)
  if fileio.is_remote(directory):
    return os.path.join(tempfile.gettempdir(), "tokenformer_jax", directory.split("://", 1)[1])
  return directory


def say_with_first_library_line(note: str) -> None:
  """Say `note` on stderr once the log file has a library line (at once if it has one already): a tool whose
  libraries log nothing says nothing."""
  if _library_log is not None:
    _library_log.note = note
    _library_log.say_note()


class WandbSink:
  """One W&B run for the run directory (see the module's docstring); written by process 0 only."""

  def __init__(self, spec: str, mode: str, workdir: str | epath.Path, config: dict, init_from: dict | None):
    import wandb   # pylint: disable=g-import-not-at-top (optional: pip install -e '.[wandb]')
    from wandb.sdk.lib import runid   # pylint: disable=g-import-not-at-top
    run = RunDir(workdir)
    kept = json.loads(run.tracker_file.read_text()) if run.tracker_file.exists() else {}
    if not kept:
      kept = {"wandb_id": runid.generate_id(), "wandb": spec}
      fileio.write_json(run.tracker_file, kept)
    project, _, entity = spec.partition("/")
    self.run = wandb.init(project=project, entity=entity or None, id=kept["wandb_id"], resume="allow",
                          name=run.path.name, dir=local_directory(run.path), mode=mode,
                          config={**config, "init_from": init_from},
                          settings=wandb.Settings(console="off", silent=True))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    self.run.log(metrics, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricsLogger:
  def __init__(self, workdir: str | epath.Path, enabled: bool = True, tracker: WandbSink | None = None):
    self.enabled, self.tracker = enabled, tracker
    run = RunDir(workdir)
    self.tensorboard_dir = run.tensorboard_dir
    self.rewrite = enabled and sys.stdout.isatty()   # a terminal: the progress line rewrites itself
    self.open_line = False
    index = jax.process_index()
    self.library_log = attach_library_log(run.logs_dir, "train" if index == 0 else f"train.{index}")
    if enabled:
      self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
      self.writer = EventFileWriter(str(self.tensorboard_dir))
      self.jsonl = fileio.open_append(run.metrics_file)   # a killed run's torn line dropped

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in metrics.items() if v is not None]
    self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    values = {k: float(v) for k, v in metrics.items() if v is not None}
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    if self.tracker is not None:
      self.tracker.write(step, values)

  def say(self, line: str) -> None:
    if self.enabled:
      self._end_progress()
      print(line, file=sys.stdout, flush=True)

  def progress(self, line: str) -> None:
    """The progress line: rewritten in place on a terminal, a new line into a file or pipe."""
    if self.enabled and self.rewrite:
      sys.stdout.write("\r\x1b[K" + line)
      sys.stdout.flush()
      self.open_line = True
    else:
      self.say(line)

  def _end_progress(self) -> None:
    if self.open_line:
      sys.stdout.write("\n")
      self.open_line = False

  def close(self) -> None:
    if self.enabled:
      self._end_progress()
      self.writer.close()
      self.jsonl.close()
    if self.tracker is not None:
      self.tracker.close()
