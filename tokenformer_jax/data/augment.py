"""Per-image augmentation of photographs (the ImageNet recipe's), on PIL, drawn from a numpy Generator.

    train: random-resized crop (area 8–100% of the image, aspect 3/4–4/3, log-uniform) → bicubic resize to the
           model's size → left-right flip half of the time → RandAugment
    eval:  bicubic resize of the shorter side to size / 0.875 → centre crop (the usual 87.5% crop)

then pixels / 255, standardised per channel by ImageNet's mean and std. Mixup, cutmix and label smoothing mix
whole batches and live in the train step (train/mixing.py), where the global batch is.

RandAugment (Cubuk et al., 2020) as the MAE / DeiT recipe configures it (timm's "rand-m9-mstd0.5-inc1"): `ops`
operations per image, each chosen uniformly from OPS and applied with probability 0.5, at a magnitude drawn per
operation from N(magnitude, magnitude_std) clipped to [0, 10]; geometric and enhancement operations take a random
sign. The ranges at magnitude 10: rotate ±30°, shear ±0.3, translate ±45% of the side, posterize to 4 bits less,
solarize from threshold 0, add 110 below 128, colour / contrast / brightness / sharpness ×(1 ± 0.9); empty
pixels get the ImageNet mean colour. Written for this project from the paper and the recipe's description.

Pure functions of (image, Generator): the data source seeds the Generator with (seed, the example's position in
the stream), so that a resumed run, on any number of hosts, draws the same augmentations.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
FILL = tuple(int(round(255 * m)) for m in MEAN)   # (124, 116, 104)
EVAL_CROP = 0.875
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def normalise(image: Image.Image) -> np.ndarray:
  """uint8 RGB → float32 [H, W, 3] standardised by ImageNet's per-channel mean and std."""
  return (np.asarray(image, np.float32) / 255.0 - MEAN) / STD


def to_pil(pixels: np.ndarray) -> Image.Image:
  """uint8 [H, W] or [H, W, 1 or 3] → an RGB image (grey images as three equal channels)."""
  if pixels.ndim == 3 and pixels.shape[2] == 1:
    pixels = pixels[..., 0]
  return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
  width, height = image.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*SCALE)
    aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
  side = min(width, height)   # ten misses (a very long image): the central square
  left, top = (width - side) // 2, (height - side) // 2
  return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def centre_crop(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  scale = size / EVAL_CROP / min(width, height)
  w, h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
  image = image.resize((w, h), Image.BICUBIC)
  left, top = (w - size) // 2, (h - size) // 2
  return image.crop((left, top, left + size, top + size))


def _signed(level: float, top: float, rng: np.random.Generator) -> float:
  return level / 10 * top * (1 if rng.random() < 0.5 else -1)


def _affine(image, matrix):
  return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


OPS = {
    "auto_contrast": lambda im, m, rng: ImageOps.autocontrast(im),
    "equalize": lambda im, m, rng: ImageOps.equalize(im),
    "invert": lambda im, m, rng: ImageOps.invert(im),
    "rotate": lambda im, m, rng: im.rotate(_signed(m, 30, rng), resample=Image.BILINEAR, fillcolor=FILL),
    "posterize": lambda im, m, rng: ImageOps.posterize(im, 8 - int(m / 10 * 4)),
    "solarize": lambda im, m, rng: ImageOps.solarize(im, int(256 - m / 10 * 256)),
    "solarize_add": lambda im, m, rng: Image.fromarray(np.where(
        np.asarray(im) < 128, np.minimum(np.asarray(im, np.int32) + int(m / 10 * 110), 255),
        np.asarray(im)).astype(np.uint8)),
    "color": lambda im, m, rng: ImageEnhance.Color(im).enhance(1 + _signed(m, 0.9, rng)),
    "contrast": lambda im, m, rng: ImageEnhance.Contrast(im).enhance(1 + _signed(m, 0.9, rng)),
    "brightness": lambda im, m, rng: ImageEnhance.Brightness(im).enhance(1 + _signed(m, 0.9, rng)),
    "sharpness": lambda im, m, rng: ImageEnhance.Sharpness(im).enhance(1 + _signed(m, 0.9, rng)),
    "shear_x": lambda im, m, rng: _affine(im, (1, _signed(m, 0.3, rng), 0, 0, 1, 0)),
    "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(m, 0.3, rng), 1, 0)),
    "translate_x": lambda im, m, rng: _affine(im, (1, 0, _signed(m, 0.45, rng) * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _signed(m, 0.45, rng) * im.size[1])),
}
NAMES = tuple(OPS)


def rand_augment(image: Image.Image, rng: np.random.Generator, *, ops: int, magnitude: float,
                 magnitude_std: float = 0.0, prob: float = 0.5) -> Image.Image:
  for name in rng.choice(NAMES, size=ops):
    if rng.random() < prob:
      level = float(np.clip(rng.normal(magnitude, magnitude_std) if magnitude_std else magnitude, 0, 10))
      image = OPS[name](image, level, rng)
  return image


def train_image(pixels: np.ndarray, size: int, rng: np.random.Generator, *, flip: bool = True,
                randaugment_ops: int = 0, magnitude: float = 9.0, magnitude_std: float = 0.5) -> np.ndarray:
  """A training view of uint8 `pixels` [H, W, C]: float32 [size, size, 3], standardised."""
  image = random_resized_crop(to_pil(pixels), size, rng)
  if flip and rng.random() < 0.5:
    image = ImageOps.mirror(image)
  if randaugment_ops:
    image = rand_augment(image, rng, ops=randaugment_ops, magnitude=magnitude, magnitude_std=magnitude_std)
  return normalise(image)


def eval_image(pixels: np.ndarray, size: int) -> np.ndarray:
  """The evaluation view of uint8 `pixels` [H, W, C]: float32 [size, size, 3], standardised."""
  return normalise(centre_crop(to_pil(pixels), size))
