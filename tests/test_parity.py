"""The parity study's baselines and runner: SwiGLU and the "just an FFN?" control against numpy, the sweep's
plan, and a recorded run reproduced from its recorded command."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _harness as h, parity, parity_growth
from helpers import CORPUS
from tokenformer_jax.config import TrainConfig, count_params, from_dict, load_config, non_defaults
from tokenformer_jax.model import abstract_params, init_params
from tokenformer_jax.model.pattention import pattention
from tokenformer_jax.model.transformer import TransformerBlock


def test_the_five_architectures_are_matched_in_parameters():
  counts = {a: count_params(parity.model(a, parity.FULL))["non_embedding"] for a in parity.ARCHITECTURES}
  assert counts["tokenformer"] >= 1_000_000   # the floor
  for arch, count in counts.items():
    assert abs(count / counts["transformer"] - 1) < 0.01, (arch, count)
    # the analytic count is the initialised model's
    assert sum(x.size for x in jax.tree.leaves(abstract_params(parity.model(arch, parity.FULL)))) == \
        count_params(parity.model(arch, parity.FULL))["total"]
  swiglu = parity.model("transformer_swiglu", parity.FULL)
  assert swiglu.mlp_hidden == round(8 * swiglu.d_model / 3) == 427


def test_mlp_control_is_a_two_layer_mlp():
  """Θ = gelu without normalisation: gelu(x·Kᵀ)·V exactly, whatever the number of tokens (no sqrt(n))."""
  rng = np.random.default_rng(0)
  x, k, v = rng.normal(size=(3, 5, 16)), rng.normal(size=(40, 16)) / 4, rng.normal(size=(40, 8))
  out = pattention(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                   normalization="gelu")
  h = x @ k.T
  gelu = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  np.testing.assert_allclose(np.asarray(out), gelu @ v, rtol=1e-5, atol=1e-5)


def test_swiglu_block_computes_silu_gate_times_up():
  cfg = parity.model("transformer_swiglu", parity.SMOKE)
  params = init_params(cfg, jax.random.key(0))
  layer = jax.tree.map(lambda a: np.asarray(a[0]), params["layers"])   # layer 0 of the scan
  assert set(layer) >= {"mlp_gate", "mlp_in", "mlp_out"}
  x = np.random.default_rng(1).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
  dense = lambda name, h: h @ layer[name]["kernel"] + layer[name]["bias"]
  norm = layer["mlp_norm"]
  # The MLP half alone: the block with the attention's output projection zeroed adds only the MLP to x.
  block = dict(layer)
  block["output"] = {"kernel": np.zeros_like(layer["output"]["kernel"]), "bias": np.zeros_like(layer["output"]["bias"])}
  out, _ = TransformerBlock(cfg).apply({"params": block}, jnp.asarray(x))
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  normed = (x - mean) / np.sqrt(var + cfg.layer_norm_eps) * norm["scale"] + norm["bias"]
  gate = dense("mlp_gate", normed)
  expected = x + dense("mlp_out", gate / (1 + np.exp(-gate)) * dense("mlp_in", normed))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-5)


def _records(lrs_losses, arch="transformer", tokens=None):
  tokens = tokens or parity.SMOKE.sweep_tokens
  return {f"{arch}-{lr}": dict(architecture=arch, tokens=tokens, seed=0, learning_rate=lr, final_val_loss=loss)
          for lr, loss in lrs_losses}


def test_sweep_runs_its_grid_then_grows_past_a_winning_edge():
  s = parity.SMOKE
  assert parity.next_sweep_lr({}, "transformer", s) == s.lrs[0]
  done = _records([(s.lrs[0], 5.0), (s.lrs[1], 4.9)])
  assert parity.next_sweep_lr(done, "transformer", s) == s.lrs[2]
  inside = _records([(lr, loss) for lr, loss in zip(s.lrs, (5.0, 4.8, 4.7, 4.9))])
  assert parity.next_sweep_lr(inside, "transformer", s) is None
  low_edge = _records([(lr, loss) for lr, loss in zip(s.lrs, (4.5, 4.8, 4.9, 5.0))])
  assert parity.next_sweep_lr(low_edge, "transformer", s) == s.lrs[0] / 2
  high_edge = _records([(lr, loss) for lr, loss in zip(s.lrs, (5.0, 4.9, 4.8, math.nan))])
  # a diverged run (NaN) is worse than any other: 0.064 wins inside the grid
  assert parity.next_sweep_lr(high_edge, "transformer", s) is None
  rising = _records([(lr, loss) for lr, loss in zip(s.lrs, (5.0, 4.9, 4.8, 4.7))])
  assert parity.next_sweep_lr(rising, "transformer", s) == s.lrs[-1] * 2
  # other architectures' and other lengths' runs don't count
  assert parity.next_sweep_lr({**rising, **_records([(1.0, 1.0)], arch="tokenformer")}, "transformer", s) == 0.256
  assert parity.next_sweep_lr(_records([(s.lrs[0], 4.0)], tokens=10 ** 6), "transformer", s) == s.lrs[0]



def test_a_run_is_named_by_its_non_default_settings():
  """A run's directory survives a config field added later with its default (the study resumes across code
  versions); the non-default settings rebuild the whole config."""
  cfg = parity.config("tokenformer", 0.016, 10 ** 6, 0, parity.SMOKE, str(CORPUS))
  assert from_dict(TrainConfig, non_defaults(cfg)) == cfg
  assert "block_norm" not in non_defaults(cfg)["model"] and "diagnostics" not in non_defaults(cfg)
  assert non_defaults(cfg)["optim"]["learning_rate"] == 0.016
  assert h.run_dir("/r", cfg) == h.run_dir("/r", cfg.replace(model=cfg.model.replace(block_norm="auto")))
  assert h.run_dir("/r", cfg) != h.run_dir("/r", cfg.replace(seed=1)) != h.run_dir("/r", cfg, "parent")
  digits = load_config("experiments/vision.py:digits")
  assert from_dict(TrainConfig, non_defaults(digits)) == digits and "vision" in non_defaults(digits)["model"]

@pytest.mark.slow
def test_study_records_runs_skips_them_and_a_command_reproduces_its_loss(tmp_path, capsys):
  """A smoke sweep of one architecture: every run recorded with the issue's fields, a second start trains
  nothing, and the recorded command (in a fresh workdir) reproduces the final loss to 1e-4."""
  args = [f"--corpus={CORPUS}", "--smoke", "--archs=transformer", "--phase=sweep", f"--out={tmp_path / 'out'}"]
  parity.main([*args, f"--workdir={tmp_path / 'runs'}"])
  runs = parity.records(tmp_path / "out")
  assert len(runs) >= 4
  for record in runs.values():
    assert {"name", "architecture", "non_embedding_params", "tokens", "flops", "learning_rate", "seed",
            "final_val_loss", "command"} <= set(record)
    assert record["tokens"] >= parity.SMOKE.sweep_tokens and math.isfinite(record["final_val_loss"])
  report = json.loads((tmp_path / "out" / "parity.json").read_text())
  assert sorted(r["name"] for r in report["runs"]) == sorted(runs)
  assert "Transformer (GeLU)" in (tmp_path / "out" / "parity.md").read_text()
  capsys.readouterr()
  parity.main([*args, f"--workdir={tmp_path / 'runs'}"])   # everything recorded: nothing trains
  assert "training" not in capsys.readouterr().out
  name, record = next(iter(sorted(runs.items())))
  command = record["command"].split()
  assert command[:3] == ["python", "-m", "experiments.parity"]
  parity.main([*command[3:], f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / 'again'}"])
  line = capsys.readouterr().out.strip().splitlines()[-1]
  reproduced = float(line.split("final validation loss ")[1].split()[0])
  assert abs(reproduced / record["final_val_loss"] - 1) <= 1e-4, line


# The growth phase (experiments/parity_growth.py) ------------------------------------------------------------
def test_growth_ladder_stages_grow_four_fold_and_the_families_match():
  s = parity.FULL
  count = lambda family, stage: count_params(parity_growth.stage_model(family, stage, s))["non_embedding"]
  for family in ("tokenformer", "transformer"):
    sizes = [count(family, stage) for stage in range(parity_growth.STAGES)]
    assert sizes[-1] == count_params(parity.model(family, s))["non_embedding"]   # the top: the study's size
    assert all(abs(b / a - 4) < 0.15 for a, b in zip(sizes, sizes[1:])), (family, sizes)
  for stage in range(parity_growth.STAGES):
    assert abs(count("tokenformer", stage) / count("transformer", stage) - 1) < 0.04, stage
  assert parity_growth.stage_model("tokenformer", 2, s) == parity.model("tokenformer", s)
  widths = [parity_growth.stage_model("transformer", i, s) for i in range(3)]
  assert [(m.d_model, m.n_heads) for m in widths] == [(40, 1), (80, 2), (160, 4)]   # Net2Net: ×2, head size kept


def test_growth_names_parents_and_compute_ratios():
  s = parity.FULL
  top = parity_growth.Growth("tokenformer", 2, "random+carry", 0.016)
  assert top.name(s) == "tokenformer2-random+carry-lr0.016-1250000-s0"
  assert parity_growth.Growth.parse(top.name(s)) == top
  assert parity_growth.Growth.parse("tokenformer-lr0.016-2500000-s0") is None   # a sweep run's name
  assert top.parent == parity_growth.Growth("tokenformer", 1, "random+carry", 0.016)
  assert top.parent.parent == parity_growth.Growth("tokenformer", 0, "scratch", 0.016)
  assert top.parent.parent.parent is None
  assert parity_growth.twin_name("tokenformer", 2, 0.016, s) == "tokenformer-lr0.016-2500000-s0"
  assert parity_growth.twin_name("transformer", 2, 0.004, s) == "transformer2-scratch-lr0.004-2500000-s0"
  # A grown stage: 100 own FLOPs per token, 300 FLOPs before it; loss 5 → 4 → 3 at 0, 10, 20 tokens.
  grown = dict(tokens=20, flops=2000.0, cumulative_flops=2300.0, final_val_loss=3.0,
               curve={"tokens": [0, 10, 20], "val_loss": [5.0, 4.0, 3.0]})
  twin = dict(flops=5000.0, final_val_loss=3.5)   # reached halfway between 10 and 20 tokens: 1500 own FLOPs
  assert parity_growth.ratios(grown, twin) == pytest.approx(((300 + 1500) / 5000, 1500 / 5000))
  assert parity_growth.ratios(grown, dict(flops=5000.0, final_val_loss=2.5)) == (None, None)


@pytest.mark.slow
def test_growth_phase_records_a_chain_that_starts_where_its_parent_ended(tmp_path):
  """The smoke ladder with one recipe: each grown record names its parent, adds its FLOPs to the parent's, and
  (zero_keys, norm scale kept) starts at exactly the parent's final validation loss, moments carried or not."""
  args = parity.argparse.Namespace(corpus=str(CORPUS), smoke=True, out=str(tmp_path / "out"),
                                   workdir=str(tmp_path / "runs"))
  s = parity.SMOKE
  parity_growth.run({"tokenformer": 0.1}, s, args, recipes=("zero_keys+carry",))
  done = parity.records(tmp_path / "out")
  chain = [done[f"tokenformer{i}-{r}-lr0.1-{t}-s0"] for i, r, t in
           ((0, "scratch", s.sweep_tokens), (1, "zero_keys+carry", s.sweep_tokens // 2),
            (2, "zero_keys+carry", s.sweep_tokens // 2))]
  assert {f"tokenformer1-scratch-lr0.1-{s.sweep_tokens}-s0", f"tokenformer-lr0.1-{s.sweep_tokens}-s0"} <= set(done)   # the twins
  for parent, child in zip(chain, chain[1:]):
    assert child["grown_from"] == parent["name"] and child["recipe"] == "zero_keys+carry"
    assert child["cumulative_flops"] == pytest.approx(parent["cumulative_flops"] + child["flops"])
    assert child["curve"]["tokens"][0] == 0
    assert abs(child["curve"]["val_loss"][0] - parent["final_val_loss"]) <= 1e-5
    assert child["non_embedding_params"] > 3 * parent["non_embedding_params"]
  lines = parity_growth.report_lines(done, s, tmp_path / "out")
  assert sum(line.startswith("| TokenFormer stage") for line in lines) == 2
  assert (tmp_path / "out" / "parity_growth.png").stat().st_size > 10_000
