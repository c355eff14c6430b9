"""What one CPU core decodes and augments per second for the ImageNet recipe (data/augment.py), and how many cores a
TPU v4 host needs for it at a planned step time.

Inputs: JPEGs of ImageNet's typical size (500 × 375, quality 90) of smooth random content (noise would make the
JPEGs unrealistically large). Per image, as data/tfds_images.py does it: JPEG decode (PIL, what TFDS's numpy
decoder uses without OpenCV), then the training view (random-resized crop → 224², flip, RandAugment 2 ops at 9)
or the evaluation view (resize + centre crop). One process, one core.

  python benchmarks/bench_image_pipeline.py --images=200 --step_seconds=0.5 --hosts=4
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from tokenformer_jax.data import augment

V4_CORES_PER_HOST = 240   # a TPU v4 VM host: 240 vCPUs (2 × 60-core AMD EPYC with SMT), 4 chips


def jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    small = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


def decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def per_second(work, items) -> float:
  started = time.perf_counter()
  for i, item in enumerate(items):
    work(i, item)
  return len(items) / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=200, help="JPEGs timed per view")
  parser.add_argument("--size", type=int, default=224, help="the model's image size")
  parser.add_argument("--global_batch", type=int, default=4096)
  parser.add_argument("--step_seconds", type=float, default=None,
                      help="a planned train step time (cli.plan's cost model) to size the hosts' CPU against")
  parser.add_argument("--hosts", type=int, default=4, help="hosts of the slice (v4-32: 4)")
  args = parser.parse_args()
  data = jpegs(args.images)
  pixels = [decode(d) for d in data]
  rates = {
      "decode": per_second(lambda i, d: decode(d), data),
      "train view": per_second(lambda i, p: augment.train_image(
          p, args.size, np.random.default_rng([0, i]), randaugment_ops=2, magnitude=9, magnitude_std=0.5), pixels),
      "train view, no RandAugment": per_second(lambda i, p: augment.train_image(
          p, args.size, np.random.default_rng([0, i])), pixels),
      "eval view": per_second(lambda i, p: augment.eval_image(p, args.size), pixels),
  }
  mean_kb = sum(map(len, data)) / len(data) / 1024
  print(f"{args.images} JPEGs of 500×375 ({mean_kb:.0f} KiB each) → {args.size}², one core:")
  for name, rate in rates.items():
    print(f"  {name:28s} {rate:8.1f} images/s")
  train = 1 / (1 / rates["decode"] + 1 / rates["train view"])
  print(f"  {'decode + train view':28s} {train:8.1f} images/s per core")
  if args.step_seconds:
    need = args.global_batch / args.step_seconds / args.hosts
    print(f"at {args.step_seconds:g} s per step of {args.global_batch} images on {args.hosts} hosts: "
          f"{need:,.0f} images/s per host = {need / train:.0f} cores of this kind per host "
          f"(a v4 host has {V4_CORES_PER_HOST} vCPUs)")


if __name__ == "__main__":
  main()
