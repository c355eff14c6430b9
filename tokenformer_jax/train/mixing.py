"""Mixup, cutmix and label smoothing: what the ImageNet recipe does to whole training batches, inside the train step.

They mix pairs of images of the global batch, so they live here and not in the per-example pipeline
(data/augment.py): image i is mixed with image b-1-i (the batch reversed, as timm does), by a λ drawn from
Beta(α, α) of a key folded from (data.shuffle_seed, the step). The pairs and draws are those of the global batch
and the step, whatever the number of hosts, devices or micro-batches, so a resumed run mixes as the
uninterrupted one.

    mixup  (data.image_mixup = α > 0):  x = λ·x_i + (1-λ)·x_j
    cutmix (data.image_cutmix = α > 0): a box of area (1-λ) of the image, centred uniformly and clipped at the
                                        border, taken from x_j; λ then becomes the area actually kept
    both:  each batch takes one of the two, with probability 1/2 (timm's switch_prob)
    targets: λ·onehot(y_i) + (1-λ)·onehot(y_j), smoothed to (1-ε)·t + ε/K (data.image_label_smoothing = ε)

Padding rows (mask 0; the end of an epoch) take part in the mixing like any row, but their own loss is not
counted. Evaluation is never mixed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokenformer_jax.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Mixing:
  mixup: float = 0.0
  cutmix: float = 0.0
  label_smoothing: float = 0.0
  seed: int = 0

  @classmethod
  def of(cls, data: DataConfig) -> Mixing | None:
    """The batch mixing `data` asks for, None when it asks for none."""
    mixing = cls(data.image_mixup, data.image_cutmix, data.image_label_smoothing, data.shuffle_seed)
    return mixing if (mixing.mixup or mixing.cutmix or mixing.label_smoothing) else None


def cut_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """(a [height, width] bool mask of the box to paste, the fraction of the image outside it)."""
  ratio = jnp.sqrt(1.0 - lam)
  cy, cx = (jax.random.uniform(k) for k in jax.random.split(key))
  h, w = ratio * height, ratio * width
  top, bottom = jnp.clip(jnp.round(cy * height - h / 2), 0, height), jnp.clip(jnp.round(cy * height + h / 2), 0, height)
  left, right = jnp.clip(jnp.round(cx * width - w / 2), 0, width), jnp.clip(jnp.round(cx * width + w / 2), 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  return box, 1.0 - (bottom - top) * (right - left) / (height * width)


def mix(mixing: Mixing, batch: dict, step: jax.Array, num_classes: int) -> dict:
  """`batch` with its images mixed and "targets" [b, num_classes] float32 (the soft labels the loss uses)."""
  images, labels = batch["images"], batch["labels"]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mixing.mixup or mixing.cutmix:
    key = jax.random.fold_in(jax.random.key(mixing.seed), step)
    k_choice, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
    other = images[::-1]
    if mixing.mixup:
      lam_mixup = jax.random.beta(k_mixup, mixing.mixup, mixing.mixup)
      mixed_up = (lam_mixup * images + (1 - lam_mixup) * other).astype(images.dtype)
    if mixing.cutmix:
      box, lam_cutmix = cut_box(k_box, jax.random.beta(k_cutmix, mixing.cutmix, mixing.cutmix), *images.shape[1:3])
      cut = jnp.where(box[None, :, :, None], other, images)
    if mixing.mixup and mixing.cutmix:
      use_cutmix = jax.random.bernoulli(k_choice)
      mixed, lam = jnp.where(use_cutmix, cut, mixed_up), jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    elif mixing.mixup:
      mixed, lam = mixed_up, lam_mixup
    else:
      mixed, lam = cut, lam_cutmix
    images, targets = mixed, lam * targets + (1 - lam) * targets[::-1]
  if mixing.label_smoothing:
    targets = (1 - mixing.label_smoothing) * targets + mixing.label_smoothing / num_classes
  return {**batch, "images": images, "targets": targets}
