"""Real multi-process jobs on this machine: launch.local starts N processes that join through JAX's distributed
runtime (CPU collectives over gloo), each with its own fake devices, as the hosts of a TPU slice do.

One workdir goes through a whole life (the elastic_run fixture: jobs of 4, 2, 1 and 2 processes; SIGTERM to one
process of 4 and of 2, a process killed outright, reruns): every process of a job stops at the same step, a killed
one stops the others, and the run ends where the uninterrupted 2-process run ends. The grown checkpoint of that
run, made on 2 processes over an existing destination, must equal growth done on one device here.

Resuming on a job of another shape: the run goes 4 processes → 2 → 1 → 2 and must train what an uninterrupted
2-process run trains, step for step, on the very same windows. It (experiments/demo.py:test_run, global batch 8, 8
steps) stops by SIGTERM every 2 steps and is resumed by a job of another shape (helpers.ELASTIC_JOBS): 4 processes ×
1 device, 2 × 2 under the `fsdp` preset, 1 × 4 back under `dp` (a checkpoint of 2 processes resumed by 1: the case
that used to be set aside as `.corrupt`), then 2 × 1, where the 8 rows no longer fit the 2 rows per device of the
checkpointed job and grad_accum becomes 2 (a first 2 × 1 job has a process killed). Every process records the window
ids of each batch it trains on (tests/train_with_fault.py, ROWS_DIR). Older checkpoints, whose data position is
grain's per-process state, are checked in this process.

One file, so that `pytest -n 2 --dist loadfile` builds these runs once.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from helpers import (ELASTIC_JOBS, HELDOUT, JOB_RUN, JOB_STEPS, REPO, TRAINED_RUN_SETS, assert_fails_with_one_line,
                     exit_codes, launch_local, local_mc_accuracy, losses, run_cli, train_job)
from tokenformer_jax.checkpoint import BrokenCheckpoint, CheckpointError, RunCheckpoints
from tokenformer_jax.config import load_config
from tokenformer_jax.data import pipeline
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import Tokenizer
from tokenformer_jax.growth import grow, grown_config, read_provenance
from tokenformer_jax.model import abstract_params
from tokenformer_jax.train.setup import LayoutError, build_run, fit_to_job

pytestmark = pytest.mark.slow   # every test but two starts several processes or uses runs that did

STEPS, BATCH = JOB_STEPS, 8
# Not bitwise: other meshes, presets and accumulation add the same numbers in other orders.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
  """(workdir, each job's result, the steps saved after each job) of helpers.JOB_RUN trained through the jobs of
  helpers.ELASTIC_JOBS, each resuming what the one before saved: 4 processes → 2 → 1 → 2 (killed) → 2."""
  workdir = tmp_path_factory.mktemp("elastic_run") / "run"
  results, saved = [], []
  for processes, devices, flags, fault, fault_process in ELASTIC_JOBS:
    results.append(train_job(workdir, processes, devices, *flags, fault=fault, fault_process=fault_process))
    saved.append(steps_saved(workdir))
  return workdir, results, saved


def steps_saved(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def on_one_device(model):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params(model))


def params(workdir, step=None):
  model = load_config("experiments/demo.py:test_run").model
  if (pathlib.Path(workdir) / "checkpoints" / "0" / "extra").exists():
    model = read_provenance(workdir).new_model
  return jax.device_get(RunCheckpoints(workdir, read_only=True).restore_params(on_one_device(model), step))


def global_rows(workdir: pathlib.Path) -> dict[int, list[int]]:
  """step → the window ids of its global batch in row order (row r of host p of P is row r·P + p), from every
  process's record; a step recorded again (by a job that was killed before it trained it) keeps its last record."""
  parts: dict[int, tuple[str, dict[int, list[int]]]] = {}
  for line in (workdir.parent / f"{workdir.name}-rows" / "rows.jsonl").read_text().splitlines():
    r = json.loads(line)
    step = r["position"] // BATCH + 1
    if step not in parts or parts[step][0] != r["job"]:
      parts[step] = (r["job"], {})   # a later job's record of this step replaces an earlier one
    parts[step][1][r["process"]] = r["windows"]
  out = {}
  for step, (_, hosts) in parts.items():
    batch = [0] * BATCH
    for p, windows in hosts.items():
      batch[p::len(hosts)] = windows
    out[step] = batch
  return out


def corrupt(workdir) -> list[str]:
  return [p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if ".corrupt" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run of helpers.JOB_RUN: one job of 2 processes × 2 devices, its window ids recorded, with
  the trained run's eval.tasks (an lm_eval task, a perplexity)."""
  workdir = tmp_path_factory.mktemp("two_process_reference") / "run"
  result = train_job(workdir, 2, 2, *TRAINED_RUN_SETS)   # with eval.tasks at its last step
  assert result.returncode == 0, result.stdout[-3000:]
  return workdir


def test_four_two_one_two_processes_train_the_uninterrupted_run_on_the_same_windows(reference, elastic_run):
  workdir, results, saved = elastic_run
  for (processes, _, _, fault, _), result in zip(ELASTIC_JOBS, results):
    if fault[0] != "SIGKILL":
      assert result.returncode == 0 and exit_codes(result) == {i: 0 for i in range(processes)}, result.stdout[-3000:]
  assert "resumed" not in results[0].stdout and saved == [[2], [2, 4], [4, 6], [4, 6], [6, 8]]
  for result, (step, before, here) in zip([results[1], results[2], results[4]],
                                          [(2, "4 processes × 1 device", "2 processes × 2 devices"),
                                           (4, "2 processes × 2 devices", "1 process × 4 devices"),
                                           (6, "1 process × 4 devices", "2 processes × 1 device")]):
    assert f"at step {step} (saved by a job of {before}; this one: {here})" in result.stdout, result.stdout[-3000:]
  assert "grad_accum 1 → 2" in results[4].stdout and "global_batch 8 kept" in results[4].stdout
  assert corrupt(workdir) == []
  expected, got = losses(reference), losses(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                             rtol=0, atol=TOLERANCE)
  want_rows, got_rows = global_rows(reference), global_rows(workdir)
  assert sorted(got_rows) == list(range(1, STEPS + 1)) and got_rows == want_rows
  assert len({w for step in want_rows.values() for w in step}) == STEPS * BATCH   # 64 different windows
  for a, b in zip(jax.tree.leaves(params(workdir)), jax.tree.leaves(params(reference)), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE)


def test_tasks_during_a_two_process_job_equal_one_process_on_its_checkpoint(reference):
  """eval.tasks in a job of 2 processes × 2 devices — lm_eval's requests run by both processes in lockstep, the
  perplexity sharded like the validation loss — logged what one process computes on the final checkpoint."""
  from tokenformer_jax.inference import eval_stream, evaluate, load_model
  from tokenformer_jax.inference.lm_eval_adapter import TokenFormerLM
  lines = (reference / "metrics.jsonl").read_text().splitlines()
  (row,) = [json.loads(line) for line in lines if "task/seconds" in line]
  model = load_model(str(reference))
  assert row["step"] == model.step == STEPS
  assert row["task/tokenformer_local_mc/acc"] == pytest.approx(local_mc_accuracy(TokenFormerLM(model=model)), abs=1e-9)
  first_batch = BATCH * model.config.data.seq_len   # JOB_RUN's eval_batches=1: the tasks' batches too
  heldout = evaluate(model, eval_stream(model, files=[str(REPO / HELDOUT)]), max_tokens=first_batch)["loss"]
  assert row["task/heldout/loss"] == pytest.approx(heldout, rel=1e-5)


def test_a_global_batch_the_new_job_cannot_split_is_one_line_and_touches_nothing(elastic_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(elastic_run[0], copy)
  before = sorted(p.name for p in (copy / "checkpoints").iterdir())
  result = run_cli("tokenformer_jax.cli.train", *JOB_RUN, f"--workdir={copy}", devices=3)
  assert_fails_with_one_line(result, "global_batch=8 cannot be split over this job's 3 data-parallel devices",
                             "(1, 2, 4, 8)")
  assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before


# grad_accum for a new shape, and checkpoints whose data position is per process: in this process, no jobs --------
def test_grad_accum_adapts_to_the_rows_a_device_held():
  cfg = load_config("experiments/demo.py:test_run").replace(global_batch=16)
  saved = {"config": {"global_batch": 16, "grad_accum": 1, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}},
           "job": {"processes": 2, "devices": 8}}   # 2 rows per device
  assert fit_to_job(cfg, 8, 1, saved) == (cfg, "")
  assert fit_to_job(cfg, 16, 4, saved) == (cfg, "")                   # more devices: fewer rows each, no change
  fitted, note = fit_to_job(cfg, 2, 1, saved)
  assert fitted.grad_accum == 4 and "grad_accum 1 → 4" in note        # 16 = 4 micro-batches × 2 devices × 2 rows
  after = {"config": {**saved["config"], "grad_accum": 4}, "job": {"processes": 1, "devices": 2}}
  assert fit_to_job(fitted, 2, 1, after) == (fitted, "")               # the same shape again: kept
  back, note = fit_to_job(fitted, 8, 2, after)                         # micro-batches of 4 do not split over 8
  assert back.grad_accum == 1 and "grad_accum 4 → 1" in note
  with pytest.raises(LayoutError, match=r"global_batch=16 cannot be split over this job's 6 data-parallel .*"
                                        r"\(1, 2, 4, 8, 16\)"):
    fit_to_job(cfg, 6, 1, saved)
  assert fit_to_job(cfg, 6, 1, None) == (cfg, "")                      # a new run: build_run's check says it


def legacy(workdir: pathlib.Path, step: int, state: dict, processes: int = 2) -> None:
  """Turn checkpoint `step` into the older form: grain's iterator state per process, no data position, no job."""
  folder = workdir / "checkpoints" / str(step)
  shutil.rmtree(folder / "data_position")
  shutil.rmtree(folder / "job")
  (folder / "data_iterator").mkdir()
  for p in range(processes):
    (folder / "data_iterator" / f"process_{p}-of-{processes}.json").write_text(json.dumps(state))


def test_an_older_per_process_checkpoint_resumes_on_one_process_and_only_damage_is_set_aside(reference, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(reference, copy)
  # 8 steps of 2 hosts: each took 8 batches of 4 rows, grain's state {"next_index": 8}; here 1 process reads it.
  legacy(copy, STEPS, {"next_index": STEPS})
  cfg = load_config("experiments/demo.py:test_run").replace(steps=STEPS)
  tok = Tokenizer.load(cfg.data.tokenizer)
  it = pipeline.make_train_iterator(cfg.data, tok, global_batch=BATCH)
  run = build_run(cfg, jax.devices()[:4], processes=1)
  checkpoints = RunCheckpoints(copy, keep=None)
  assert checkpoints.written_by(STEPS) == {"processes": 2, "devices": None}
  step, _, _ = checkpoints.restore_newest(run.abstract.params, {"step": run.abstract.step,
                                                                "opt_state": run.abstract.opt_state}, it)
  assert step == STEPS and it.position == STEPS * BATCH
  order = grain.MapDataset.range(len(it.windows)).shuffle(seed=cfg.data.shuffle_seed).repeat()   # the global order
  batch = next(it)
  assert it.last_windows.tolist() == [order[i] for i in range(STEPS * BATCH, (STEPS + 1) * BATCH)]
  np.testing.assert_array_equal(batch["tokens"], np.stack([it.windows[order[i]]["tokens"]
                                                           for i in range(STEPS * BATCH, (STEPS + 1) * BATCH)]))
  # A position in another stream (another shuffle seed) is refused by the iterator, in one line.
  with pytest.raises(DataError, match="counts in a stream of"):
    it.set_state({**it.get_state(), "stream": {**it.stream, "seed": 1}})
  # grain's state of worker processes cannot be converted: one line, and the checkpoint stays where it is.
  (copy / "checkpoints" / str(STEPS) / "data_iterator" / "process_0-of-2.json").write_text(
      json.dumps({"workers_state": {"0": {"next_index": 4}}, "last_worker_index": 0}))
  with pytest.raises(CheckpointError, match="grain's per-process state of worker processes"):
    checkpoints.restore_newest(run.abstract.params, {"step": run.abstract.step, "opt_state": run.abstract.opt_state},
                               it)
  checkpoints.close()
  assert corrupt(copy) == []
  # Arrays restored without shardings on another number of devices (the reference had 4, here 8): not damage.
  with pytest.raises(CheckpointError, match="restored here into arrays without shardings") as refused:
    RunCheckpoints(reference, read_only=True).restore_params(abstract_params(cfg.model))
  assert not isinstance(refused.value, BrokenCheckpoint)
  # Damage is not a shape: a checkpoint of today's form that lost its data position is set aside as broken.
  damaged = tmp_path / "damaged"
  shutil.copytree(reference, damaged)
  shutil.rmtree(damaged / "checkpoints" / str(STEPS) / "data_position")
  checkpoints = RunCheckpoints(damaged, keep=None)
  with pytest.raises(CheckpointError, match=f"{STEPS}.corrupt were moved aside as broken"):
    checkpoints.restore_newest(run.abstract.params, {"step": run.abstract.step, "opt_state": run.abstract.opt_state},
                               it)
  checkpoints.close()
  assert corrupt(damaged) == [f"{STEPS}.corrupt"]


# SIGTERM, a killed process, growth on 2 processes: the same run's jobs ------------------------------------------
def test_sigterm_to_one_of_two_or_four_processes_stops_them_all_at_one_step(elastic_run):
  _, results, saved = elastic_run
  for result, processes, step in [(results[0], 4, 2), (results[1], 2, 4)]:   # SIGTERM to process 2, to process 1
    assert result.returncode == 0 and exit_codes(result) == {i: 0 for i in range(processes)}, result.stdout[-3000:]
    assert f"stopped by SIGTERM at step {step}" in result.stdout
  assert saved[:2] == [[2], [2, 4]]   # one checkpoint each, at the step they stopped


def test_a_killed_process_stops_the_others_without_a_launcher_kill(elastic_run):
  _, results, saved = elastic_run
  killed = results[3]
  codes = exit_codes(killed)
  assert codes[1] == 128 + 9 and codes[0] != 0 and killed.returncode != 0, killed.stdout[-3000:]
  assert "killing process" not in killed.stdout   # process 0 noticed on its own (heartbeats), well before 120 s
  assert saved[3] == saved[2]                      # nothing saved by the killed job; the next one resumed (elastic)


def test_grow_on_two_processes_overwrites_once_and_equals_growth_here(elastic_run, tmp_path):
  workdir = elastic_run[0]
  dst = tmp_path / "grown"
  (dst / "checkpoints" / "7").mkdir(parents=True)          # an older checkpoint there: --overwrite replaces it
  (dst / "checkpoints" / "7" / "stale").write_text("old")
  result = launch_local(2, 2, "-m", "tokenformer_jax.cli.grow", f"--src={workdir}", f"--step={STEPS}", "--init=random",
                  "--seed=3", "--config=experiments/demo.py:test_run_grown", f"--dst={dst}", "--overwrite")
  assert result.returncode == 0 and exit_codes(result) == {0: 0, 1: 0}, result.stdout[-3000:]
  assert result.stdout.count("grew test_run") == 1
  assert steps_saved(dst) == [0] and sorted(p.name for p in tmp_path.iterdir()) == ["grown"]   # no leftovers
  provenance = read_provenance(dst)
  assert (provenance.source_step, provenance.init, provenance.seed) == (STEPS, "random", 3)
  old = load_config("experiments/demo.py:test_run").model
  new = grown_config(old, load_config("experiments/demo.py:test_run_grown").model)
  here = jax.jit(lambda p: grow(p, old, new, init="random", rng=jax.random.key(3)))(params(workdir, STEPS))
  assert provenance.new_model == new
  for x, y in zip(jax.tree.leaves(params(dst)), jax.tree.leaves(here), strict=True):
    np.testing.assert_array_equal(x, y)


# The launcher itself, with plain Python children (no JAX): fast --------------------------------------------------
CHILD = """
import os, signal, sys, time
from absl import app, flags
PORT = flags.DEFINE_integer("port", 0, "launch.local has a --port too: a forked child defines its own")
imported = "jax" in sys.modules   # before anything here imports it: a fork of the launcher, which did

def main(argv):
  i = os.environ["JAX_PROCESS_ID"]
  signal.signal(signal.SIGTERM, lambda *_: (print("stopping", i, flush=True), sys.exit(0)))
  print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], "at", os.environ["JAX_COORDINATOR_ADDRESS"], "port",
        PORT.value, "forked" if imported else "fresh", flush=True)
  if i == argv[1]:
    sys.exit(3)
  time.sleep(600)

app.run(main)
"""


@pytest.mark.parametrize("how", ["forked", "fresh"])
def test_the_launcher_streams_forwards_sigterm_and_kills_the_rest_after_a_failure(how, tmp_path):
  """A Python script's processes are forks of the launcher (which imported jax; `python -c` gets a fresh
  interpreter each): either way each has its own flags, environment and signal handlers."""
  (tmp_path / "child.py").write_text(CHILD)
  child = [str(tmp_path / "child.py")] if how == "forked" else ["-c", CHILD]
  command = [sys.executable, "-m", "launch.local", "--processes=3", "--grace_seconds=0.5", "--", "python", *child]
  failed = subprocess.run(command + ["1", "--port=9"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert failed.returncode == 3, failed.stdout
  port = failed.stdout.split("at 127.0.0.1:")[1].split()[0]
  for i in range(3):
    assert f"[{i}] process {i} of 3 at 127.0.0.1:{port} port 9 {how}" in failed.stdout, failed.stdout
  assert exit_codes(failed)[1] == 3 and "killing process 0" in failed.stdout and "killing process 2" in failed.stdout

  launcher = subprocess.Popen(command + ["none"], cwd=REPO, stdout=subprocess.PIPE, text=True)
  seen = []
  while sum("] process " in line for line in seen) < 3:
    seen.append(launcher.stdout.readline())
  launcher.send_signal(signal.SIGTERM)   # as a TPU VM's preemption notice: every process gets it, and exits 0
  out = "".join(seen) + launcher.stdout.read()
  assert launcher.wait(timeout=60) == 0, out
  assert exit_codes(subprocess.CompletedProcess([], 0, out, "")) == {0: 0, 1: 0, 2: 0}
  assert all(f"[{i}] stopping {i}" in out for i in range(3))


CACHE_PROBE = """
import jax, numpy as np
from jax._src import compiler
from tokenformer_jax import sharding
sharding.initialize_distributed()
compiles, xla_compile = [], compiler.backend_compile_and_load   # XLA's compilations in this process (not the
compiler.backend_compile_and_load = lambda *a, **k: compiles.append(1) or xla_compile(*a, **k)   # programs read)
mesh = jax.make_mesh((jax.device_count(),), ("d",))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
x = jax.make_array_from_callback((8, 3), rows, lambda index: np.ones((8, 3), np.float32)[index])
total = jax.jit(lambda a: (a * 3).sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
print("sum", float(total(x)), "compiles", len(compiles), flush=True)
"""


def test_a_cpu_job_compiles_each_program_once_and_every_process_reads_it_from_the_cache(tmp_path):
  """sharding.initialize_distributed keys a CPU job's programs by their devices, the same in every process: in a
  first job only process 0 compiles (the others get its program), and a second job finds it in the persistent
  cache in each of its processes. (jax alone keys them by a fingerprint each CPU process reports differently:
  only process 0 ever hit, and every other process compiled every program at every start.)"""
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  jobs = []
  for _ in range(2):
    result = launch_local(2, 2, "-c", CACHE_PROBE, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if " sum " in line)
    assert [line.split(" compiles ")[0] for line in lines] == ["[0] sum 72.0", "[1] sum 72.0"], lines
    jobs.append([int(line.split(" compiles ")[1]) for line in lines])
  assert jobs[0][0] >= 1 and jobs[0][1] == 0, jobs   # process 0 compiled the job's programs, process 1 none
  assert jobs[1] == [0, 0], jobs                     # and the next job read them, in both processes
