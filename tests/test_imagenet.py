"""ImageNet-1K's path (data/tfds_images.py, data/augment.py, train/mixing.py, experiments/vision.py:imagenet_*), under
`tfds.testing.mock_data`: random images of random sizes in place of imagenet2012's records, in a directory whose
dataset_info.json says it is prepared in array_record (what `tfds build --file_format=array_record` writes), so
that this module's checks of the prepared directory are real ones."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from helpers import losses, run_main
from tokenformer_jax.config import OptimConfig, apply_overrides, load_config
from tokenformer_jax.data import DataError, augment, images, tfds_images
from tokenformer_jax.train.mixing import Mixing, cut_box, mix

TEST = load_config("experiments/vision.py:imagenet_test")
EXAMPLES = 10   # per split: batches of 4 → an epoch of 12 positions, 2 of them padding


def prepared(data_dir, name="imagenet2012", splits=("train", "validation"), file_format="array_record") -> str:
  """`data_dir` with `name` marked as prepared there: the dataset_info.json TFDS writes (its splits, its format)."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  info = json.loads(builder.info.as_json)
  info.update(fileFormat=file_format, splits=[{"name": s, "shardLengths": [str(EXAMPLES)], "numBytes": "0"}
                                              for s in splits])
  version_dir = data_dir / builder.name / str(builder.version)
  version_dir.mkdir(parents=True, exist_ok=True)
  (version_dir / "dataset_info.json").write_text(json.dumps(info))
  return str(data_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return prepared(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
  tfds_images.open_dataset.cache_clear()


def data_of(data_dir, **changes):
  return TEST.data.replace(tfds_data_dir=data_dir, **changes)


# Per-example augmentation -------------------------------------------------------------------------------------
def test_the_eval_view_is_the_centre_87_5_percent_and_train_views_follow_their_position():
  rows = np.arange(200, dtype=np.uint8)[:, None, None]
  photo = np.broadcast_to(rows, (200, 300, 3)).copy()            # each row its own value
  view = augment.eval_image(photo, 32)                            # shorter side 200 → 32 / 0.875 = 37 rows
  assert view.shape == (32, 32, 3) and view.dtype == np.float32
  pixels = view * augment.STD + augment.MEAN
  resized = np.asarray(Image.fromarray(photo).resize((55, 37), Image.BICUBIC), np.float32) / 255
  np.testing.assert_allclose(pixels, resized[2:34, 11:43], atol=1e-5)   # the central 32 × 32 of 37 × 55
  draw = lambda position, **kw: augment.train_image(photo, 32, np.random.default_rng([0, position]), **kw)
  np.testing.assert_array_equal(draw(5), draw(5))
  assert draw(5).tobytes() != draw(6).tobytes()
  randaugmented = draw(5, randaugment_ops=2, magnitude=9, magnitude_std=0.5)
  assert randaugmented.shape == (32, 32, 3) and randaugmented.tobytes() != draw(5).tobytes()


def test_every_randaugment_operation_keeps_the_size_and_moves_pixels_and_level_zero_enhancements_do_not():
  rng = np.random.default_rng(0)
  photo = Image.fromarray(rng.integers(60, 180, (24, 40, 3), dtype=np.uint8))   # low contrast
  for name, op in augment.OPS.items():
    out = op(photo, 10.0, np.random.default_rng(1))
    assert out.size == photo.size and out.mode == "RGB", name
    assert np.abs(np.asarray(out, np.int32) - np.asarray(photo, np.int32)).sum() > 0, name
  for name in ("color", "contrast", "brightness", "sharpness", "rotate", "shear_x", "translate_y", "solarize_add"):
    out = augment.OPS[name](photo, 0.0, np.random.default_rng(1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(photo), err_msg=name)


# Mixing in the train step ----------------------------------------------------------------------------------------
def test_mixup_cutmix_and_label_smoothing_mix_what_they_say():
  b, size, classes = 4, 16, 5
  values = jnp.arange(1.0, b + 1)[:, None, None, None]
  batch = {"images": jnp.broadcast_to(values, (b, size, size, 3)), "labels": jnp.arange(b) % classes,
           "mask": jnp.ones(b)}
  for step in range(3):
    out = mix(Mixing(mixup=0.8, seed=1), batch, jnp.int32(step), classes)
    lam = float(out["targets"][0, 0])            # image 0 keeps λ of its own label, gets 1-λ of image 3's
    np.testing.assert_allclose(out["images"][0], lam * 1 + (1 - lam) * 4, rtol=1e-6)
    np.testing.assert_allclose(out["targets"][0, 3], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(out["targets"].sum(1), 1, rtol=1e-6)
    cut = mix(Mixing(cutmix=1.0, seed=1), batch, jnp.int32(step), classes)
    kept = float(jnp.mean(cut["images"][1] == 2))   # image 1, pasted with image 2's pixels (a box)
    np.testing.assert_allclose(cut["targets"][1, 1], kept, rtol=1e-6)
    np.testing.assert_allclose(cut["targets"][1, 2], 1 - kept, rtol=1e-6)
  box, kept = cut_box(jax.random.key(0), jnp.float32(0.75), 16, 16)   # a half-side box, where it fits
  assert float(kept) == pytest.approx(1 - float(box.mean())) and 0 < float(box.mean()) <= 0.25
  smooth = mix(Mixing(label_smoothing=0.1), batch, jnp.int32(0), classes)
  np.testing.assert_array_equal(smooth["images"], batch["images"])
  np.testing.assert_allclose(smooth["targets"][0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)
  assert Mixing.of(TEST.data) == Mixing(mixup=0.8, cutmix=1.0, label_smoothing=0.1, seed=0)
  assert Mixing.of(TEST.data.replace(image_mixup=0, image_cutmix=0, image_label_smoothing=0)) is None


# The pipeline end to end ----------------------------------------------------------------------------------------
def test_the_train_iterator_resumes_the_same_augmented_batches_on_two_hosts(data_dir, mock_imagenet):
  data = data_of(data_dir)
  first = images.make_train_iterator(data, TEST.model.vision, global_batch=4)
  batches = [next(first) for _ in range(5)]                 # past the first epoch (3 batches)
  assert batches[0]["images"].shape == (4, 32, 32, 3) and batches[0]["images"].dtype == np.float32
  assert sum(float(b["mask"].sum()) for b in batches[:3]) == EXAMPLES
  assert all(0 <= label < 1000 for b in batches for label in b["labels"])
  state = {**first.get_state(), "position": 2 * 4}
  hosts = [images.make_train_iterator(data, TEST.model.vision, global_batch=4, process_index=p, process_count=2)
           for p in range(2)]
  for host in hosts:
    host.set_state(state)
  for want in batches[2:]:
    got = [next(host) for host in hosts]
    for key in want:   # host p holds rows p, p + 2 of the global batch
      np.testing.assert_array_equal(np.stack([got[0][key], got[1][key]], 1).reshape(want[key].shape), want[key])
  evals = images.eval_batches(data, TEST.model.vision, global_batch=4, max_batches=None)
  assert len(evals) == 3 and [float(b["mask"].sum()) for b in evals] == [4, 4, 2]
  again = list(evals)   # lazily read again, the same
  for x, y in zip(evals, again):
    np.testing.assert_array_equal(x["images"], y["images"])


@pytest.mark.slow
def test_imagenet_test_trains_evaluates_with_its_ema_and_a_resumed_run_continues_the_same(data_dir, mock_imagenet,
                                                                                         tmp_path, capsys):
  from tokenformer_jax.cli import train as cli_train
  args = ("--config=experiments/vision.py:imagenet_test", f"--set=data.tfds_data_dir={data_dir}")
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  code, out, err = run_main(cli_train, capsys, *args, f"--workdir={whole}")
  assert code == 0, err[-3000:]
  assert sorted(losses(whole)) == [1, 2, 3, 4] and sorted(losses(whole, "eval/top1")) == [2, 4]
  assert all(np.isfinite(v) for v in losses(whole).values()) and "top-1" in out and "EMA weights: test loss" in out
  ema, plain = losses(whole, "eval_ema/loss"), losses(whole, "eval/loss")   # optim.ema_decay=0.5: both evaluated
  assert sorted(ema) == [2, 4] and ema[4] != plain[4]
  shutil.copytree(whole, resumed)                            # as if killed after step 2's checkpoint
  shutil.rmtree(resumed / "checkpoints" / "4")
  metrics = (resumed / "metrics.jsonl").read_text().splitlines()
  (resumed / "metrics.jsonl").write_text("".join(f"{m}\n" for m in metrics if json.loads(m).get("step", 0) <= 2))
  code, out, err = run_main(cli_train, capsys, *args, f"--workdir={resumed}")
  assert code == 0 and "at step 2" in out, err[-3000:]
  for key in ("train/loss", "train/top1", "eval/loss", "eval_ema/loss"):
    assert losses(resumed, key) == losses(whole, key)   # bitwise: decoding, augmentation, mixing and the EMA


@pytest.mark.parametrize("change,prepare,phrase", [
    (dict(tfds_data_dir=""), None, "needs data.tfds_data_dir"),
    (dict(), dict(splits=()), "is not prepared in"),
    (dict(), dict(file_format="tfrecord"), "is prepared as tfrecord, which has no random access"),
    (dict(tfds_validation_split="val"), dict(), "has no split 'val'; its splits: train, validation"),
    (dict(image_source="tfds:imagenet_nosuch"), dict(), "TFDS has no dataset 'imagenet_nosuch'"),
    (dict(image_source="tfds:cifar10"), dict(name="cifar10"), "has 10 classes: set --set model.vision.num_classes=10"),
])
def test_bad_data_is_one_line_and_a_non_zero_exit(change, prepare, phrase, tmp_path, mock_imagenet, capsys):
  from tokenformer_jax.cli import train as cli_train
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  if prepare is not None and prepare.get("splits") != ():
    prepared(data_dir, **prepare)
  sets = [f"--set=data.{k}={v}" for k, v in {"tfds_data_dir": data_dir, **change}.items()]
  code, _, err = run_main(cli_train, capsys, "--config=experiments/vision.py:imagenet_test", *sets,
                          f"--workdir={tmp_path / 'run'}")
  lines = err.strip().splitlines()
  assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], err
  assert not (tmp_path / "run").exists()


def test_images_of_another_size_than_the_model_are_refused(tmp_path, mock_imagenet):
  data_dir = prepared(tmp_path, name="cifar10", splits=("train", "test"))   # 32 × 32 images, 10 classes
  cfg = apply_overrides(TEST, ["model.vision.num_classes=10", "model.vision.image_size=64"])
  with pytest.raises(DataError, match=r"cifar10's images are 32×32 but model 'imagenet_test' has "
                                      r"model.vision.image_size=64: set --set model.vision.image_size=32"):
    images.make_train_iterator(data_of(data_dir, image_source="tfds:cifar10"), cfg.model.vision, global_batch=4,
                               model_name="imagenet_test")


def test_the_ema_of_the_weights_follows_its_definition_and_is_off_by_default():
  from tokenformer_jax.train.optimizer import ema_params, make_optimizer
  import optax
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  tx = make_optimizer(TEST.optim.replace(ema_decay=0.9, warmup_steps=0), total_steps=10)
  state, ema, steps = tx.init(params), params, []
  for i in range(3):
    grads = {"w": jnp.array([0.3, -0.1]) * (i + 1), "b": jnp.array(0.2)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)   # the definition, step by step
    steps.append(jax.tree.map(np.asarray, ema_params(state)))
  for key in params:
    np.testing.assert_allclose(steps[-1][key], ema[key], rtol=1e-6)
  assert ema_params(make_optimizer(OptimConfig(), 10).init(params)) is None   # off by default



def test_drop_path_drops_whole_examples_at_its_rate_and_never_in_evaluation():
  import flax.linen as nn
  from tokenformer_jax.model import VisionModel, init_params
  from tokenformer_jax.model.layers import drop_path

  class Branch(nn.Module):
    @nn.compact
    def __call__(self, x, rate):
      return drop_path(self, x, rate)

  ones = jnp.ones((4000, 3, 2))
  out = np.asarray(Branch().apply({}, ones, jnp.float32(0.3), rngs={"drop_path": jax.random.key(0)}))
  dropped = (out == 0).all(axis=(1, 2))
  assert abs(dropped.mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)          # whole examples, at the rate
  np.testing.assert_allclose(out[~dropped], 1 / 0.7, rtol=1e-6)              # the kept ones scaled by 1/(1-p)
  np.testing.assert_array_equal(Branch().apply({}, ones, jnp.float32(0.3)), ones)   # no rng: evaluation
  cfg = TEST.model.replace(n_layers=3, drop_path=0.5)
  params = init_params(cfg, jax.random.key(0))
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)   # not zero
  images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  apply = lambda model, **rngs: jax.jit(lambda p, x: model.apply({"params": p}, x, rngs=rngs))(params, images)
  plain = apply(VisionModel(cfg.replace(drop_path=0.0)))
  np.testing.assert_array_equal(apply(VisionModel(cfg)), plain)
  trained = apply(VisionModel(cfg), drop_path=jax.random.key(3))
  assert float(jnp.abs(trained - plain).max()) > 0.1
