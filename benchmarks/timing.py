"""Interleaved wall-clock timing for a shared, noisy CPU.

Every repeat runs each variant once, back to back, alternating the order between repeats, so a burst of
load from other processes lands on all variants alike. Ratios are taken per repeat (two adjacent runs) and
the median of those is reported, which is steadier than a ratio of two medians when the load drifts.
A sample of a fast function is the mean over enough back-to-back calls to last `min_sample_ms`, so that
a single scheduler hiccup does not decide it.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import jax
import numpy as np


def time_ms(fn: Callable[[], object], number: int = 1) -> float:
  """Mean milliseconds per call over `number` calls, each waited for."""
  start = time.perf_counter()
  for _ in range(number):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) * 1e3 / number


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                min_sample_ms: float = 100.0) -> dict[str, np.ndarray]:
  """{name: [repeats] milliseconds per call}. `warmup` untimed calls of each first (the first may compile)."""
  number = {}
  for name, fn in fns.items():
    for _ in range(warmup - 1):
      jax.block_until_ready(fn())
    number[name] = max(1, math.ceil(min_sample_ms / time_ms(fn)))
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      times[name].append(time_ms(fns[name], number[name]))
  return {name: np.asarray(t) for name, t in times.items()}


def min_ratio(times: dict[str, np.ndarray], numerator: str, denominator: str) -> float:
  """Ratio of the fastest samples: load from other processes only ever adds time, so under heavy load the
  minimum is the better estimate of the unloaded time (and a check on the paired median)."""
  return float(times[numerator].min() / times[denominator].min())


def paired_ratio(times: dict[str, np.ndarray], numerator: str, denominator: str) -> tuple[float, float, float]:
  """Median, 25th and 75th percentile of the per-repeat ratio numerator/denominator."""
  ratios = times[numerator] / times[denominator]
  return float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))
