"""The trainer end to end (as a user runs it, in subprocesses) and its parts in process."""
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from helpers import TEST_RUN, WANDB_OFFLINE, assert_fails_with_one_line, losses, run_cli, run_params, wandb_runs
from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.config import MeshConfig, OptimConfig, load_config
from tokenformer_jax.model import abstract_params
from tokenformer_jax.train import steps
from tokenformer_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def run(*args, script=None):
  return run_cli("tokenformer_jax.cli.train", *args, script=script)


def final_params(workdir):
  return run_params(workdir, load_config("experiments/demo.py:test_run").model)


def assert_same_run(a, b):
  assert losses(a) == losses(b)          # bitwise: the same program on the same data and state
  for x, y in zip(jax.tree.leaves(final_params(a)), jax.tree.leaves(final_params(b))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_the_uninterrupted_run(trained_run, tmp_path):
  killed = run("SIGKILL", "7", TEST_RUN, f"--workdir={tmp_path}", *WANDB_OFFLINE, script=("tests/train_with_fault.py",))
  assert killed.returncode == -9
  assert max(losses(tmp_path)) == 6
  rerun = run(TEST_RUN, f"--workdir={tmp_path}", *WANDB_OFFLINE)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "at step 4" in rerun.stdout
  assert_same_run(trained_run, tmp_path)
  # The resumed run continues the killed run's W&B run: the same id (RUN/tracker.json), from the step resumed. (The
  # killed one's records may still have been in wandb's buffer: metrics.jsonl is the record that survives a kill.)
  first, second = wandb_runs(tmp_path)
  assert first["id"] == second["id"] == json.loads((tmp_path / "tracker.json").read_text())["wandb_id"]
  assert set(first["history"]) <= set(range(1, 8)) and sorted(second["history"]) == list(range(5, 13))


def test_wandb_offline_run_holds_the_runs_metrics_and_config(trained_run):
  """logging.wandb (offline): every metric of metrics.jsonl at its step, and the run's config."""
  (tracked,) = wandb_runs(trained_run)
  assert tracked["project"] == "tokenformer-tests" and tracked["config"]["model"]["name"] == "test_run"
  assert tracked["config"]["steps"] == 12 and tracked["config"]["init_from"] is None
  logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  assert sorted(tracked["history"]) == list(range(1, 13))
  for row in logged:
    for key, value in row.items():
      if key != "step":
        assert tracked["history"][row["step"]][key] == pytest.approx(value, rel=1e-6), (row["step"], key)
  assert {"eval/loss", "task/tokenformer_local_mc/acc", "task/heldout/perplexity"} <= set(tracked["history"][12])


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_cleanly(trained_run, tmp_path):
  stopped = run("SIGTERM", "5", TEST_RUN, f"--workdir={tmp_path}", script=("tests/train_with_fault.py",))
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert "stopped by SIGTERM at step 5" in stopped.stdout
  assert RunCheckpoints(tmp_path, read_only=True).latest_step() == 5
  rerun = run(TEST_RUN, f"--workdir={tmp_path}")
  assert rerun.returncode == 0 and "at step 5" in rerun.stdout
  assert_same_run(trained_run, tmp_path)


@pytest.mark.slow
def test_init_from_takes_parameters_with_a_fresh_optimizer(trained_run, tmp_path):
  # Learning rate 0: the parameters it saves must be the source's, bit for bit.
  result = run(TEST_RUN, f"--workdir={tmp_path}", f"--init_from={trained_run}", "--set=steps=2",
               "--set=eval_every=2", "--set=optim.learning_rate=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialised parameters from {trained_run}" in result.stdout
  for x, y in zip(jax.tree.leaves(final_params(trained_run)), jax.tree.leaves(final_params(tmp_path))):
    np.testing.assert_array_equal(x, y)
  assert losses(tmp_path)[1] < losses(trained_run)[1] - 0.2   # trained parameters on the same first batch
  assert RunCheckpoints(tmp_path, read_only=True).latest_step() == 2   # a fresh step count


@pytest.mark.slow
def test_bad_corpus_files(tmp_path):
  missing = run(TEST_RUN, f"--workdir={tmp_path}/a", f"--set=data.train_files={tmp_path}/nothing*.jsonl")
  assert_fails_with_one_line(missing, "nothing*.jsonl")
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "oops\n')
  result = run(TEST_RUN, f"--workdir={tmp_path}/b", f"--set=data.train_files={broken}")
  assert_fails_with_one_line(result, "broken.jsonl", "3")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"hello \xff\xfe world")
  assert_fails_with_one_line(run(TEST_RUN, f"--workdir={tmp_path}/c", f"--set=data.train_files={binary}"),
                             "binary.txt")


@pytest.mark.slow
def test_tokenizer_and_model_vocabulary_must_agree(tmp_path):
  result = run(TEST_RUN, f"--workdir={tmp_path}", "--set=model.vocab_size=1000")
  assert_fails_with_one_line(result, "2048", "model.vocab_size")


@pytest.mark.slow
def test_workdir_of_another_model_is_refused_and_kept(trained_run):
  before = sorted(str(p) for p in pathlib.Path(trained_run).rglob("*"))
  result = run(TEST_RUN, f"--workdir={trained_run}", "--set=model.d_model=64")
  assert_fails_with_one_line(result, "different model", "d_model")
  assert sorted(str(p) for p in pathlib.Path(trained_run).rglob("*")) == before


@pytest.mark.slow
def test_nan_loss_stops_without_a_checkpoint(tmp_path):
  result = run(TEST_RUN, f"--workdir={tmp_path}", "--set=optim.learning_rate=1e30", "--set=optim.warmup_steps=0",
               "--set=optim.grad_clip=0")
  assert_fails_with_one_line(result, "loss is", "without saving")
  assert not (tmp_path / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


# In process --------------------------------------------------------------------------------------------
TEST_MODEL = load_config("experiments/demo.py:test_run").model


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  tx = make_optimizer(OptimConfig(), 10)
  mesh_a = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
  _, shard_a = steps.state_shardings(TEST_MODEL, tx, mesh_a, "fsdp")
  state = steps.init_state(TEST_MODEL, tx, shard_a, seed=3)
  assert state.params["layers"]["ffn"]["key_param_tokens"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  saved = RunCheckpoints(tmp_path, keep=1)
  saved.save(1, params=state.params, opt_state={"step": state.step, "opt_state": state.opt_state}, config={})
  saved.wait()
  for mesh_cfg, preset in [(MeshConfig(data=2, fsdp=2, tensor=2), "fsdp_tp"), (MeshConfig(data=1), "dp")]:
    devices = jax.devices()[: abs(mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor)]
    mesh = sharding.make_mesh(mesh_cfg, devices)
    abstract, shardings = steps.state_shardings(TEST_MODEL, tx, mesh, preset)
    params, rest = RunCheckpoints(tmp_path, read_only=True).restore(
        1, abstract.params, {"step": abstract.step, "opt_state": abstract.opt_state})
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((params, rest["opt_state"]))):
      np.testing.assert_array_equal(a, b)
    restored_leaf = params["layers"]["ffn"]["key_param_tokens"]
    assert restored_leaf.sharding == shardings.params["layers"]["ffn"]["key_param_tokens"]


def test_checkpoints_work_under_a_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpoints = RunCheckpoints("runs/relative", keep=1)
  checkpoints.save(3, params=params, opt_state={"step": np.int32(3)}, config={"name": "x"})
  checkpoints.wait()
  restored = RunCheckpoints("runs/relative", read_only=True).restore_params(
      {"w": jax.ShapeDtypeStruct((2, 3), np.float32)})
  np.testing.assert_array_equal(restored["w"], params["w"])
  assert (tmp_path / "runs/relative/checkpoints/3").is_dir()


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  tx = optax.sgd(1.0)   # the update is the averaged gradient itself
  schedule = optax.constant_schedule(1.0)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  _, shardings = steps.state_shardings(TEST_MODEL, tx, mesh, "dp")
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 2048, (8, 33)).astype(np.int32),
           "mask": (rng.random((8, 32)) > 0.2).astype(np.float32)}   # uneven targets per micro-batch
  results = []
  for accum in (1, 4):
    state = steps.init_state(TEST_MODEL, tx, shardings, seed=0)
    state, metrics = steps.make_train_step(TEST_MODEL, tx, schedule, shardings, mesh, accum)(state, batch)
    results.append((state.params, metrics))
  np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_and_weight_decay_mask():
  cfg = OptimConfig(learning_rate=6e-4, warmup_steps=100, min_lr_ratio=0.1)
  schedule = learning_rate_schedule(cfg, 1000)
  assert float(schedule(50)) == pytest.approx(3e-4)
  assert float(schedule(100)) == pytest.approx(6e-4)
  middle = 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + np.cos(np.pi * 450 / 900))   # cosine from 6e-4 down to 6e-5
  assert float(schedule(550)) == pytest.approx(middle, rel=1e-5)
  assert float(schedule(1000)) == pytest.approx(6e-5)
  mask = decay_mask(abstract_params(TEST_MODEL))
  assert mask["layers"]["ffn"]["key_param_tokens"] and mask["embedding"]
  assert not mask["final_norm"]["scale"] and not mask["final_norm"]["bias"]
