"""Growth: grow() and Net2Net as pure functions, and the surgery CLI on real checkpoints."""
import contextlib
import dataclasses
import hashlib
import io
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import (TEST_RUN, WANDB_OFFLINE, assert_fails_with_one_line, losses, run_cli, run_params, text_batch,
                     wandb_runs)
from test_model import trained_looking
from test_robustness import data_file, flip_bytes
from tokenformer_jax import sharding
from tokenformer_jax.checkpoint import BrokenCheckpoint, CheckpointError, RunCheckpoints
from tokenformer_jax.config import (PROJECTIONS, MeshConfig, TrainConfig, count_params, from_dict, load_config,
                                    to_dict)
from tokenformer_jax.growth import (Provenance, check_growable, grow, grown_config, net2net_widen, nonzero_padding,
                                    read_provenance, start_from_grown)
from tokenformer_jax.model import LanguageModel, abstract_params, init_params, logical_axes
from tokenformer_jax.train import loop
from tokenformer_jax.train.setup import build_run
from tokenformer_jax.train.steps import loss_sums

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


@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
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
                   "--set=steps=1", "--set=eval_every=1", *WANDB_OFFLINE)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "norm scale taken from" in result.stdout
  (tracked,) = wandb_runs(run)   # the tracker's run names where its parameters came from
  origin = tracked["config"]["init_from"]
  assert (origin["checkpoint"], origin["source"], origin["source_step"], origin["init"]) == (
      str(grown), str(trained_run), 12, "zero_keys")
  before = losses(trained_run, "eval/loss")[12]
  after = losses(run, "eval/loss")[1]
  assert abs(after - before) <= 1e-5, (before, after)


def save_on_mesh(directory, model, mesh_cfg, preset):
  devices = jax.devices()[: mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor]
  mesh = sharding.make_mesh(mesh_cfg, devices)
  shardings = sharding.logical_to_sharding(logical_axes(model), mesh, preset)
  params = jax.device_put(trained_looking(model), shardings)
  assert params["layers"]["ffn"]["key_param_tokens"].sharding.spec[1] == "tensor"
  checkpoints = RunCheckpoints(directory, keep=1)
  checkpoints.save(5, params=params, config=to_dict(TrainConfig(model=model)))
  checkpoints.wait()


@pytest.mark.slow
def test_cli_grows_a_checkpoint_from_one_mesh_onto_others_with_the_same_result(tmp_path):
  save_on_mesh(tmp_path / "src", TEST_MODEL, MeshConfig(data=1, fsdp=2, tensor=4), "fsdp_tp")
  common = (f"--src={tmp_path / 'src'}", GROWN_TARGET, "--init=random", "--seed=3")
  on_4x2 = grow_cli(*common, f"--dst={tmp_path / 'a'}", "--set=mesh.data=1", "--set=mesh.fsdp=4",
                    "--set=mesh.tensor=2", "--set=mesh.preset=fsdp_tp", devices=8)
  on_1 = grow_cli(*common, f"--dst={tmp_path / 'b'}")
  assert on_4x2.returncode == 0 and on_1.returncode == 0, (on_4x2.stderr[-2000:], on_1.stderr[-2000:])
  target = load_config("experiments/demo.py:test_run_grown").model
  a, b = (run_params(tmp_path / d, target) for d in "ab")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
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


@pytest.mark.slow
def test_training_only_the_new_tokens_leaves_everything_else_untouched(trained_run, tmp_path):
  grown = tmp_path / "grown"
  assert grow_cli(f"--src={trained_run}", GROWN_TARGET, f"--dst={grown}", "--init=random").returncode == 0
  run = tmp_path / "run"
  result = run_cli("tokenformer_jax.cli.train", GROWN_TARGET, f"--workdir={run}", f"--init_from={grown}",
                   "--set=steps=3", "--set=eval_every=3", "--set=optim.warmup_steps=1",
                   "--set=optim.train_only_new_tokens=true")
  assert result.returncode == 0, result.stderr[-3000:]
  model = load_config("experiments/demo.py:test_run_grown").model
  before = run_params(grown, model)
  after = run_params(run, model)
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
@pytest.mark.slow
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


@pytest.mark.slow
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


# Carrying AdamW's moments through growth (cli.grow --optimizer=carry) --------------------------------------------
GROWN_RUN = load_config("experiments/demo.py:test_run_grown")


@pytest.fixture(scope="module")
def grown_both_ways(trained_run, tmp_path_factory):
  """{"carry": DIR, "reset": DIR}: the trained test run grown in-process (as cli.grow does) with --init=random,
  once carrying its AdamW moments and once with the default optimizer."""
  from tokenformer_jax.cli.grow import grow_checkpoint
  base = tmp_path_factory.mktemp("grown_both_ways")
  one = jax.devices()[:1]   # (quicker than the tests' eight fake devices; growing on meshes is tested above)
  grow_checkpoint(str(trained_run), None, GROWN_RUN, str(base / "carry"), init="random", optimizer="carry",
                  devices=one)
  grow_checkpoint(str(trained_run), None, GROWN_RUN, str(base / "reset"), init="random", devices=one)
  return {"carry": base / "carry", "reset": base / "reset"}


def source_adam(trained_run) -> optax.ScaleByAdamState:
  """The trained run's AdamW state at its last step, read with the optimizer of its own config."""
  run = build_run(load_config("experiments/demo.py:test_run"), devices=jax.devices()[:1])
  _, rest = RunCheckpoints(trained_run, read_only=True).restore(
      12, run.abstract.params, {"step": run.abstract.step, "opt_state": run.abstract.opt_state})
  adam = rest["opt_state"][1][0]   # (clip, (adam, weight decay, schedule))
  assert isinstance(adam, optax.ScaleByAdamState)
  return adam


def grown_moments(directory) -> dict:
  like_params = abstract_params(GROWN_RUN.model)
  abstract = {"count": jax.ShapeDtypeStruct((), jnp.int32), "mu": like_params, "nu": like_params}
  return jax.device_get(RunCheckpoints(directory, read_only=True).restore_moments(abstract))


def grown_params(directory) -> dict:
  return jax.device_get(run_params(directory, GROWN_RUN.model))


@pytest.mark.slow
def test_carry_writes_the_sources_moments_for_the_old_rows_and_zeros_for_the_new(trained_run, grown_both_ways,
                                                                                tmp_path):
  source, grown = jax.device_get(source_adam(trained_run)), grown_moments(grown_both_ways["carry"])
  params = grown_params(grown_both_ways["carry"])
  assert int(source.count) == int(grown["count"]) == 12   # Adam's bias-correction count, kept
  assert read_provenance(grown_both_ways["carry"]).optimizer == "carry"
  for which in ("mu", "nu"):
    old, new = getattr(source, which), grown[which]
    np.testing.assert_array_equal(new["embedding"], old["embedding"])
    for leaf in ("bias", "scale"):
      np.testing.assert_array_equal(new["final_norm"][leaf], old["final_norm"][leaf])
    for p in PROJECTIONS:
      n_old, n_new = TEST_MODEL.tokens(p), GROWN_RUN.model.tokens(p)
      for name in ("key_param_tokens", "value_param_tokens"):
        a, b = old["layers"][p][name][:, :n_old], new["layers"][p][name]
        assert np.count_nonzero(a) > 0.9 * a.size   # trained moments: the equality below says something
        np.testing.assert_array_equal(b[:, :n_old], a)
        assert b.shape[1] == GROWN_RUN.model.storage_tokens(p) and np.all(b[:, n_old:] == 0)   # new and padding
        assert np.all(params["layers"][p][name][:, n_old:n_new] != 0)   # while the new parameters are random
  # The moments are verified like every other item: their checksums are saved, and a flipped byte is caught.
  assert RunCheckpoints(grown_both_ways["carry"], read_only=True).read_json(0, item="checksums")["moments"]
  damaged = tmp_path / "damaged"
  shutil.copytree(grown_both_ways["carry"], damaged)
  flip_bytes(data_file(damaged / "checkpoints" / "0", "moments"))
  with pytest.raises(BrokenCheckpoint, match="moments"):
    grown_moments(damaged)


def first_step(grown_dir, workdir, runs: dict) -> tuple[dict, dict, str]:
  """(the batch, the parameters after, what the trainer said) of one in-process training step from `grown_dir`,
  warmup 0 so that the schedule's first learning rate is the peak: the grown run's own schedule, from its step 0
  (continued from the source's step 12, it would be the cosine's floor). `runs`: the built runs by config, so
  that runs of one config share their compiled steps."""
  cfg = GROWN_RUN.replace(steps=1, eval_every=1, optim=GROWN_RUN.optim.replace(warmup_steps=0))
  batches, build, said = [], loop.build_run, io.StringIO()

  def recording(cfg, **kwargs):   # on one device, and keeping the batch it trains on
    key = repr((cfg, kwargs))
    run = runs[key] = runs.get(key) or build(cfg, jax.devices()[:1], **kwargs)

    def train_step(state, batch, *guard):
      batches.append(jax.device_get(batch))
      return run.train_step(state, batch, *guard)
    return dataclasses.replace(run, train_step=train_step)

  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(said):
    patch.setattr(loop, "build_run", recording)
    loop.train(cfg, str(workdir), init_from=str(grown_dir))
  assert len(batches) == 1 and losses(workdir, "train/learning_rate")[1] == pytest.approx(cfg.optim.learning_rate)
  return batches[0], grown_params(workdir), said.getvalue()


@pytest.fixture(scope="module")
def first_steps(grown_both_ways, tmp_path_factory):
  """{"carry": (batch, params after, stdout), "reset": ...}: one step of a run from each grown checkpoint."""
  base = tmp_path_factory.mktemp("first_steps")
  runs = {}
  return {kind: first_step(directory, base / kind, runs) for kind, directory in grown_both_ways.items()}


@pytest.fixture(scope="module")
def first_gradient(grown_both_ways, first_steps) -> tuple[dict, dict]:
  """(the grown parameters, their gradient of the mean loss on the first batch), computed here with the norm
  scale of the grown checkpoint's config (the same for both grown checkpoints, as are their parameters)."""
  grown = grown_both_ways["carry"]
  model = from_dict(TrainConfig, RunCheckpoints(grown, read_only=True).read_json()).model
  batch, params = first_steps["carry"][0], grown_params(grown)
  loss = lambda p: jnp.divide(*loss_sums(model, p, batch["tokens"], batch["mask"]))
  return params, jax.device_get(jax.jit(jax.grad(loss))(params))


def adamw_first_step(params: dict, grads: dict, count: int, mu: dict, nu: dict) -> dict:
  """The parameters after one AdamW step, in float64 numpy: global-norm clipping, moments from (count, mu, nu),
  bias correction at count + 1, decoupled weight decay except on norm scales and biases, at the peak learning
  rate (warmup 0)."""
  o = GROWN_RUN.optim
  clip = min(1.0, o.grad_clip / np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))

  def step(path, p, g, m, v):
    g, t = np.float64(g) * clip, count + 1
    m, v = o.b1 * np.float64(m) + (1 - o.b1) * g, o.b2 * np.float64(v) + (1 - o.b2) * g * g
    update = m / (1 - o.b1 ** t) / (np.sqrt(v / (1 - o.b2 ** t)) + o.eps)
    decay = o.weight_decay * np.float64(p) if path[-1].key not in ("scale", "bias") else 0.0
    return p - o.learning_rate * (update + decay)
  return jax.tree_util.tree_map_with_path(step, params, grads, mu, nu)


def max_difference(a: dict, b: dict) -> float:
  """In learning rates: the largest difference of two parameter trees, divided by the peak learning rate."""
  lr = GROWN_RUN.optim.learning_rate
  return max(float(np.max(np.abs(np.float64(x) - y))) / lr for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_the_first_step_of_a_carried_run_uses_the_carried_moments(grown_both_ways, first_steps, first_gradient):
  batch, carried, said = first_steps["carry"]
  assert "carried its AdamW moments" in said and "bias-correction count 12 kept" in said
  moments = grown_moments(grown_both_ways["carry"])
  expected = adamw_first_step(*first_gradient, 12, moments["mu"], moments["nu"])
  assert max_difference(carried, expected) <= 1e-4
  # The count mattered (from 0, the bias correction would scale the first update of the old rows up to 10×),
  # and a reset run from the same grown parameters, on the same batch, steps elsewhere by up to 2 learning rates.
  assert max_difference(carried, adamw_first_step(*first_gradient, 0, moments["mu"], moments["nu"])) > 1
  reset_batch, reset, _ = first_steps["reset"]
  np.testing.assert_array_equal(reset_batch["tokens"], batch["tokens"])
  assert max_difference(carried, reset) > 1


@pytest.mark.slow
def test_reset_is_the_default_and_starts_from_a_fresh_optimizer(grown_both_ways, first_steps, first_gradient):
  reset = grown_both_ways["reset"]
  assert read_provenance(reset).optimizer == "reset"
  assert not (reset / "checkpoints" / "0" / "moments").exists()
  assert max_difference(grown_params(reset), first_gradient[0]) == 0   # the same growth as the carried one
  _, after, said = first_steps["reset"]
  assert "fresh optimizer and schedule" in said and "carried" not in said
  zeros = jax.tree.map(np.zeros_like, first_gradient[0])
  assert max_difference(after, adamw_first_step(*first_gradient, 0, zeros, zeros)) <= 1e-4
  # A grown checkpoint written before the optimizer option existed reads as reset.
  checkpoints = RunCheckpoints(reset, read_only=True)
  extra = {k: v for k, v in checkpoints.read_json(item="extra").items() if k != "optimizer"}
  assert Provenance.from_checkpoint(extra, checkpoints.read_json()).optimizer == "reset"


@pytest.mark.slow
def test_training_only_the_new_tokens_starts_from_the_carried_moments_too(grown_both_ways):
  carried = grown_both_ways["carry"]
  cfg = GROWN_RUN.replace(optim=GROWN_RUN.optim.replace(train_only_new_tokens=True))
  cfg, rows, _ = start_from_grown(cfg, str(carried))
  run = build_run(cfg, jax.devices()[:1], trainable_rows=rows)   # AdamW, then the mask of the new rows
  state, said = loop.initialised_from(run, str(carried))
  assert "carried its AdamW moments" in said
  adam, schedule = state.opt_state[1][0], state.opt_state[1][2]   # (clip, (adam, weight decay, schedule), rows)
  assert isinstance(adam, optax.ScaleByAdamState) and isinstance(schedule, optax.ScaleByScheduleState)
  moments = grown_moments(carried)
  assert int(adam.count) == 12 and int(schedule.count) == 0 and int(state.step) == 0
  for a, b in zip(jax.tree.leaves((adam.mu, adam.nu)), jax.tree.leaves((moments["mu"], moments["nu"]))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_carry_refuses_a_source_without_optimizer_state_or_of_another_kind(trained_run, grown_both_ways, tmp_path):
  from tokenformer_jax.cli.grow import grow_checkpoint, growth_plan
  params_only = grown_both_ways["reset"]   # a grown checkpoint, like an imported one, has parameters only
  digest = tree_digest(params_only)
  with pytest.raises(CheckpointError) as refused:
    grow_checkpoint(str(params_only), None, GROWN_RUN, str(tmp_path / "a"), optimizer="carry")
  message = str(refused.value)
  assert "\n" not in message and "--optimizer=carry needs the source's optimizer state" in message
  assert "has none" in message and "--optimizer=reset" in message
  # An optimizer state that is not the one its config trains with (here plain Adam's, no clipping or decay).
  other = tmp_path / "other"
  params = run_params(trained_run, TEST_MODEL)
  saved = RunCheckpoints(other, keep=1)
  saved.save(3, params=params, opt_state={"step": jnp.int32(3), "opt_state": optax.adam(1e-3).init(params)},
             config=to_dict(load_config("experiments/demo.py:test_run")))
  saved.wait()
  with pytest.raises(CheckpointError, match="optimizer state of .*saved from a different optimizer.*use --optim"):
    grow_checkpoint(str(other), None, GROWN_RUN, str(tmp_path / "b"), optimizer="carry")
  # A dense Transformer grows by Net2Net, which has no zero rows for its moments.
  dense = load_config("experiments/demo.py:test_run").replace(model=TEST_MODEL.replace(architecture="transformer"))
  with pytest.raises(ValueError, match="Net2Net.*--optimizer=reset"):
    growth_plan(dense.model, dense.model.replace(d_model=64, n_heads=4), init="zero_keys", scale="keep",
                old_noise=0.0, optimizer="carry")
  assert tree_digest(params_only) == digest and not any((tmp_path / d).exists() for d in "ab")
