"""Images: labelled image sources with a fixed split, augmentation, and their examples through the grain pipeline.

    data.image_source = "digits"   scikit-learn's digits: 1,797 8×8 grey images of 0-9 inside the scikit-learn
                                   wheel (no download; `pip install -e '.[vision]'`)

The split is fixed: stratified, 80% train / 20% test, seed 0 (sklearn's train_test_split), so the test images are
never seen in training and every run, seed and tool (cli.train's evaluation, cli.eval, cli.grow --verify) uses
the same ones. Pixels are scaled to [0, 1] and standardised by one mean and std over the training pixels.

`data.image_source="tfds:NAME"` (ImageNet-1K: tfds:imagenet2012) reads a prepared TFDS dataset instead:
data/tfds_images.py, with the photographs' augmentation of data/augment.py.

The examples go through the same grain pipeline as text windows (pipeline.TrainIterator): an epoch is the train
split padded with mask-0 examples to a whole number of global batches, shuffled per epoch, split over hosts by
global position. Augmentation (data.image_crop_padding: pad with background and crop back at a random offset;
data.image_flip: mirror left-right half of the time) draws from a generator seeded by (data.shuffle_seed, the
example's global position in the shuffled stream): the iterator's position is all a checkpoint needs to resume the
same augmented batches, on any number of hosts. Evaluation batches are unaugmented and in order.

Batches: {"images": float32 [b, H, W, C], "labels": int32 [b], "mask": float32 [b]} (mask 0: padding).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from tokenformer_jax.config import DataConfig, VisionConfig
from tokenformer_jax.data import tfds_images
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.pipeline import TrainIterator

TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray   # float32 [n, H, W, C] in [0, 1]
  labels: np.ndarray   # int32 [n]


@dataclasses.dataclass(frozen=True)
class ImageData:
  """One source, split: its images' shape and classes, and the training pixels' mean and std."""
  name: str
  train: Split
  test: Split
  num_classes: int
  mean: float
  std: float

  @property
  def image_size(self) -> int:
    return self.train.images.shape[1]

  @property
  def channels(self) -> int:
    return self.train.images.shape[3]


def _digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top (an optional extra)
  except ImportError:
    raise DataError("data.image_source='digits' needs scikit-learn: pip install -e '.[vision]'") from None
  digits = load_digits()
  return (digits.images / 16.0).astype(np.float32)[..., None], digits.target.astype(np.int32)


SOURCES = {"digits": _digits}


@functools.cache
def load(name: str) -> ImageData:
  """The source `name`, split (stratified 80/20, seed 0) and with its normalisation; read once per process."""
  if name not in SOURCES:
    raise DataError(f"unknown data.image_source {name!r}; the image sources are: {', '.join(SOURCES)}, "
                    f"{tfds_images.PREFIX}NAME (a prepared TFDS dataset, e.g. {tfds_images.PREFIX}imagenet2012)")
  images, labels = SOURCES[name]()
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
                                 random_state=SPLIT_SEED)
  train, test = np.sort(train), np.sort(test)
  pixels = images[train]
  return ImageData(name, Split(images[train], labels[train]), Split(images[test], labels[test]),
                   num_classes=int(labels.max()) + 1, mean=float(pixels.mean()), std=float(pixels.std()))


def check_model(data: ImageData, vision: VisionConfig, model_name: str) -> None:
  """A DataError naming the first setting of the model that does not fit the images."""
  for field, have in (("image_size", data.image_size), ("channels", data.channels),
                      ("num_classes", data.num_classes)):
    want = getattr(vision, field)
    if want != have:
      what = {"image_size": f"{have}×{have} images", "channels": f"images of {have} channel(s)",
              "num_classes": f"{have} classes"}[field]
      raise DataError(f"model {model_name!r} has model.vision.{field}={want} but data.image_source={data.name!r} has "
                      f"{what}: set --set model.vision.{field}={have}")


class ImageExamples:
  """Random-access examples of one split (a grain data source, like pipeline.Windows): {"images", "labels",
  "mask"}, indices past the split's `num_real` images being mask-0 padding. `at_position(index, position)`: the
  example augmented by the draws of global position `position` (what the train iterator reads)."""

  def __init__(self, data: ImageData, split: str, *, length: int | None = None, crop_padding: int = 0,
               flip: bool = False, seed: int = 0):
    self.data, self.split = data, getattr(data, split)
    self.num_real = len(self.split.labels)
    self._length = self.num_real if length is None else length
    self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
    self.source_path = ""   # (pipeline.TrainIterator reads remote sources with more threads)
    # What the iterator's saved position counts in, besides its length and shuffle seed.
    self.stream_record = {"images": f"{data.name}/{split}", "crop_padding": crop_padding, "flip": flip}

  def __len__(self) -> int:
    return self._length

  def _example(self, index: int, image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    if not 0 <= index < self._length:
      raise IndexError(f"example {index} out of range [0, {self._length})")
    if index >= self.num_real:
      shape = self.split.images.shape[1:]
      return {"images": np.zeros(shape, np.float32), "labels": np.int32(0), "mask": np.float32(0)}
    image = self.split.images[index] if image is None else image
    return {"images": ((image - self.data.mean) / self.data.std).astype(np.float32),
            "labels": np.int32(self.split.labels[index]), "mask": np.float32(1)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._example(int(index))

  def at_position(self, index: int, position: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index >= self.num_real or not (self.crop_padding or self.flip):
      return self._example(index)
    rng = np.random.default_rng([self.seed, int(position)])
    image = self.split.images[index]
    if self.crop_padding:
      pad, (height, width) = self.crop_padding, image.shape[:2]
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))   # 0: the background of these images
      top, left = rng.integers(0, 2 * pad + 1, size=2)
      image = padded[top:top + height, left:left + width]
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return self._example(index, image)

  def __repr__(self) -> str:
    return f"ImageExamples({self.data.name}/{self.split_name}, real={self.num_real}, length={self._length})"

  @property
  def split_name(self) -> str:
    return self.stream_record["images"].split("/")[1]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def load_checked(data: DataConfig, vision: VisionConfig, model_name: str) -> ImageData:
  images = load(data.image_source)
  check_model(images, vision, model_name)
  return images


def make_train_iterator(data: DataConfig, vision: VisionConfig, *, global_batch: int, model_name: str = "model",
                        process_index: int = 0, process_count: int = 1, seed: int | None = None) -> TrainIterator:
  """An endless iterator of this host's share of each global batch of augmented training images, reshuffled each
  epoch from `seed` (default data.shuffle_seed), which also seeds the augmentation."""
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"global_batch={global_batch} must be a positive multiple of the number of hosts ({process_count})")
  seed = data.shuffle_seed if seed is None else seed
  if tfds_images.is_tfds(data.image_source):
    examples = tfds_images.train_examples(data, vision, global_batch=global_batch, model_name=model_name, seed=seed)
  else:
    images = load_checked(data, vision, model_name)
    examples = ImageExamples(images, "train", length=_round_up(len(images.train.labels), global_batch),
                             crop_padding=data.image_crop_padding, flip=data.image_flip, seed=seed)
  return TrainIterator(examples, seed=seed, global_batch=global_batch, process_index=process_index,
                       process_count=process_count, worker_count=data.worker_count)


def eval_batches(data: DataConfig, vision: VisionConfig, *, global_batch: int, max_batches: int | None = None,
                 split: str = "test", model_name: str = "model", process_index: int = 0,
                 process_count: int = 1):
  """`split` ("test": the held-out 20% / a tfds source's validation split, or "train") in order and unaugmented,
  as at most `max_batches` host batches (default: all of it), the last completed with mask-0 rows; rows spread
  over hosts as in training. A tfds source's are read lazily (tfds_images.EvalBatches), the rest is a list."""
  if split not in SPLITS:
    raise DataError(f"an image source's splits are {', '.join(SPLITS)}; got {split!r}")
  if tfds_images.is_tfds(data.image_source):   # read lazily: ImageNet's 50,000 are 30 GB as float32
    return tfds_images.eval_batches(data, vision, global_batch=global_batch, max_batches=max_batches, split=split,
                                    model_name=model_name, process_index=process_index, process_count=process_count)
  local_batch = global_batch // process_count
  examples = ImageExamples(load_checked(data, vision, model_name), split)
  num_batches = -(-examples.num_real // global_batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  examples = ImageExamples(examples.data, split, length=num_batches * global_batch)
  batches = []
  for b in range(num_batches):
    rows = [examples[b * global_batch + r * process_count + process_index] for r in range(local_batch)]
    batches.append({k: np.stack([row[k] for row in rows]) for k in ("images", "labels", "mask")})
  return batches
