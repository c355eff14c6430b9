"""Where a run's time went, as it happens: the event log RUN/events.jsonl; and the two diagnostics that watch the
steps, a jax.profiler trace of chosen steps and a hang watch (config.DiagnosticsConfig).

One JSON object per line, `{"kind", "start", "end", "step", ...details}` (Unix seconds), appended by process 0
with one write per line; a line a kill cut short is dropped when the file is opened again and skipped on read.
Kinds (goodput.py turns them into goodput and badput):

  startup             the process's start (before the imports) until the loop starts; holds the restore
  checkpoint_restore  reading the checkpoint a run resumes from (or a spike-guard rollback's)
  restart             an instant: this attempt continues a run from checkpoint `step` (`tier`: local when
                      the host-local tier's)
  compile             a jit trace, lowering or XLA compilation (`phase`, `fun`; `cache`: hit or miss when
                      JAX's persistent compilation cache answered), from jax.monitoring
  step                one training step, from fetching its batch to the next activity; `data`: the seconds
                      spent waiting for the batch at its start
  eval, checkpoint_save (the checksums and the start of the asynchronous write, or waiting for it; `tier`:
                      local for the host-local tier's), profile
  preemption          SIGTERM seen at `step`: saving and stopping
  hang                a step over the hang limit (until the stack dump), and `exit` when the watch ends it
  end                 an instant: the attempt ended (`how`: done, preempted, failed)
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque

import jax
from etils import epath

from tokenformer_jax import fileio
from tokenformer_jax.config import DiagnosticsConfig

FILE = "events.jsonl"
HANG_EXIT_CODE = 75   # EX_TEMPFAIL: a failure worth retrying (the launcher restarts a job that exits non-zero)
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}
_IMPORTED = time.time()
_first_run_in_process = [True]


def process_start_time() -> float:
  """When this process started (Linux: from /proc, to 10 ms), else when this module was imported."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22, starttime: clock ticks after boot
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_start
  except (OSError, ValueError, IndexError, AttributeError):
    return _IMPORTED


def read_events(path: str | epath.Path) -> list[dict]:
  """The events of RUN/events.jsonl (or of that file), in the order written; torn or garbled lines skipped."""
  path = epath.Path(path)
  path = path / FILE if path.is_dir() else path
  events = []
  for line in path.read_text().splitlines():
    try:
      event = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(event, dict) and {"kind", "start", "end"} <= set(event):
      events.append(event)
  return events


class EventLog:
  """Appends events to one file, one write per line, from any thread (the watch and compiles write too)."""

  def __init__(self, path, enabled: bool = True):
    self.file = fileio.open_append(path) if enabled else None
    self.lock = threading.Lock()

  def write(self, kind: str, start: float, end: float, step: int | None = None, **details) -> None:
    if self.file is None:
      return
    line = json.dumps({"kind": kind, "start": round(start, 6), "end": round(end, 6), "step": step, **details})
    with self.lock:
      if self.file is not None:
        self.file.write(line + "\n")
        self.file.flush()

  def close(self) -> None:
    with self.lock:
      if self.file is not None:
        self.file.close()
        self.file = None


class Profiler:
  """diagnostics.profile_steps=A:B: a jax.profiler trace from the start of step A to the end of step B-1, on the
  processes profile_hosts names, into RUN/profile/process_<i> (TensorBoard's profile plugin, xprof)."""

  def __init__(self, cfg: DiagnosticsConfig, workdir: epath.Path):
    self.first, self.stop = map(int, cfg.profile_steps.split(":")) if cfg.profile_steps else (0, 0)
    index = jax.process_index()
    hosts = cfg.profile_hosts
    self.here = bool(cfg.profile_steps) and (hosts == "all" or index in {int(h) for h in hosts.split(",")})
    self.directory = workdir / "profile" / f"process_{index}"
    self.running = self.done = False

  def at_step(self, step: int, wait=None) -> bool:
    """Called before step `step` runs (`wait`: what the step before computed); True if a trace started or
    stopped."""
    if not self.here:
      return False
    if self.running and step >= self.stop:
      self.finish(wait)
      return True
    if not self.running and not self.done and self.first <= step < self.stop:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.running = True
      return True
    return False

  def finish(self, wait=None) -> None:
    if self.running:
      jax.block_until_ready(wait)   # the traced steps' device work, not only their dispatch
      jax.profiler.stop_trace()
      self.running, self.done = False, True


class HangWatch(threading.Thread):
  """A daemon thread that checks every `poll` seconds how long the current step has run (`RunEvents.current`).

  Over hang_factor × the median of the last steps (and over hang_min_s), once at least `warmup` steps are known:
  every thread's stack is dumped (faulthandler) to `dump_to` and a hang event is written; hang_exit_s later, if
  that step is still running, the process ends with HANG_EXIT_CODE (os._exit: the stuck main thread cannot be
  asked)."""

  def __init__(self, cfg: DiagnosticsConfig, events: RunEvents, dump_to: str | None, *, poll: float = 0.1,
               warmup: int = 3):
    super().__init__(name="tokenformer-hang-watch", daemon=True)
    self.cfg, self.events, self.dump_to, self.poll, self.warmup = cfg, events, dump_to, poll, warmup
    self.durations: deque[float] = deque(maxlen=100)
    self.stopped = threading.Event()
    self.dumped: tuple | None = None   # (step, its start, when dumped)

  def limit(self) -> float | None:
    if len(self.durations) < self.warmup:
      return None
    return max(self.cfg.hang_factor * statistics.median(self.durations), self.cfg.hang_min_s)

  def run(self) -> None:
    while not self.stopped.wait(self.poll):
      current, limit, now = self.events.current, self.limit(), time.time()
      if current is None or current[0] != "step" or limit is None:
        continue
      _, step, start = current
      if self.dumped is None or self.dumped[:2] != (step, start):
        if now - start > limit:
          self.dump(step, start, now, limit)
      elif self.cfg.hang_exit_s and now - self.dumped[2] > self.cfg.hang_exit_s:
        self.exit(step, now)

  def dump(self, step: int, start: float, now: float, limit: float) -> None:
    self.dumped = (step, start, now)
    where = self.dump_to or "stderr"
    header = (f"\n--- hang: step {step} has run {now - start:.1f} s (limit {limit:.1f} s: "
              f"{self.cfg.hang_factor:g} × the median step, at least {self.cfg.hang_min_s:g} s); every thread's "
              f"stack of process {jax.process_index()} (pid {os.getpid()}):\n")
    if self.dump_to:
      with open(self.dump_to, "a", encoding="utf-8") as f:
        f.write(header)
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    else:
      sys.stderr.write(header)
      faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    self.events.log.write("hang", start, now, step, limit=round(limit, 3), dump=where)
    self.events.say(f"step {step} has run {now - start:.1f} s, over the hang limit of {limit:.1f} s: every "
                    f"thread's stack is in {where}"
                    + (f"; exiting in {self.cfg.hang_exit_s:g} s if it is still stuck" if self.cfg.hang_exit_s else ""))

  def exit(self, step: int, now: float) -> None:
    self.events.log.write("hang", self.dumped[2], now, step, exit=HANG_EXIT_CODE)
    self.events.say(f"step {step} still stuck {now - self.dumped[2]:.1f} s after the stack dump: exiting with code "
                    f"{HANG_EXIT_CODE} so that the launcher restarts the job from its last checkpoint")
    self.events.log.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(HANG_EXIT_CODE)


class RunEvents:
  """What the training loop records: one activity at a time on the main thread (`begin` ends the one before),
  the compiles JAX reports, the profiler and the hang watch."""

  def __init__(self, workdir, cfg: DiagnosticsConfig, *, writer: bool, library_log: str | None = None):
    workdir = epath.Path(workdir)
    self.log = EventLog(workdir / FILE, enabled=writer)
    self.writer = writer
    self.current: tuple | None = None    # (kind, step, start) of the open activity
    self.data_s, self.details = 0.0, {}
    self.cache: str | None = None
    self.preempted = False
    self.profiler = Profiler(cfg, workdir)
    self.watch = HangWatch(cfg, self, library_log) if cfg.hang_factor else None
    jax.monitoring.register_event_time_span_listener(self._on_compile)
    jax.monitoring.register_event_listener(self._on_cache)
    if self.watch is not None:
      self.watch.start()

  def say(self, line: str) -> None:
    if self.writer:
      print(line, file=sys.stdout, flush=True)

  def started(self, restore: tuple[float, float], restored_step: int | None, *, loop_start: float,
              **details) -> None:
    """The attempt so far: the process's start (the first run in this process) until the loop, the restore
    (`details`: of the restore, e.g. its tier)."""
    first = _first_run_in_process[0]
    _first_run_in_process[0] = False
    origin = process_start_time() if first else restore[0]
    self.log.write("startup", min(origin, restore[0]), loop_start, restored_step, pid=os.getpid(),
                   processes=jax.process_count(), first_in_process=first)
    if restored_step is not None:
      self.log.write("checkpoint_restore", *restore, restored_step, **details)
      self.log.write("restart", restore[1], restore[1], restored_step, **details)

  def begin(self, kind: str, step: int | None = None, wait=None, **details) -> None:
    """End the open activity and start `kind` (for a step: first start or stop the profile, as its own
    activity; `wait`: the previous step's output, waited for before a trace stops; `details` go in its line)."""
    self.end()
    started = time.time()
    if kind == "step" and self.profiler.at_step(step, wait):
      self.log.write("profile", started, time.time(), step, tracing=self.profiler.running,
                     directory=str(self.profiler.directory))
    self.preempted = self.preempted or kind == "preemption"
    self.current, self.data_s, self.details = (kind, step, time.time()), 0.0, details

  def data_ready(self) -> None:
    """The open step's batch is here: its wait so far was for data."""
    if self.current is not None:
      self.data_s = time.time() - self.current[2]

  def end(self) -> None:
    if self.current is None:
      return
    (kind, step, start), now = self.current, time.time()
    self.current = None
    if kind == "step":
      self.log.write(kind, start, now, step, data=round(self.data_s, 6))
      if self.watch is not None:
        self.watch.durations.append(now - start)
    else:
      self.log.write(kind, start, now, step, **self.details)

  def _on_compile(self, event: str, start: float, end: float, **kwargs) -> None:
    phase = COMPILE_EVENTS.get(event)
    if phase is None:
      return
    details = {"phase": phase, "fun": str(kwargs.get("fun_name", ""))}
    if phase == "compile" and self.cache:
      details["cache"], self.cache = self.cache, None
    self.log.write("compile", start, end, self.current[1] if self.current else None, **details)

  def _on_cache(self, event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_misses":
      self.cache = "miss"
    elif event == "/jax/compilation_cache/cache_hits":
      self.cache = "hit"

  def close(self, wait=None) -> None:
    """The attempt's end (in the loop's `finally`: failed while an exception propagates, else done or
    preempted): the open activity, the profile and the watch too."""
    how = "failed" if sys.exc_info()[0] is not None else "preempted" if self.preempted else "done"
    if self.watch is not None:
      self.watch.stopped.set()
    try:
      self.profiler.finish(wait)
    finally:
      self.end()
      now = time.time()
      self.log.write("end", now, now, how=how)
      jax.monitoring.unregister_event_time_span_listener(self._on_compile)
      jax.monitoring.unregister_event_listener(self._on_cache)
      self.log.close()
