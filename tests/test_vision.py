"""Image classifiers: the models and their parameter counts (paper Table 9), the block norms of Table 5, the digits
source and its pipeline, and every tool on a vision run (train, resume, eval, grow) as a user runs them."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import losses, run_cli, run_main, run_params
from tokenformer_jax.config import ParamTokens, apply_overrides, count_params, load_config
from tokenformer_jax.data import DataError, images
from tokenformer_jax.model import VisionModel, abstract_params, logical_axes
from tokenformer_jax.model.layers import LayerNorm, layer_norm
from tokenformer_jax.model.vision import patches

pytest.importorskip("sklearn")

VISION = "experiments/vision.py"
TEST_CONFIG = f"--config={VISION}:digits_test"
DIGITS_TEST = load_config(f"{VISION}:digits_test")
DIGITS = DIGITS_TEST.model.vision


def size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


# Models and parameter counts ------------------------------------------------------------------------------------
# (config, count_params with the paper's logical tokens, Table 9 / Table 2's number)
TABLE_9 = [("tokenformer_base_matched", 86_447_848, "86M"), ("tokenformer_base", 114_759_400, "109M"),
           ("tokenformer_large_matched", 304_007_144, "307M"), ("tokenformer_large", 404_670_440, "407M"),
           ("vit_b16", 86_567_656, "86M"), ("vit_l16", 304_326_632, "307M")]


@pytest.mark.parametrize("name,total,paper", TABLE_9, ids=[row[0] for row in TABLE_9])
def test_table_9_parameter_counts(name, total, paper):
  cfg = load_config(f"{VISION}:{name}")
  assert count_params(cfg, storage=False)["total"] == total
  # The initialised model holds exactly count_params(storage) parameters (shapes only, nothing allocated).
  assert size(abstract_params(cfg)) == count_params(cfg)["total"]
  d, layers, v = cfg.d_model, cfg.n_layers, cfg.vision
  outside = v.patch_features * d + d + d + 197 * d + 2 * d + d * 1000 + 1000   # embedding, cls, positions, norm, head
  if cfg.architecture == "tokenformer":   # Table 3: 2·L·d·Σn in the blocks
    assert total == 2 * layers * d * cfg.param_tokens.total() + outside
  else:                                   # 12·L·d² + biases and norms
    assert total == layers * (12 * d * d + 13 * d) + outside


def test_matched_models_have_their_vits_parameters():
  for ours, vit in (("tokenformer_base_matched", "vit_b16"), ("tokenformer_large_matched", "vit_l16")):
    a, b = (count_params(load_config(f"{VISION}:{n}"), storage=False)["total"] for n in (ours, vit))
    assert abs(a - b) / b < 0.002
  # Table 9's literal Large† (768 attention and 768 FFN tokens) is far from ViT-L's 307M.
  literal = load_config(f"{VISION}:tokenformer_large_matched").replace(param_tokens=ParamTokens.uniform(768, 768))
  assert count_params(literal, storage=False)["total"] == 190_760_936
  tf, vit = (count_params(load_config(f"{VISION}:{n}").model)["total"] for n in ("digits", "digits_vit"))
  assert abs(tf - vit) / vit < 0.02


def test_patches_cut_row_major():
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  got = np.asarray(patches(jnp.asarray(x), 4))
  assert got.shape == (2, 4, 48)
  for b in range(2):
    for i in range(2):
      for j in range(2):
        np.testing.assert_array_equal(got[b, 2 * i + j], x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1))


@pytest.fixture(scope="module")
def trained_looking():
  """digits_test's model with random (non-zero) parameters everywhere, and a batch of test images."""
  cfg = DIGITS_TEST.model
  leaves, tree = jax.tree.flatten(abstract_params(cfg))
  rng = np.random.default_rng(0)   # numpy noise: nothing to compile
  params = jax.tree.unflatten(tree, [jnp.asarray(0.5 * rng.standard_normal(x.shape), jnp.float32) for x in leaves])
  batch = images.eval_batches(DIGITS_TEST.data, DIGITS, global_batch=8, max_batches=1)[0]
  return cfg, params, batch["images"]


@pytest.mark.parametrize("pooling", ["cls", "gap"])
def test_attention_is_bidirectional(trained_looking, pooling):
  # The class token comes first: with a causal mask it would see nothing of the image. Changing only the last
  # patch changes every image's logits.
  cfg, params, x = trained_looking
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, pooling=pooling))
  if pooling == "gap":   # no class token
    params = {k: v for k, v in params.items() if k != "class_token"}
    params["position_embedding"] = params["position_embedding"][1:]
  forward = jax.jit(lambda p, x: VisionModel(cfg).apply({"params": p}, x))
  changed = np.array(x)
  changed[:, -2:, -2:] += 1.0
  a, b = forward(params, x), forward(params, changed)
  assert a.shape == (8, 10)
  assert float(jnp.min(jnp.max(jnp.abs(a - b), axis=1))) > 1e-4


def test_zero_key_growth_keeps_the_logits_with_block_norms_and_gelu_l1_norm():
  from tokenformer_jax.growth import grow, grown_config
  from tokenformer_jax.config import PROJECTIONS
  style = dict(block_norm="scale_bias", normalization="gelu_l1_norm")
  old = DIGITS_TEST.model.replace(**style)
  new = grown_config(old, load_config(f"{VISION}:digits_test_grown").model.replace(**style))
  leaves, tree = jax.tree.flatten(abstract_params(old))
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(tree, [0.5 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
  for p in PROJECTIONS:   # storage padding is zero, as training keeps it
    for leaf in params["layers"][p].values():
      leaf[:, old.tokens(p):] = 0
  grown = grow(params, old, new, init="zero_keys", rng=jax.random.key(0))
  assert size(grown) == count_params(new)["total"]
  np.testing.assert_array_equal(grown["layers"]["ffn_norm"]["scale"], params["layers"]["ffn_norm"]["scale"])
  x = images.eval_batches(DIGITS_TEST.data, DIGITS, global_batch=8, max_batches=1)[0]["images"]
  before = jax.jit(lambda p, x: VisionModel(old).apply({"params": p}, x))(params, x)
  after = jax.jit(lambda p, x: VisionModel(new).apply({"params": p}, x))(grown, x)
  assert float(jnp.max(jnp.abs(after - before))) <= 1e-5


@pytest.mark.parametrize("architecture", ["tokenformer", "transformer"])
@pytest.mark.parametrize("norm", ["none", "bias", "scale_bias"])
def test_block_norm_options(architecture, norm):
  cfg = DIGITS_TEST.model.replace(architecture=architecture, block_norm=norm)
  params, axes = abstract_params(cfg), logical_axes(cfg)
  assert size(params) == count_params(cfg)["total"]
  names = ("attention_norm", "ffn_norm") if architecture == "tokenformer" else ("attention_norm", "mlp_norm")
  for name in names:
    want = {"none": set(), "bias": {"bias"}, "scale_bias": {"scale", "bias"}}[norm]
    assert set(params["layers"].get(name, {})) == want
    for leaf in want:
      assert params["layers"][name][leaf].shape == (cfg.n_layers, cfg.d_model)
      assert tuple(axes["layers"][name][leaf]) == ("layers", "embed")
  # "auto" is each architecture's own: TokenFormer non-parametric, the dense baseline γ and β (paper Table 5).
  auto = DIGITS_TEST.model.replace(architecture=architecture)
  assert auto.norm_params == ("none" if architecture == "tokenformer" else "scale_bias")


def test_bias_only_layer_norm():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  module = LayerNorm(use_scale=False)
  variables = module.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"bias"}
  bias = np.arange(16, dtype=np.float32)
  got = module.apply({"params": {"bias": bias}}, x)
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) + bias
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(layer_norm(x, 1e-5), want - bias, atol=1e-5)


# Data --------------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_disjoint():
  from sklearn.datasets import load_digits
  data = images.load("digits")
  assert data.train.images.shape == (1437, 8, 8, 1) and data.test.images.shape == (360, 8, 8, 1)
  assert data.num_classes == 10
  test_counts = np.bincount(data.test.labels, minlength=10)
  all_counts = np.bincount(load_digits().target, minlength=10)
  assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)   # stratified
  flat = lambda split: {img.tobytes() for img in split.images}
  # (a few digits occur twice in the dataset; the split is by image, so at most those can coincide)
  assert len(flat(data.train) & flat(data.test)) <= 2
  again = images.load.__wrapped__("digits")
  np.testing.assert_array_equal(again.test.labels, data.test.labels)
  np.testing.assert_array_equal(again.test.images, data.test.images)


def test_augmentation_is_deterministic_by_position_and_resumes():
  data = DIGITS_TEST.data.replace(image_crop_padding=1, image_flip=True)
  first = images.make_train_iterator(data, DIGITS, global_batch=32)
  batches = [next(first) for _ in range(50)]   # past the end of the first epoch (1440 rows: 45 batches)
  assert all(set(b) == {"images", "labels", "mask"} for b in batches)
  assert batches[0]["images"].shape == (32, 8, 8, 1) and batches[0]["labels"].dtype == np.int32
  assert sum(float(b["mask"].sum()) for b in batches[:45]) == 1437   # every training image once per epoch
  state = first.get_state()
  resumed = images.make_train_iterator(data, DIGITS, global_batch=32)
  resumed.set_state({**state, "position": 47 * 32})
  for want in batches[47:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # The same image is augmented differently in another epoch, and augmentation changes images.
  plain = images.ImageExamples(images.load("digits"), "train")
  augmented = images.ImageExamples(images.load("digits"), "train", crop_padding=1, flip=True)
  draws = {augmented.at_position(0, p)["images"].tobytes() for p in range(0, 1440 * 8, 1440)}
  assert len(draws) > 1
  assert plain.at_position(0, 5)["images"].tobytes() == plain[0]["images"].tobytes()
  # A saved position of another augmentation is refused.
  other = images.make_train_iterator(DIGITS_TEST.data, DIGITS, global_batch=32)
  with pytest.raises(DataError, match="stream"):
    other.set_state(state)


# Bad input: one line naming what is wrong -------------------------------------------------------------------
def test_bad_vision_configs_are_refused_in_one_sentence():
  with pytest.raises(ValueError, match="patch_size=3 does not divide model.vision.image_size=8"):
    apply_overrides(DIGITS_TEST, ["model.vision.patch_size=3"])
  with pytest.raises(ValueError, match="is an image classifier .* but the data is text"):
    apply_overrides(DIGITS_TEST, ["data.image_source="])
  text = load_config("experiments/demo.py:test_run")
  with pytest.raises(ValueError, match="data.image_source='digits' gives images, but model 'test_run' is a language"):
    apply_overrides(text, ["data.image_source=digits"])
  wrong = apply_overrides(DIGITS_TEST, ["model.vision.num_classes=7"])
  with pytest.raises(DataError, match="num_classes=7 but data.image_source='digits' has 10 classes"):
    images.make_train_iterator(wrong.data, wrong.model.vision, global_batch=32, model_name="digits_test")
  with pytest.raises(DataError, match="unknown data.image_source 'cifar'"):
    images.load("cifar")


@pytest.mark.parametrize("flag,phrase", [
    ("--set=model.vision.num_classes=7", "has 10 classes: set --set model.vision.num_classes=10"),
    ("--set=model.vision.patch_size=3", "does not divide model.vision.image_size=8"),
    ("--set=data.image_source=", "is an image classifier (model.vision is set) but the data is text")])
def test_bad_input_ends_in_one_line(flag, phrase, tmp_path, capsys):
  from tokenformer_jax.cli import train as cli_train
  code, _, err = run_main(cli_train, capsys, TEST_CONFIG, flag, f"--workdir={tmp_path / 'run'}")
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], err
  assert not (tmp_path / "run").exists()


# The tools on a vision run --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
  """(workdir, finished process) of digits_test trained for its 8 steps by cli.train, as a user runs it."""
  workdir = tmp_path_factory.mktemp("vision_run")
  result = run_cli("tokenformer_jax.cli.train", TEST_CONFIG, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_train_logs_top1_and_top5(vision_run):
  workdir, result = vision_run
  assert "top-1" in result.stdout and "top-5" in result.stdout and "done: 8 steps | test loss" in result.stdout
  for key in ("eval/loss", "eval/top1", "eval/top5"):
    assert sorted(losses(workdir, key)) == [4, 8]
  assert sorted(losses(workdir, "train/top1")) == sorted(losses(workdir, "train/top5")) == list(range(1, 9))
  assert all(0 <= v <= 1 for v in losses(workdir, "eval/top1").values())


@pytest.mark.slow
def test_sigkill_then_rerun_equals_the_uninterrupted_run(vision_run, tmp_path):
  uninterrupted = vision_run[0]
  killed = run_cli("", "SIGKILL", "7", TEST_CONFIG, f"--workdir={tmp_path}", script=("tests/train_with_fault.py",))
  assert killed.returncode == -9
  assert max(losses(tmp_path)) == 6
  rerun = run_cli("tokenformer_jax.cli.train", TEST_CONFIG, f"--workdir={tmp_path}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "at step 4" in rerun.stdout
  for key in ("train/loss", "train/top1", "eval/loss", "eval/top1"):
    assert losses(tmp_path, key) == losses(uninterrupted, key)   # bitwise: augmentation included
  for x, y in zip(jax.tree.leaves(run_params(tmp_path, DIGITS_TEST.model)),
                  jax.tree.leaves(run_params(uninterrupted, DIGITS_TEST.model))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_eval_prints_and_writes_top1_and_top5(vision_run, tmp_path, capsys):
  from tokenformer_jax.cli import eval as cli_eval
  workdir = vision_run[0]
  out = tmp_path / "eval.json"
  code, stdout, err = run_main(cli_eval, capsys, f"--checkpoint={workdir}", f"--json_out={out}")
  assert code == 0, err
  assert "digits_test step 8 on the digits test split: loss" in stdout and "top-1" in stdout
  record = json.loads(out.read_text())
  assert {"loss", "top1", "top5", "examples"} <= set(record) and record["examples"] == 360
  # The trainer's last evaluation was the whole test split too (12 batches of 32): the same numbers.
  assert record["top1"] == pytest.approx(losses(workdir, "eval/top1")[8], abs=1.5 / 360)   # (8 devices here)
  assert record["loss"] == pytest.approx(losses(workdir, "eval/loss")[8], abs=1e-5)


@pytest.mark.slow
def test_image_evaluation_equals_numpy_over_the_models_logits(vision_run):
  """evaluate_images (the eval step's sums added up by LossSums) against cross-entropy, top-1 and top-5 computed in
  numpy from the model's logits on every test image."""
  from tokenformer_jax.inference import evaluate_images, load_model
  model = load_model(str(vision_run[0]))
  result = evaluate_images(model)
  apply = jax.jit(lambda p, x: VisionModel(model.config.model).apply({"params": p}, x))
  logits, labels = [], []
  for batch in images.eval_batches(model.config.data, DIGITS, global_batch=32, model_name=model.config.model.name):
    real = batch["mask"] > 0
    logits.append(np.asarray(apply(model.params, batch["images"]), np.float64)[real])
    labels.append(batch["labels"][real])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  shifted = logits - logits.max(1, keepdims=True)
  cross_entropy = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(labels)), labels]
  ranks = np.argsort(-logits, axis=1, kind="stable")   # ties: the lower class first, as the eval step
  assert result["examples"] == len(labels) == 360
  assert result["loss"] == pytest.approx(cross_entropy.mean(), rel=1e-5)
  assert result["top1"] == np.mean(ranks[:, 0] == labels)
  assert result["top5"] == np.mean((ranks[:, :5] == labels[:, None]).any(1))
  assert 0 < result["top1"] < result["top5"] <= 1


@pytest.mark.slow
def test_grow_verify_eval_and_continue(vision_run, tmp_path):
  from tokenformer_jax.cli.grow import grow_checkpoint, verify
  from tokenformer_jax.inference import evaluate_images, load_model
  from tokenformer_jax.train.loop import train
  target = load_config(f"{VISION}:digits_test_grown")
  grown = grow_checkpoint(str(vision_run[0]), None, target, str(tmp_path / "grown"))
  assert size(grown.new_params) == count_params(grown.new_cfg)["total"] > size(grown.old_params)
  assert verify(grown.old_cfg, grown.old_params, grown.new_cfg, grown.new_params, target) <= 1e-5
  # cli.eval's path on the grown checkpoint: the source's test top-1 and loss (the same function).
  after = evaluate_images(load_model(str(tmp_path / "grown")))
  assert after["top1"] == pytest.approx(losses(vision_run[0], "eval/top1")[8], abs=1.5 / 360)
  assert after["loss"] == pytest.approx(losses(vision_run[0], "eval/loss")[8], abs=1e-5)
  # Continued training from it.
  final = train(apply_overrides(target, ["steps=2", "eval_every=2"]), str(tmp_path / "continued"),
                init_from=str(tmp_path / "grown"))
  assert 0 <= final["eval/top1"] <= 1 and np.isfinite(final["eval/loss"])
