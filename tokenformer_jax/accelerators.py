"""Which accelerator this machine has, known without importing JAX (so that a main can choose the platform first).

With libtpu installed (the `plan`, `tpu` and `test` extras) JAX initialises the TPU backend by default, and on a
machine without a TPU libtpu's probe then writes errors to the console ("Failed to find host bounds for
accelerator type ...", "INVALID_ARGUMENT: unexpected worker hostname ...") before falling back to the CPU.
`skip_absent_tpu` (called by every main through tokenformer_jax/cli/__init__.py and launch/__init__.py) says
`JAX_PLATFORMS=cpu` for JAX where there is no TPU and no GPU, unless the user chose the platforms.
"""
from __future__ import annotations

import glob
import os
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
