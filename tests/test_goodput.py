"""Where a run's time went: the event log (train/events.py), goodput and badput (goodput.py, cli.report
--goodput), profiles and the hang watch.

The slow test is one run through two jobs of 2 processes (launch.local): the first with a step made 2.5 s slower
on process 0, a profile of two steps and a hang (every process stuck at step 6) that the watch dumps and ends
with exit code 75; the second resumes it from step 3 and finishes. Everything else is checked in this process
on event logs with known times.
"""
from __future__ import annotations

import gzip
import json
import time

import jax
import numpy as np
import pytest
from helpers import TEST_RUN, exit_codes, launch_local, run_main

from tokenformer_jax import goodput
from tokenformer_jax.config import DiagnosticsConfig, apply_overrides, load_config
from tokenformer_jax.train.events import HANG_EXIT_CODE, EventLog, RunEvents, read_events


def write_log(path, events) -> None:
  log = EventLog(path / "events.jsonl")
  for kind, start, end, step, details in events:
    log.write(kind, start, end, step, **details)
  log.close()


# Two attempts with known times (seconds from 1000): the first runs steps 1-2 (step 2 slow by 3 s), saves at
# step 2, runs steps 3-4, hangs in step 5 and exits; 4 s later the second restores step 2 and runs steps 3-5 again.
KNOWN = [
    ("startup", 1000, 1010, None, {}), ("compile", 1010.5, 1012, 1, {"phase": "compile"}),
    ("step", 1010, 1013, 1, {"data": 0.5}), ("step", 1013, 1017, 2, {"data": 0}),
    ("checkpoint_save", 1017, 1018, 2, {}), ("step", 1018, 1019, 3, {"data": 0}),
    ("step", 1019, 1020, 4, {"data": 0.25}), ("eval", 1020, 1022, 4, {}),
    ("hang", 1022, 1030, 5, {"dump": "log"}), ("hang", 1030, 1032, 5, {"exit": 75}),
    ("startup", 1036, 1040, 2, {}), ("checkpoint_restore", 1038, 1039, 2, {}), ("restart", 1039, 1039, 2, {}),
    ("step", 1040, 1041, 3, {"data": 0}), ("step", 1041, 1042, 4, {"data": 0}), ("step", 1042, 1043, 5, {"data": 0}),
    ("end", 1043, 1043, None, {"how": "done"}),
]


def test_buckets_of_a_known_log_add_up_and_count_lost_steps(tmp_path):
  write_log(tmp_path, KNOWN)
  g = goodput.load(tmp_path)[0]
  # step 1: 0.5 s data wait, 1.5 s compile inside it; steps 3 and 4 of the first attempt lost (computed again)
  want = {"productive": 1 + 4 + 1 + 1 + 1, "lost": 1 + 0.75, "data_wait": 0.75, "compile": 1.5,
          "checkpoint_save": 1, "eval": 2, "hang": 10, "startup": 10 + 3, "checkpoint_restore": 1, "down": 4}
  assert g.wall_s == 43 and sum(g.seconds.values()) == pytest.approx(43, abs=1e-9)
  for bucket in goodput.ALL_BUCKETS:
    assert g.seconds[bucket] == pytest.approx(want.get(bucket, 0.0), abs=1e-6), bucket
  assert g.goodput == pytest.approx(8 / 43)
  assert (g.steps, g.lost_steps, g.attempts, g.restarts, g.hangs) == (5, 2, 2, 1, 1)
  # the median leaves out each attempt's first step (1, and 3 of the second): step 2's 3 extra seconds
  assert g.median_step_s == 1 and g.slow_steps == [(2, 4, 3)]


def test_a_ladder_is_each_stage_and_their_total(tmp_path):
  for name, offset in (("stage_b", 100), ("stage_a", 0)):
    (tmp_path / name).mkdir()
    write_log(tmp_path / name, [(k, s + offset, e + offset, st, d) for k, s, e, st, d in KNOWN])
  runs = goodput.load(tmp_path)
  assert [g.name for g in runs] == ["stage_a", "stage_b"]   # in the order they ran
  both = goodput.total(runs)
  assert both.wall_s == 86 and both.lost_steps == 4 and both.seconds["productive"] == pytest.approx(16)
  png, md, _ = goodput.write_goodput([tmp_path], tmp_path / "out")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| **goodput** | **18.6%** | **18.6%** | **18.6%** |" in md.read_text()


def test_the_log_skips_a_torn_line_and_the_next_attempt_drops_it(tmp_path):
  write_log(tmp_path, KNOWN[:2])
  with open(tmp_path / "events.jsonl", "a", encoding="utf-8") as f:
    f.write('{"kind": "step", "start": 10')   # a kill mid-line
  assert [e["kind"] for e in read_events(tmp_path)] == ["startup", "compile"]
  write_log(tmp_path, KNOWN[2:3])
  assert [e["kind"] for e in read_events(tmp_path)] == ["startup", "compile", "step"]
  assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 3


def test_recorder_writes_activities_compiles_cache_misses_and_how_it_ended(tmp_path):
  events = RunEvents(tmp_path, DiagnosticsConfig(), writer=True)
  events.started((time.time(), time.time()), 7, loop_start=time.time())
  events.begin("step", 8)
  time.sleep(0.05)
  events.data_ready()
  jax.monitoring.record_event("/jax/compilation_cache/cache_misses")   # as JAX's cache says before compiling
  jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))
  events.begin("eval", 8)
  try:
    raise KeyError("stop")
  except KeyError:
    events.close()
  logged = read_events(tmp_path)
  kinds = [e["kind"] for e in logged]
  assert kinds[:3] == ["startup", "checkpoint_restore", "restart"] and kinds[-3:] == ["step", "eval", "end"]
  compiles = [e for e in logged if e["kind"] == "compile"]
  assert {e["phase"] for e in compiles} == {"trace", "lower", "compile"} and all(e["step"] == 8 for e in compiles)
  assert [e.get("cache") for e in compiles if e["phase"] == "compile"] == ["miss"]
  step = next(e for e in logged if e["kind"] == "step")
  assert step["data"] >= 0.05 and step["end"] - step["start"] > step["data"]
  assert logged[-1]["how"] == "failed"


def test_the_watch_dumps_every_thread_on_a_step_over_the_limit(tmp_path):
  dump = tmp_path / "train.log"
  cfg = DiagnosticsConfig(hang_factor=5, hang_min_s=0.3)
  events = RunEvents(tmp_path, cfg, writer=True, library_log=str(dump))
  for step in (1, 2, 3):
    events.begin("step", step)
    time.sleep(0.01)
  events.begin("eval", 3)
  time.sleep(0.6)              # not a step: not watched
  events.begin("step", 4)
  time.sleep(0.8)              # over max(5 × ~0.01, 0.3) s
  events.close()
  text = dump.read_text()
  assert text.count("--- hang: step 4 has run") == 1 and "test_goodput.py" in text
  hangs = [e for e in read_events(tmp_path) if e["kind"] == "hang"]
  assert len(hangs) == 1 and hangs[0]["step"] == 4 and 0.3 <= hangs[0]["end"] - hangs[0]["start"] < 0.6


def test_diagnostics_settings_are_checked():
  cfg = load_config("experiments/demo.py:test_run")
  assert apply_overrides(cfg, ["diagnostics.profile_steps=3:5"]).diagnostics.profile_steps == "3:5"
  for bad, phrase in (("profile_steps=5:5", "A:B with 1 <= A < B"), ("profile_hosts=first", "'all' or process"),
                      ("hang_factor=0.5", "0 (off) or > 1"), ("hang_exit_s=-1", "diagnostics.hang_exit_s")):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
      apply_overrides(cfg, [f"diagnostics.{bad}"])


def report_main(capsys, *args: str) -> tuple[int, str, str]:
  """cli.report's main in this process, `--goodput` and `args` on its command line: (exit code, stdout, stderr)."""
  from tokenformer_jax.cli import report as cli
  return run_main(cli, capsys, "--goodput", *args)


def test_report_goodput_of_a_directory_without_events_is_one_line(tmp_path, capsys):
  code, _, err = report_main(capsys, str(tmp_path))
  assert code == 1
  # (where library lines go is said with the first one, which in this process may come now, after earlier tests)
  assert [line for line in err.strip().splitlines() if not line.startswith("library log lines go to ")] == [
      f"error: {tmp_path} has no events.jsonl, nor any run directory with one (runs trained before the event log "
      "have none)"]


# A real run: two jobs of 2 processes ----------------------------------------------------------------------------
DRIVER = """
import os, sys, time
from absl import app
from tokenformer_jax.cli import train as train_cli
from tokenformer_jax.train import steps
slow, hang, make = int(os.environ.get("SLOW_STEP", 0)), int(os.environ.get("HANG_STEP", 0)), steps.make_train_step
def patched(*args, **kwargs):
  step_fn, calls = make(*args, **kwargs), [0]
  def step(state, batch):
    calls[0] += 1
    if calls[0] == slow and os.environ["JAX_PROCESS_ID"] == "0":
      time.sleep(float(os.environ["SLOW_S"]))
    if calls[0] == hang:
      time.sleep(600)
    return step_fn(state, batch)
  return step
steps.make_train_step = patched
app.run(train_cli.main, argv=["train", *sys.argv[1:]])
"""
RUN = (TEST_RUN, "--set=steps=6", "--set=checkpoint_every=3", "--set=eval_every=6", "--set=eval_batches=1",
       "--set=log_every=1")
SLOW_S = 2.5


def outermost(events: list[dict], name: str) -> list[dict]:
  """Trace events called `name` that no other one of them encloses."""
  spans = sorted((e for e in events if e.get("name") == name and e.get("ph") == "X"), key=lambda e: e["ts"])
  out = []
  for e in spans:
    if not out or e["ts"] >= out[-1]["ts"] + out[-1]["dur"]:
      out.append(e)
  return out


@pytest.mark.slow
def test_a_run_with_a_slow_step_a_profile_a_hang_and_a_restart(tmp_path, capsys):
  run, env = tmp_path / "run", {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  hung = launch_local(2, 1, "-c", DRIVER, *RUN, f"--workdir={run}", "--set=diagnostics.profile_steps=4:6",
                      "--set=diagnostics.hang_factor=20", "--set=diagnostics.hang_min_s=4",
                      "--set=diagnostics.hang_exit_s=1",
                      env={**env, "SLOW_STEP": "2", "SLOW_S": str(SLOW_S), "HANG_STEP": "6"})
  assert exit_codes(hung) == {0: HANG_EXIT_CODE, 1: HANG_EXIT_CODE}, hung.stdout[-3000:]
  assert "exiting with code 75 so that the launcher restarts the job" in hung.stdout
  for log in ("train.log", "train.1.log"):   # every process dumps its own threads
    dump = (run / "logs" / log).read_text().split("--- hang: step 6 has run", 1)[1]
    assert 'File "<string>"' in dump and "in train" in dump and "loop.py" in dump, dump[:2000]
  hangs = [e for e in read_events(run) if e["kind"] == "hang"]
  assert [(e["step"], e.get("exit")) for e in hangs] == [(6, None), (6, HANG_EXIT_CODE)]
  assert hangs[0]["end"] - hangs[0]["start"] >= 4 and hangs[1]["end"] - hangs[1]["start"] >= 1   # the two limits

  resumed = launch_local(2, 1, "-c", DRIVER, *RUN, f"--workdir={run}", env=env)
  assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stdout[-3000:]

  g = goodput.load(run)[0]
  assert sum(g.seconds.values()) == pytest.approx(g.wall_s, rel=1e-9)
  assert g.seconds["unaccounted"] <= 0.02 * g.wall_s
  assert (g.attempts, g.restarts, g.hangs, g.steps) == (2, 1, 1, 6)
  assert g.lost_steps == 2                            # steps 4 and 5: after checkpoint 3, before the hang
  assert 5 <= g.seconds["hang"] < 10                  # 4 s to the dump, 1 s more to the exit (later when loaded)
  slow = {s: extra for s, _, extra in g.slow_steps}   # (a loaded machine may list short ones too)
  assert abs(slow[2] - SLOW_S) <= 0.1 * SLOW_S, (g.slow_steps, g.step_s)
  assert all(extra < 0.2 * SLOW_S for s, extra in slow.items() if s != 2), (g.slow_steps, g.step_s)

  traced = list((run / "profile" / "process_0" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traced) == 1 and not (run / "profile" / "process_1").exists()
  planes = [p.name for p in jax.profiler.ProfileData.from_file(str(traced[0])).planes]
  assert "/host:CPU" in planes
  trace = json.loads(gzip.decompress(next(traced[0].parent.glob("*.trace.json.gz")).read_bytes()))
  assert len(outermost(trace["traceEvents"], "PjitFunction(step_on_mesh)")) == 2   # steps 4 and 5

  with capsys.disabled():
    print(f"\nwall {g.wall_s:.2f} s, unaccounted {g.seconds['unaccounted']:.4f} s, hang {g.seconds['hang']:.2f} s, "
          f"slow step 2: {g.step_s[2]:.3f} s, {slow[2]:.3f} s over the median {g.median_step_s:.4f} s, lost "
          f"{g.lost_steps} steps, goodput {g.goodput:.1%}")
  code, out, err = report_main(capsys, str(run))
  assert code == 0, err[-2000:]
  assert "| steps computed (lost: recomputed) | 6 (2 lost) |" in out
  assert (run / "report" / "goodput.png").read_bytes()[:4] == b"\x89PNG"
