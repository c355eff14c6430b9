"""The loss-spike guard (optim.spike_guard): the guarded step itself, and a run with forced spikes in process."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import losses
from tokenformer_jax import sharding
from tokenformer_jax.config import MeshConfig, load_config
from tokenformer_jax.train import loop, steps
from tokenformer_jax.train.optimizer import learning_rate_schedule

TEST_RUN = load_config("experiments/demo.py:test_run")


@pytest.mark.slow
def test_a_skipped_step_changes_nothing_and_lr_scale_halves_the_update():
  cfg = TEST_RUN.model
  tx = optax.adamw(1e-2, weight_decay=0.1)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  _, shardings = steps.state_shardings(cfg, tx, mesh, "dp")
  batch = {"tokens": np.random.default_rng(0).integers(0, 2048, (4, 33)).astype(np.int32),
           "mask": np.ones((4, 32), np.float32)}
  schedule = optax.constant_schedule(1e-2)
  plain = steps.make_train_step(cfg, tx, schedule, shardings, mesh)
  guarded = steps.make_train_step(cfg, tx, schedule, shardings, mesh, guarded=True)
  fresh = lambda: steps.init_state(cfg, tx, shardings, seed=0)
  start = jax.device_get(fresh())
  reference, plain_metrics = plain(fresh(), batch)
  skipped, metrics = guarded(fresh(), batch, np.float32(-np.inf), np.float32(1.0))
  assert float(metrics["skipped"]) == 1.0 and int(skipped.step) == 1
  for a, b in zip(jax.tree.leaves((start.params, start.opt_state)), jax.tree.leaves((skipped.params,
                                                                                       skipped.opt_state))):
    np.testing.assert_array_equal(a, b)
  taken, metrics = guarded(fresh(), batch, np.float32(np.inf), np.float32(1.0))
  assert float(metrics["skipped"]) == 0.0 and float(metrics["loss"]) == float(plain_metrics["loss"])
  for a, b in zip(jax.tree.leaves(taken.params), jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(a, b)
  halved, _ = guarded(fresh(), batch, np.float32(np.inf), np.float32(0.5))
  for p0, full, half in zip(*(jax.tree.leaves(s) for s in (start.params, reference.params, halved.params))):
    # (float32 parameters: each difference carries the rounding of p0 + update, up to an ulp of p0)
    ulp = np.finfo(np.float32).eps * np.max(np.abs(p0))
    np.testing.assert_allclose(half - p0, (full - p0) / 2, rtol=1e-4, atol=2 * ulp)


@pytest.mark.slow
def test_forced_spike_is_skipped_and_forced_divergence_rolls_back(tmp_path, monkeypatch):
  """The 12-step test run on a corpus of one repeated sentence (its loss falls fast), with batches of scrambled
  tokens (a loss near log V) at step 6 (a spike) and at steps 9-10 (two in a row: patience 2): 6 is skipped and
  logged; after 10 the run restores checkpoint 8, halves the learning rate, and finishes. (Twelve steps only
  bring the loss from 8.1 to 4.4: the scrambled batches' 7.9-8.1 is 1.2-1.4 × the mean of the three before,
  while every clean step's loss is below that mean, hence a factor of 1.1.)"""
  corpus = tmp_path / "repeated.jsonl"
  corpus.write_text("".join(json.dumps({"text": "The cat sat on the mat. " * 300}) + "\n" for _ in range(20)))
  cfg = TEST_RUN.replace(optim=TEST_RUN.optim.replace(spike_guard=True, spike_factor=1.1, spike_window=3,
                                                     spike_patience=2, learning_rate=1e-2),
                         data=TEST_RUN.data.replace(train_files=(str(corpus),), validation_fraction=0.1))
  poisoned_calls = {6, 9, 10}
  build_run = loop.build_run

  def build_poisoned_run(*args, **kwargs):
    run = build_run(*args, **kwargs)
    calls = [0]

    def train_step(state, batch, *guard):
      calls[0] += 1
      if calls[0] in poisoned_calls:
        scrambled = jnp.arange(batch["tokens"].size, dtype=jnp.int32).reshape(batch["tokens"].shape) * 7919
        batch = {**batch, "tokens": scrambled % cfg.model.vocab_size}
      return run.train_step(state, batch, *guard)
    return dataclasses.replace(run, train_step=train_step)

  monkeypatch.setattr(loop, "build_run", build_poisoned_run)
  final = loop.train(cfg, str(tmp_path / "run"))
  tmp_path = tmp_path / "run"
  assert np.isfinite(final["eval/loss"])
  record = json.loads((tmp_path / "guard.json").read_text())
  assert [(e["step"], e["event"]) for e in record["events"]] == [(6, "skipped"), (9, "skipped"), (10, "skipped"),
                                                                 (10, "rollback")]
  assert record["events"][-1]["to_step"] == 8 and record["lr_scale"] == 0.5
  assert all(e["loss"] > e["threshold"] for e in record["events"] if e["event"] == "skipped")
  skipped, rates = losses(tmp_path, "train/skipped"), losses(tmp_path, "train/learning_rate")
  assert skipped[6] == 1.0 and skipped[9] == 0.0 and skipped[12] == 0.0   # steps 9-12 re-ran after the rollback
  schedule = learning_rate_schedule(cfg.optim, cfg.steps)
  np.testing.assert_allclose([rates[8], rates[12]], [float(schedule(7)), float(schedule(11)) * 0.5], rtol=1e-6)
  assert sorted(losses(tmp_path)) == list(range(1, 13))
