"""Image classification datasets from TFDS (data.image_source="tfds:imagenet2012", ...), read by random access.

    data.image_source = "tfds:imagenet2012"     any TFDS dataset with an "image" and a "label" feature
    data.tfds_data_dir = gs://BUCKET/tensorflow_datasets   where it is prepared (local or gs://)
    data.tfds_train_split = "train", data.tfds_validation_split = "validation"   (the split cli.eval calls "test")

Nothing downloads. ImageNet's licence makes every user fetch the archives themselves; TFDS then prepares them once,
in array_record (the random-access format grain reads; it needs TensorFlow for that one step, never afterwards):

    tfds build imagenet2012 --manual_dir=DIR_OF_THE_TARS --data_dir=gs://BUCKET/tensorflow_datasets \\
        --file_format=array_record

Training reads examples at their global positions in the shuffled stream (pipeline.TrainIterator, as text
windows and digits do): host p of P reads positions p, p + P, ...; each example is decoded (TFDS's JPEG decoder)
and augmented (data/augment.py: random-resized crop, flip, RandAugment) by a generator seeded from
(data.shuffle_seed, its position), so the iterator's position is all a checkpoint needs to resume the same
augmented batches on any number of hosts. With data.worker_count > 0 grain's worker processes decode and augment
in parallel (benchmarks/image_pipeline.py measures what one core does). Mixup, cutmix and label smoothing happen
in the train step (train/mixing.py). Evaluation: resize and centre crop, in order, read lazily by threads.

Batches: {"images": float32 [b, S, S, 3] standardised, "labels": int32 [b], "mask": float32 [b]}.

Tests run this module under `tfds.testing.mock_data`, which replaces the records by random images of random
sizes but keeps this module's checks of the prepared directory (its dataset_info.json) real.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import numpy as np

from tokenformer_jax.config import DataConfig, VisionConfig
from tokenformer_jax.data import augment
from tokenformer_jax.data.errors import DataError

PREFIX = "tfds:"
EVAL_THREADS = 16


def is_tfds(source: str) -> bool:
  return source.startswith(PREFIX)


def dataset_name(source: str) -> str:
  """NAME of a source "tfds:NAME[:VERSION]": the dataset's directory under data.tfds_data_dir."""
  return source[len(PREFIX):].split(":")[0]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A prepared TFDS image dataset: its splits (name → examples), classes and declared image shape."""
  name: str
  data_dir: str
  splits: dict
  num_classes: int
  image_shape: tuple   # (height or None, width or None, channels)
  builder: Any = dataclasses.field(compare=False, repr=False)

  def split(self, name: str):
    """The split's random-access source (tfds ArrayRecordDataSource: len() and [i] → a decoded record)."""
    if name not in self.splits:
      raise DataError(f"{self.name} prepared in {self.data_dir} has no split {name!r}; its splits: "
                      f"{', '.join(sorted(self.splits))} (set data.tfds_train_split / data.tfds_validation_split)")
    return self.builder.as_data_source(split=name)


@functools.cache
def open_dataset(source: str, data_dir: str) -> Dataset:
  """`source` ("tfds:NAME[:VERSION]") prepared under `data_dir`; a DataError (one line, saying what to do) when
  it is unknown, not prepared there, or prepared in a format without random access."""
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top (only image runs need it)
  from etils import epath              # pylint: disable=g-import-not-at-top
  name = source[len(PREFIX):]
  if not data_dir:
    raise DataError(f"data.image_source={source!r} needs data.tfds_data_dir: the directory (local or gs://) where "
                    f"{name} is prepared")
  # (asked first: tfds.builder logs its whole catalogue before it raises for an unknown name)
  if dataset_name(source) not in tfds.list_builders(with_community_datasets=False):
    raise DataError(f"TFDS has no dataset {name!r} (data.image_source={source!r})")
  builder = tfds.builder(name, data_dir=data_dir)
  info_file = epath.Path(data_dir) / builder.name / str(builder.version) / "dataset_info.json"
  prepare = (f"prepare it once with: tfds build {builder.name} --data_dir={data_dir} --file_format=array_record"
             f" (with --manual_dir=DIR holding the archives you downloaded, for datasets such as imagenet2012)")
  if not info_file.exists():
    raise DataError(f"{builder.name} {builder.version} is not prepared in {data_dir} (no {info_file}): {prepare}")
  info = json.loads(info_file.read_text())
  if info.get("fileFormat", "tfrecord") != "array_record":
    raise DataError(f"{builder.name} in {data_dir} is prepared as {info.get('fileFormat', 'tfrecord')}, which has no "
                    f"random access: {prepare}")
  splits = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"{builder.name} has no 'image' and 'label' features (it has {', '.join(features)}): it is not "
                    f"an image classification dataset")
  return Dataset(name=builder.name, data_dir=data_dir, splits=splits, num_classes=features["label"].num_classes,
                 image_shape=tuple(features["image"].shape), builder=builder)


def check_model(ds: Dataset, vision: VisionConfig, model_name: str) -> None:
  """A DataError naming the first setting of the model that does not fit the dataset."""
  height, width, channels = ds.image_shape
  if vision.num_classes != ds.num_classes:
    raise DataError(f"model {model_name!r} has model.vision.num_classes={vision.num_classes} but {ds.name} has "
                    f"{ds.num_classes} classes: set --set model.vision.num_classes={ds.num_classes}")
  if vision.channels != 3:
    raise DataError(f"model {model_name!r} has model.vision.channels={vision.channels}, but images from TFDS are "
                    f"read as RGB: set --set model.vision.channels=3")
  if height is not None and (height, width) != (vision.image_size,) * 2:
    raise DataError(f"{ds.name}'s images are {height}×{width} but model {model_name!r} has "
                    f"model.vision.image_size={vision.image_size}: set --set model.vision.image_size={height}, or use "
                    f"a dataset of {vision.image_size}×{vision.image_size} images")
  del channels   # any: grey images become three equal channels


class Examples:
  """Random-access examples of one split (a grain data source, like pipeline.Windows and images.ImageExamples):
  [i] is the evaluation view of record i, at_position(i, position) the training view drawn for `position`;
  indices past the split's `num_real` records are mask-0 padding."""

  def __init__(self, ds: Dataset, split: str, data: DataConfig, size: int, *, global_batch: int,
               max_batches: int | None = None, train: bool = False, seed: int = 0):
    """The split padded to whole global batches: at most `max_batches` of them (default: all)."""
    self.ds, self.split, self.size, self.train, self.seed = ds, split, size, train, seed
    self.records = ds.split(split)
    self.num_real = len(self.records)
    batches = -(-self.num_real // global_batch)
    self._length = global_batch * (batches if max_batches is None else min(batches, max_batches))
    self.flip = data.image_flip
    self.randaugment = dict(randaugment_ops=data.image_randaugment_ops, magnitude=data.image_randaugment_magnitude,
                            magnitude_std=data.image_randaugment_std)
    self.source_path = ds.data_dir   # (pipeline.TrainIterator reads remote sources with more threads)
    self.stream_record = {"images": f"{PREFIX}{ds.name}/{split}", "size": size, "flip": self.flip,
                          **(self.randaugment if train else {})}

  def __len__(self) -> int:
    return self._length

  def _record(self, index: int):
    if not 0 <= index < self._length:
      raise IndexError(f"example {index} out of range [0, {self._length})")
    if index >= self.num_real:
      return None, 0
    record = self.records[index]
    return np.asarray(record["image"]), int(record["label"])

  def _example(self, pixels, label, view) -> dict[str, np.ndarray]:
    if pixels is None:
      return {"images": np.zeros((self.size, self.size, 3), np.float32), "labels": np.int32(0),
              "mask": np.float32(0)}
    return {"images": view(pixels), "labels": np.int32(label), "mask": np.float32(1)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    pixels, label = self._record(int(index))
    return self._example(pixels, label, lambda p: augment.eval_image(p, self.size))

  def at_position(self, index: int, position: int) -> dict[str, np.ndarray]:
    if not self.train:
      return self[index]
    pixels, label = self._record(int(index))
    rng = np.random.default_rng([self.seed, int(position)])
    return self._example(pixels, label,
                         lambda p: augment.train_image(p, self.size, rng, flip=self.flip, **self.randaugment))

  def __repr__(self) -> str:
    return f"Examples({PREFIX}{self.ds.name}/{self.split}, real={self.num_real}, length={self._length})"


class EvalBatches:
  """This host's evaluation batches of a split, in order and unaugmented, read lazily (by threads) each time it is
  iterated: global batch b holds examples [b·B, (b+1)·B), host p of P its rows p, p + P, ...; the last batch is
  completed with mask-0 rows."""

  def __init__(self, examples: Examples, *, global_batch: int, process_index: int, process_count: int):
    self.examples, self.local_batch = examples, global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.num_batches = len(examples) // global_batch

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    import grain   # pylint: disable=g-import-not-at-top
    ds = grain.MapDataset.source(self.examples)[self.process_index::self.process_count].batch(self.local_batch)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=EVAL_THREADS, prefetch_buffer_size=EVAL_THREADS)))


def opened(data: DataConfig, vision: VisionConfig, model_name: str) -> Dataset:
  ds = open_dataset(data.image_source, data.tfds_data_dir)
  check_model(ds, vision, model_name)
  return ds


def train_examples(data: DataConfig, vision: VisionConfig, *, global_batch: int, model_name: str,
                   seed: int) -> Examples:
  """The training split's augmented examples, padded to a whole number of global batches."""
  return Examples(opened(data, vision, model_name), data.tfds_train_split, data, vision.image_size,
                  global_batch=global_batch, train=True, seed=seed)


def eval_batches(data: DataConfig, vision: VisionConfig, *, global_batch: int, max_batches: int | None, split: str,
                 model_name: str, process_index: int, process_count: int) -> EvalBatches:
  """`split` ("test": data.tfds_validation_split, or "train"), at most `max_batches` global batches of it."""
  name = {"test": data.tfds_validation_split, "train": data.tfds_train_split}[split]
  examples = Examples(opened(data, vision, model_name), name, data, vision.image_size, global_batch=global_batch,
                      max_batches=max_batches)
  return EvalBatches(examples, global_batch=global_batch, process_index=process_index, process_count=process_count)
