"""Which accelerator this machine has, known without importing JAX (so that a main can choose the platform first).

With libtpu installed (the `plan`, `tpu` and `test` extras) JAX initialises the TPU backend by default, and on a
machine without a TPU libtpu's probe then writes errors to the console ("Failed to find host bounds for
accelerator type ...", "INVALID_ARGUMENT: unexpected worker hostname ...") before falling back to the CPU.
`skip_absent_tpu` (called by every main through tokenformer_jax/cli/__init__.py and launch/__init__.py) says
`JAX_PLATFORMS=cpu` for JAX where there is no TPU and no GPU, unless the user chose the platforms.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import sys

# Set on TPU VMs and GKE TPU nodes (or by a user who names the TPU for libtpu): a TPU is meant to be used.
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")
GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")   # NVIDIA, WSL2, AMD (as JAX looks)


def tpu_devices() -> bool:
  """TPU chips attached to this machine: /dev/accel* (v4) or /dev/vfio/N (v5e and later)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_present() -> bool:
  return tpu_devices() or any(os.environ.get(name) for name in TPU_ENV)


def skip_absent_tpu() -> None:
  """Where no TPU (and no GPU) is present, set JAX_PLATFORMS=cpu before JAX is imported, so that libtpu is never
  asked to find one; a JAX_PLATFORMS the user set is kept, and so is an already imported JAX's choice."""
  if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules or tpu_present():
    return
  if any(os.path.exists(device) for device in GPU_DEVICES):
    return   # JAX picks the GPU (libtpu, if installed, may still say it found no TPU)
  os.environ["JAX_PLATFORMS"] = "cpu"


def describe_absent_tpu() -> None:
  """Before libtpu describes a TPU topology that is not here (cli.plan): tell it what to assume about this host
  instead of asking the metadata server, which answers with errors on the console. No effect on a TPU VM."""
  if not tpu_present():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


# The TPU facts: one table, read by the plan (tokenformer_jax/plan.py), the trainer's MFU (train/logger.py), the
# launcher's gcloud commands (launch/gcloud.py) and the ladder (launch/ladder.py). ---------------------------------
# Source: the Cloud TPU documentation. "TPU v4" (https://cloud.google.com/tpu/docs/v4): each chip has 2 TensorCores,
# 275 TFLOP/s peak (bf16) and 32 GiB of HBM2; a pod is 4096 chips. "TPU types and topologies"
# (https://cloud.google.com/tpu/docs/types-topologies): an accelerator type v4-N names N TensorCores (N/2 chips), and
# a v4 topology is AxBxC with A <= B <= C, each of A, B, C at most 4 or a multiple of 4. A host (a TPU VM worker)
# drives 2x2x1 chips; slices of 64 chips or more are whole 4x4x4 cubes (the unit the pod's optical switches join),
# so their dimensions are multiples of 4 and below a cube the slices are 2x2x1, 2x2x2, 2x2x4 and 2x4x4. v4-N names
# the most cube-like topology of its chips (v4-1536: 8x8x12; v4-8192, the whole pod: 16x16x16).
@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  name: str                                    # the accelerator-type prefix: "v4"
  device_kind: str                             # how jax names its devices: "TPU v4"
  cores_per_chip: int                          # TensorCores per chip (a v4 chip is one "megacore" JAX device)
  hbm_bytes: int                               # per chip
  peak_bf16_flops: float                       # per chip, dense
  chips_per_host: tuple[int, int, int] | None = None   # the chips one host drives, as a grid
  usable_hbm_bytes: float | None = None        # what the TPU compiler leaves to a program (measured on v4)
  pod_chips: int | None = None
  hbm_bytes_per_s: float | None = None         # per chip (the benchmarks' bound on how fast a state can be read)

  @property
  def chips_per_host_count(self) -> int:
    return math.prod(self.chips_per_host)


GiB = 2**30
V4 = TpuGeneration("v4", "TPU v4", cores_per_chip=2, hbm_bytes=32 * GiB, peak_bf16_flops=275e12,
                   chips_per_host=(2, 2, 1), usable_hbm_bytes=30.75 * GiB, pod_chips=4096, hbm_bytes_per_s=1.2e12)
# Known for the trainer's MFU only (the plan and the launcher are for v4): Cloud TPU's v5e, v5p and v6e pages.
TPU_GENERATIONS = (V4,
                   TpuGeneration("v5e", "TPU v5 lite", cores_per_chip=1, hbm_bytes=16 * GiB, peak_bf16_flops=197e12),
                   TpuGeneration("v5p", "TPU v5", cores_per_chip=2, hbm_bytes=95 * GiB, peak_bf16_flops=459e12),
                   TpuGeneration("v6e", "TPU v6 lite", cores_per_chip=1, hbm_bytes=32 * GiB, peak_bf16_flops=918e12))
GPU_PEAK_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}   # dense, per device
V4_SUB_CUBE = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4))


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device named `device_kind` (jax.Device.device_kind); None for one not listed (CPUs).
  The longest matching name wins ("TPU v5 lite" before "TPU v5")."""
  peaks = {g.device_kind: g.peak_bf16_flops for g in TPU_GENERATIONS} | GPU_PEAK_BF16_FLOPS
  matches = sorted((name for name in peaks if device_kind.startswith(name)), key=len)
  return peaks[matches[-1]] if matches else None


def v4_grid_valid(grid: tuple[int, int, int]) -> bool:
  """Whether a chip grid (x, y, z) is a v4 slice topology (see the source above)."""
  if tuple(grid) in V4_SUB_CUBE:
    return True
  return (len(grid) == 3 and list(grid) == sorted(grid) and all(d > 0 and d % 4 == 0 for d in grid)
          and math.prod(grid) <= V4.pod_chips)


@functools.cache
def v4_topologies() -> tuple[tuple[int, int, int], ...]:
  """Every v4 slice topology, fewest chips first."""
  dims = range(4, V4.pod_chips + 1, 4)
  big = [(a, b, c) for a in dims for b in dims if a <= b and a * b * 4 <= V4.pod_chips
         for c in range(b, V4.pod_chips // (a * b) + 1, 4) if v4_grid_valid((a, b, c))]
  return tuple(sorted([*V4_SUB_CUBE, *big], key=lambda g: (math.prod(g), sorted(g, reverse=True))))


@functools.cache
def v4_default_grids() -> dict[int, tuple[int, int, int]]:
  """chips → the topology an accelerator type v4-(2·chips) gets: the most cube-like (the smallest longest side)."""
  grids: dict[int, tuple[int, int, int]] = {}
  for grid in v4_topologies():   # within a chip count, the most cube-like comes first
    grids.setdefault(math.prod(grid), grid)
  return grids


def v4_types() -> str:
  """The valid v4 accelerator types, in words (for error messages)."""
  small = [f"v4-{V4.cores_per_chip * c}" for c in v4_default_grids() if c < 64]
  return (f"{', '.join(small)}, and v4-N for N a multiple of {64 * V4.cores_per_chip} up to "
          f"v4-{V4.pod_chips * V4.cores_per_chip} (N TensorCores, {V4.cores_per_chip} per chip)")


@dataclasses.dataclass(frozen=True)
class V4Slice:
  accelerator: str               # "v4-64"
  grid: tuple[int, int, int]     # its chips along x, y, z

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def cores(self) -> int:
    return self.chips * V4.cores_per_chip

  @property
  def hosts(self) -> int:
    return max(1, self.chips // V4.chips_per_host_count)


def v4_slice(accelerator: str) -> V4Slice:
  """`v4-N` → its slice; a ValueError names the valid types for anything else."""
  match = re.fullmatch(r"v4-(\d+)", accelerator.strip())
  cores = int(match.group(1)) if match else 0
  grid = v4_default_grids().get(cores // V4.cores_per_chip) if cores % V4.cores_per_chip == 0 else None
  if grid is None:
    raise ValueError(f"unknown accelerator type {accelerator!r}; TPU v4 slices are {v4_types()}")
  return V4Slice(accelerator.strip(), grid)
