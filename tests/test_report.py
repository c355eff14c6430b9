"""The report (loss against cumulative FLOPs and tokens) and the growth experiments' smoke modes."""
import json
import shutil

import numpy as np
import pytest
from helpers import REPO, run_cli

from tokenformer_jax import report
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.config import TrainConfig, flops_per_token, from_dict, load_config
from tokenformer_jax.growth import Provenance

# experiments/demo.py:test_run by hand: storage tokens (24, 20, 28, 16, 72) rounded up to 8 = 24+24+32+16+72
# = 168 rows of d=32 keys and values in each of 2 layers, a 2048 × 32 embedding (tied logits), seq 32:
# forward 2·(2·2·168·32 + 2048·32) + 2 layers·2·2·32·32 FLOPs per token; training = 3 × forward.
TEST_RUN_FLOPS_PER_TOKEN = 3 * (2 * (2 * 2 * 168 * 32 + 2048 * 32) + 2 * 2 * 2 * 32 * 32)


@pytest.mark.slow
def test_flop_axis_of_a_known_run(trained_run):
  cfg = load_config(f"{REPO}/experiments/demo.py:test_run")
  assert flops_per_token(cfg.model, cfg.data.seq_len) == TEST_RUN_FLOPS_PER_TOKEN == 546816
  curve = report.load_run(trained_run)
  per_step = TEST_RUN_FLOPS_PER_TOKEN * cfg.global_batch * cfg.data.seq_len
  assert list(curve.eval_steps) == [6, 12] and list(curve.train_steps) == list(range(1, 13))
  np.testing.assert_array_equal(curve.flops(curve.eval_steps), [6 * per_step, 12 * per_step])
  np.testing.assert_array_equal(curve.tokens(curve.eval_steps), [6 * 256, 12 * 256])
  metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
  assert curve.final_eval_loss == [m["eval/loss"] for m in metrics if "eval/loss" in m][-1]


@pytest.mark.slow
def test_ladder_directory_chains_stages_and_the_cli_draws_it(trained_run, tmp_path):
  ladder = tmp_path / "ladder"
  for stage in ("s0", "s1"):
    (ladder / stage).mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):
      shutil.copy(trained_run / name, ladder / stage / name)
  config = json.loads((trained_run / "config.json").read_text())   # what cli.grow leaves: provenance naming s0
  model = from_dict(TrainConfig, config).model
  record = Provenance(source=str(ladder / "s0"), source_step=12, init="zero_keys", scale="keep", old_noise=0.0,
                      seed=0, old_model=model, new_model=model)
  grown = RunCheckpoints(ladder / "s1_grown", keep=None)
  grown.save(0, params={"x": np.zeros(2, np.float32)}, config=config, extra=record.to_json())
  grown.wait()
  grown.close()
  s0, s1 = report.load_ladder(ladder)
  per_step = TEST_RUN_FLOPS_PER_TOKEN * 8 * 32
  assert (s0.name, s0.parent, s0.start_flops) == ("s0", None, 0.0)
  assert (s1.name, s1.parent, s1.start_flops, s1.start_tokens) == ("s1", "s0", 12 * per_step, 12 * 256)
  np.testing.assert_array_equal(s1.flops(s1.eval_steps), [18 * per_step, 24 * per_step])
  # the FLOPs a grown run needs to reach a loss, interpolated between its evaluations
  middle = (s1.eval_loss[0] + s1.eval_loss[1]) / 2
  assert s1.flops_to_reach(middle) == pytest.approx(21 * per_step)
  assert s1.flops_to_reach(s1.eval_loss[1] - 1.0) is None

  result = run_cli("tokenformer_jax.cli.report", str(ladder), f"--out={tmp_path / 'out'}", "--title=two stages")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = (tmp_path / "out" / "report.md").read_text()
  row = f"| s1 | TokenFormer d=32 L=2, tokens 24/72 | 20.5k | s0 | 12 | 6.14k | {report.human(24 * per_step)} |"
  assert row in table, table
  refused = run_cli("tokenformer_jax.cli.report", str(tmp_path / "nothing"))
  assert refused.returncode == 1 and refused.stderr.strip().startswith("error: ")
  assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_every_experiment_runs_in_smoke_mode(tmp_path):
  from experiments import continued_training, growth_pays, theta_ablation, token_cost
  runs, out = tmp_path / "runs", tmp_path / "results"
  growth = growth_pays.run(str(runs), str(out), smoke=True)
  theta = theta_ablation.run(str(runs), str(out), smoke=True)
  continued = continued_training.run(str(runs), str(out), smoke=True)
  cost = token_cost.run(str(runs), str(out), smoke=True)
  for name in ("growth_pays", "theta_ablation", "continued_training", "token_cost"):
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![" in (out / f"{name}.md").read_text() and f"({name}.png)" in (out / f"{name}.md").read_text()

  # growth: each grown stage starts where its parent ended, on both axes, and has a compute ratio entry
  curves = growth["curves"]
  grown = curves["grown_zero_keys_1"]
  assert grown.start_flops == curves["scratch_0_full"].end_flops > 0
  assert grown.start_tokens == curves["scratch_0_full"].end_tokens > 0
  assert set(growth["ratios"]) == {("zero_keys", 1, "scratch_1_full")}
  # the same stage-0 run serves every experiment: trained once
  assert len([p for p in runs.iterdir() if p.name.startswith("tokenformer_x0-")]) == 2   # two Θ (smoke)
  # zero-key growth with the kept scale leaves the loss where it was; the live sqrt(n) moves it
  # (smoke: a 4-step model, so the live scale moves it by only ~5e-4; deterministic, 20× the bound on the kept one)
  assert abs(theta["after_growth"]["keep"][0] - theta["parents"][0]) < 1e-5
  assert abs(theta["after_growth"]["follow"][0] - theta["parents"][0]) > 2e-4
  # continued training: both grown models start on the new corpus from a step-0 evaluation
  for key in ("tokenformer", "transformer"):
    assert continued["curves"][key].eval_steps[0] == 0
  # token cost: the token-token term grows by 12·L·d FLOPs per token per unit of T, with the model's own d
  for tf, tr in cost["pairs"]:
    for model in (tf, tr):
      assert cost["flops"][(model.name, 1024)] - cost["flops"][(model.name, 512)] == 12 * 12 * 512 * model.d_model
    assert tf.d_model == 768
  assert cost["ratios"][("ladder_354m", 512)] > 1.0
