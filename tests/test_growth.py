"""Growth: grow() and Net2Net as pure functions, and the surgery CLI on real checkpoints."""
import hashlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TEST_RUN, assert_fails_with_one_line, losses, run_cli, text_batch
from test_model import trained_looking
from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import RunCheckpoints
from tokenformer_jax.config import PROJECTIONS, MeshConfig, TrainConfig, count_params, load_config, to_dict
from tokenformer_jax.growth import check_growable, grow, grown_config, net2net_widen, nonzero_padding, read_provenance
from tokenformer_jax.model import LanguageModel, abstract_params, init_params, logical_axes

TINY_LADDER = load_config("experiments/tiny.py:tiny_ladder")
TEST_MODEL = load_config("experiments/demo.py:test_run").model
GROWN_TARGET = "--config=experiments/demo.py:test_run_grown"


def grow_cli(*args, devices=1):
  return run_cli("tokenformer_jax.cli.grow", *args, devices=devices)


def tree_digest(path) -> str:
  """A hash of every file under `path`: equal before and after means nothing was written there."""
  digest = hashlib.sha256()
  for file in sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file()):
    digest.update(str(file).encode() + file.read_bytes())
  return digest.hexdigest()


@pytest.mark.parametrize("stages", [(0, 1), (1, 2), (0, 2)])
def test_zero_keys_keep_the_logits_on_real_text_only_with_the_kept_scale(stages):
  old = TINY_LADDER[stages[0]]
  params = trained_looking(old)
  tokens = text_batch(4, 64, offset=40000)
  before = LanguageModel(old).apply({"params": params}, tokens)
  for keep_scale in (True, False):
    new = grown_config(old, TINY_LADDER[stages[1]], keep_scale=keep_scale)
    grown = grow(params, old, new, init="zero_keys", rng=jax.random.key(1))
    after = LanguageModel(new).apply({"params": grown}, tokens)
    difference = float(jnp.max(jnp.abs(after - before)))
    if keep_scale:
      assert difference <= 1e-5
    else:
      assert difference > 1e-2   # the authors' sqrt(new n): the function changes


def test_random_growth_copies_the_prefix_and_draws_new_rows_from_the_init():
  old, target = TINY_LADDER[0], TINY_LADDER[2]
  new = grown_config(old, target)
  params = trained_looking(old)
  grown = grow(params, old, new, init="random", rng=jax.random.key(7))
  assert jax.tree.map(jnp.shape, grown) == jax.tree.map(jnp.shape, abstract_params(new))
  np.testing.assert_array_equal(grown["embedding"], params["embedding"])
  np.testing.assert_array_equal(grown["final_norm"]["scale"], params["final_norm"]["scale"])
  new_rows = {}
  for p in PROJECTIONS:
    n_old, n_new = old.tokens(p), new.tokens(p)
    for name, expected_std in (("key_param_tokens", new.d_model ** -0.5), ("value_param_tokens", n_new ** -0.5)):
      leaf, source = np.asarray(grown["layers"][p][name]), np.asarray(params["layers"][p][name])
      np.testing.assert_array_equal(leaf[:, :n_old], source[:, :n_old])
      assert np.all(leaf[:, n_new:] == 0)                              # padding stays inert
      added = leaf[:, n_old:n_new]
      assert abs(added.std() / expected_std - 1) < 0.05, (p, name, added.std(), expected_std)
      assert abs(added.mean()) < 0.05 * expected_std
      new_rows[p, name] = added
  # Independent draws per layer and per projection.
  keys_q = new_rows["query", "key_param_tokens"]
  assert abs(np.corrcoef(keys_q[0].ravel(), keys_q[1].ravel())[0, 1]) < 0.05
  assert abs(np.corrcoef(keys_q[0].ravel(), new_rows["key", "key_param_tokens"][0].ravel())[0, 1]) < 0.05


def test_old_token_noise_has_the_requested_size():
  old, new = TINY_LADDER[0], grown_config(TINY_LADDER[0], TINY_LADDER[1])
  params = init_params(old, jax.random.key(0))
  grown = grow(params, old, new, rng=jax.random.key(1), old_noise=0.1)
  moved = np.asarray(grown["layers"]["ffn"]["key_param_tokens"][:, :144] - params["layers"]["ffn"]["key_param_tokens"][:, :144])
  assert abs(moved.std() / (0.1 * old.d_model ** -0.5) - 1) < 0.05


@pytest.mark.parametrize("change, phrase", [
    (dict(d_model=128), "d_model"), (dict(n_layers=3), "n_layers"), (dict(n_heads=8), "n_heads"),
    (dict(vocab_size=300), "vocab_size"), (dict(positions="rotary"), "positions"),
    (dict(approximate_gelu=True), "approximate_gelu is False in the old model and True"),   # another function
])
def test_growth_refuses_a_structural_change(change, phrase):
  with pytest.raises(ValueError, match=phrase):
    check_growable(TINY_LADDER[0], TINY_LADDER[1].replace(**change))


def test_growth_refuses_fewer_tokens():
  with pytest.raises(ValueError, match="ffn would shrink from 535 to 144"):
    check_growable(TINY_LADDER[1], TINY_LADDER[0].replace(param_tokens=TINY_LADDER[0].param_tokens.__class__(
        134, 134, 134, 134, 144)))


def test_nonzero_padding_is_detected():
  old = TINY_LADDER[0]   # ffn 144 tokens fit; attention 36 tokens are stored as 40
  params = init_params(old, jax.random.key(0))
  assert nonzero_padding(params, old) == []
  params["layers"]["value"]["value_param_tokens"] = params["layers"]["value"]["value_param_tokens"].at[1, 38].set(1.0)
  assert nonzero_padding(params, old) == ["layers/value/value_param_tokens"]


def test_ladder_124m_grows_into_exactly_the_354m_parameter_count():
  old = load_config("experiments/paper.py:ladder_124m")
  target = load_config("experiments/paper.py:ladder_354m")
  new = grown_config(old, target)
  shapes = jax.eval_shape(lambda p: grow(p, old, new, rng=jax.random.key(0)), abstract_params(old))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count_params(target)["total"] == 357_139_968
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, abstract_params(target))


# The surgery CLI ---------------------------------------------------------------------------------------
def test_cli_growth_preserves_the_loss_and_training_continues_from_it(trained_run, tmp_path):
  source_digest = tree_digest(trained_run)
  grown = tmp_path / "grown"
  result = grow_cli(f"--src={trained_run}", GROWN_TARGET, f"--dst={grown}", "--verify")
  assert result.returncode == 0, result.stderr[-3000:]
  difference = float(re.search(r"difference ([-+0-9.e]+)", result.stdout).group(1))
  assert abs(difference) <= 1e-6
  assert tree_digest(trained_run) == source_digest
  provenance = read_provenance(grown)   # the typed record cli.grow wrote, as the trainer reads it
  assert (provenance.source_step, provenance.init, provenance.old_model) == (12, "zero_keys", TEST_MODEL)

  # One step at learning rate 0 (the warmup's first): the grown model's validation loss equals the source's
  # final one on the same validation batches.
  run = tmp_path / "run"
  result = run_cli("tokenformer_jax.cli.train", GROWN_TARGET, f"--workdir={run}", f"--init_from={grown}",
                   "--set=steps=1", "--set=eval_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "norm scale taken from" in result.stdout
  before = losses(trained_run, "eval/loss")[12]
  after = losses(run, "eval/loss")[1]
  assert abs(after - before) <= 1e-5, (before, after)


def save_on_mesh(directory, model, mesh_cfg, preset):
  devices = jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor]
  mesh = sharding.make_mesh(mesh_cfg, devices)
  shardings = sharding.logical_to_sharding(logical_axes(model), mesh, preset)
  params = jax.jit(lambda: trained_looking(model), out_shardings=shardings)()
  assert params["layers"]["ffn"]["key_param_tokens"].sharding.spec[1] == "tensor"
  checkpoints = RunCheckpoints(directory, keep=1)
  checkpoints.save(5, params=params, config=to_dict(TrainConfig(model=model)))
  checkpoints.wait()


def test_cli_grows_a_checkpoint_from_one_mesh_onto_others_with_the_same_result(tmp_path):
  save_on_mesh(tmp_path / "src", TEST_MODEL, MeshConfig(data=1, fsdp=2, tensor=4), "fsdp_tp")
  common = (f"--src={tmp_path / 'src'}", GROWN_TARGET, "--init=random", "--seed=3")
  on_4x2 = grow_cli(*common, f"--dst={tmp_path / 'a'}", "--set=mesh.data=1", "--set=mesh.fsdp=4",
                    "--set=mesh.tensor=2", "--set=mesh.preset=fsdp_tp", devices=8)
  on_1 = grow_cli(*common, f"--dst={tmp_path / 'b'}")
  assert on_4x2.returncode == 0 and on_1.returncode == 0, (on_4x2.stderr[-2000:], on_1.stderr[-2000:])
  target = load_config("experiments/demo.py:test_run_grown").model
  a, b = (RunCheckpoints(tmp_path / d, read_only=True).restore_params(abstract_params(target)) for d in "ab")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_cli_refusals_say_why_and_touch_nothing(trained_run, tmp_path):
  source_digest = tree_digest(trained_run)
  assert_fails_with_one_line(grow_cli(f"--src={trained_run}", TEST_RUN, "--set=model.d_model=64",
                                      f"--dst={tmp_path / 'a'}"), "d_model")
  assert_fails_with_one_line(grow_cli(f"--src={trained_run}", TEST_RUN, "--set=model.param_tokens.ffn=8",
                                      f"--dst={tmp_path / 'b'}"), "ffn would shrink")
  assert_fails_with_one_line(grow_cli(f"--src={trained_run}", GROWN_TARGET, f"--dst={trained_run}/inside"),
                             "overlaps the source")
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  assert_fails_with_one_line(grow_cli(f"--src={trained_run}", GROWN_TARGET, f"--dst={occupied}"),
                             "not empty", "--overwrite")
  assert (occupied / "keep.txt").read_text() == "mine"
  assert_fails_with_one_line(grow_cli(f"--src={tmp_path / 'nothing'}", GROWN_TARGET, f"--dst={tmp_path / 'c'}"),
                             "no checkpoints")
  assert tree_digest(trained_run) == source_digest
  assert not any((tmp_path / d).exists() for d in "abc")


def test_training_only_the_new_tokens_leaves_everything_else_untouched(trained_run, tmp_path):
  grown = tmp_path / "grown"
  assert grow_cli(f"--src={trained_run}", GROWN_TARGET, f"--dst={grown}", "--init=random").returncode == 0
  run = tmp_path / "run"
  result = run_cli("tokenformer_jax.cli.train", GROWN_TARGET, f"--workdir={run}", f"--init_from={grown}",
                   "--set=steps=3", "--set=eval_every=3", "--set=optim.warmup_steps=1",
                   "--set=optim.train_only_new_tokens=true")
  assert result.returncode == 0, result.stderr[-3000:]
  model = load_config("experiments/demo.py:test_run_grown").model
  before = RunCheckpoints(grown, read_only=True).restore_params(abstract_params(model))
  after = RunCheckpoints(run, read_only=True).restore_params(abstract_params(model))
  np.testing.assert_array_equal(before["embedding"], after["embedding"])
  for p in PROJECTIONS:
    n_old = TEST_MODEL.tokens(p)
    for name in ("key_param_tokens", "value_param_tokens"):
      old_rows = slice(None), slice(0, n_old)
      np.testing.assert_array_equal(before["layers"][p][name][old_rows], after["layers"][p][name][old_rows])
      assert not np.array_equal(before["layers"][p][name][:, n_old:model.tokens(p)],
                                after["layers"][p][name][:, n_old:model.tokens(p)])
      assert np.all(np.asarray(after["layers"][p][name][:, model.tokens(p):]) == 0)   # padding stays inert


# Net2Net -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 3])
def test_net2net_widening_keeps_the_logits(factor):
  old = load_config("experiments/tiny.py:tiny_transformer").replace(positions="rotary")
  new = old.replace(d_model=old.d_model * factor, n_heads=old.n_heads * factor)
  params = trained_looking(old)
  tokens = text_batch(2, 48, offset=9000)
  widened = net2net_widen(params, old, new)
  assert count_params(new)["total"] == sum(x.size for x in jax.tree.leaves(widened))
  before = LanguageModel(old).apply({"params": params}, tokens)
  after = LanguageModel(new).apply({"params": widened}, tokens)
  assert float(jnp.max(jnp.abs(after - before))) <= 1e-5
  noisy = net2net_widen(params, old, new, noise=0.01, rng=jax.random.key(0))
  assert 0 < float(jnp.max(jnp.abs(LanguageModel(new).apply({"params": noisy}, tokens) - before))) < 0.5


def test_net2net_refuses_widths_layernorm_cannot_keep():
  old = load_config("experiments/tiny.py:tiny_transformer")
  with pytest.raises(ValueError, match="multiple of d_old"):
    net2net_widen(init_params(old, jax.random.key(0)), old, old.replace(d_model=96, n_heads=6))
  with pytest.raises(ValueError, match="n_heads 8"):
    net2net_widen(init_params(old, jax.random.key(0)), old, old.replace(d_model=128, n_heads=4))


def test_cli_widens_a_transformer_run_by_net2net(tmp_path):
  old = load_config("experiments/demo.py:test_run").model.replace(architecture="transformer", name="dense")
  save_on_mesh_single = RunCheckpoints(tmp_path / "src", keep=1)
  params = trained_looking(old)
  save_on_mesh_single.save(5, params=params, config=to_dict(TrainConfig(model=old)))
  save_on_mesh_single.wait()
  result = grow_cli(f"--src={tmp_path / 'src'}", TEST_RUN, "--set=model.architecture=transformer",
                    "--set=model.d_model=64", "--set=model.n_heads=4", f"--dst={tmp_path / 'wide'}", "--verify")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "net2net" in result.stdout
  assert abs(float(re.search(r"difference ([-+0-9.e]+)", result.stdout).group(1))) <= 1e-6
