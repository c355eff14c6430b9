"""The TPU plan: a real train step compiled by the TPU compiler for a v4 topology, on this CPU machine."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tokenformer_jax import plan, sharding
from tokenformer_jax.config import MeshConfig, count_params, load_config

NO_LIBTPU = plan.libtpu_missing()
needs_libtpu = pytest.mark.skipif(NO_LIBTPU is not None, reason=f"cannot compile for TPU here: {NO_LIBTPU}")


def test_topologies():
  assert plan.parse_topology("v4-8") == plan.Topology("v4-8", (2, 2, 1))
  assert plan.parse_topology("v4-32").chips == 16
  assert plan.parse_topology("v4:2x2x4").chips == 16
  two = plan.parse_topology("2xv4-32")
  assert (two.num_slices, two.chips) == (2, 32)
  for bad in ("v5e-8", "v4-12", "v4:3x2x1"):
    with pytest.raises(plan.PlanError, match="topology"):
      plan.parse_topology(bad)


@needs_libtpu
def test_meshes_follow_the_topology_and_cross_slices_along_data():
  devices = plan.topology_devices(plan.parse_topology("2xv4-16"))   # two slices of 8 chips (4 hosts)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=2), devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of[0] == 0).all() and (slice_of[1] == 1).all()
  with pytest.raises(ValueError, match="make mesh.data a multiple of 2"):
    sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices)


def tiny(global_batch=16, seq_len=128, **model_changes):
  model = load_config("experiments/tiny.py:tiny_tokenformer")
  return plan.ladder_train_config(model.replace(**model_changes), global_batch=global_batch,
                                  seq_len=seq_len)


@pytest.mark.slow
@needs_libtpu
def test_plan_compiles_a_tiny_model_for_a_v4_8():
  result = plan.plan(tiny(), "v4-8")
  assert result.fits and result.chips == 4 and result.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  params_and_optimizer = result.hbm["params"] + result.hbm["optimizer"]
  assert 0 < params_and_optimizer < result.hbm["total"] < plan.HBM_USABLE
  # FSDP over 4 chips: a chip holds a quarter of the float32 parameters, and twice that in Adam moments.
  n_params = count_params(tiny().model)["total"]
  assert result.hbm["params"] == pytest.approx(4 * n_params / 4)
  assert result.hbm["optimizer"] == pytest.approx(2 * result.hbm["params"], rel=0.01)
  # The compiler's FLOPs (no remat) agree with the analytic model FLOPs plus the one recomputation left: the
  # token-token attention (jax.checkpoint in causal_self_attention) reruns its forward, 2·2·T·d per layer and token.
  cfg = tiny()
  attention_forward = 4 * cfg.data.seq_len * cfg.model.d_model * cfg.model.n_layers * result.tokens_per_step
  assert result.compiler_flops_per_step == pytest.approx(result.model_flops_per_step + attention_forward, rel=0.15)
  assert result.step_seconds > 0 and 0 < result.mfu < 1
  assert result.days(30e9) > 0 and result.chip_hours(30e9) == pytest.approx(result.days(30e9) * 24 * 4)
  assert "tiny_tokenformer on v4-8: 4 chips" in plan.describe(result, 30e9)


@pytest.mark.slow
@needs_libtpu
def test_a_step_that_does_not_fit_is_reported_not_raised():
  # The logits of 512 × 4096 tokens over a 50k vocabulary alone need ~100 GB per chip.
  result = plan.plan(tiny(global_batch=512, seq_len=4096, vocab_size=50277, max_seq_len=4096), "v4-8", cost=False)
  assert not result.fits and "memory" in result.error.lower()
  assert result.hbm["temp"] > plan.HBM_USABLE


@pytest.mark.slow
def test_cli_errors_are_one_line():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-m", "tokenformer_jax.cli.plan", "--config=experiments/tiny.py:tiny_tokenformer",
                           "--topology=v5e-8"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_the_plan_and_the_launcher_accept_exactly_the_same_slices():
  # One table (tokenformer_jax/accelerators.py, from the Cloud TPU v4 documentation) for both: every v4-N of the
  # pod's sizes, no other; the same chips and hosts.
  from launch import gcloud

  def accepted(check, name) -> bool:
    try:
      check(name)
    except ValueError:   # plan.PlanError is one
      return False
    return True

  names = [f"v4-{n}" for n in range(0, 2 * 4096 + 130)]
  planned = {name for name in names if accepted(plan.parse_topology, name)}
  launched = {name for name in names if accepted(gcloud.check_accelerator, name)}
  assert planned == launched
  # 4, 8, 16 and 32 chips below a 4x4x4 cube, then every whole number of cubes up to the pod's 64
  assert planned == {f"v4-{2 * chips}" for chips in (4, 8, 16, 32, *range(64, 4097, 64))} and len(planned) == 68
  for name in planned:
    chips = int(name[3:]) // 2
    spec = gcloud.TpuSpec("tf", "z", "p", name)
    assert plan.parse_topology(name).chips == spec.chips == chips and spec.hosts == max(1, chips // 4)
  assert plan.parse_topology("v4-1536").grid == (8, 8, 12) and plan.parse_topology("v4-8192").grid == (16, 16, 16)
  assert plan.parse_topology("v4-512").grid == (4, 8, 8) and plan.parse_topology("v4-64").grid == (2, 4, 4)
  # A chip grid the plan takes (v4:AxBxC: A <= B <= C, each <= 4 or a multiple of 4, whole hosts) is a slice the
  # launcher creates, by its size; and each v4-N's grid is one of them.
  grids = {(a, b, c) for a in range(1, 17) for b in range(1, 17) for c in range(1, 65)
           if accepted(plan.parse_topology, f"v4:{a}x{b}x{c}")}
  assert {(2, 2, 1), (2, 2, 2), (2, 4, 4), (4, 4, 12), (8, 8, 12), (16, 16, 16)} <= grids
  assert not {(2, 2, 3), (4, 2, 2), (2, 4, 8), (4, 4, 6), (3, 4, 4)} & grids
  assert {f"v4-{2 * a * b * c}" for a, b, c in grids} <= launched
  assert all(accepted(plan.parse_topology, "v4:{}x{}x{}".format(*plan.parse_topology(name).grid)) for name in planned)
  # The peak FLOP/s of the plan's MFU and of the trainer's are the same number
  from tokenformer_jax import accelerators
  from tokenformer_jax.train import logger
  assert accelerators.peak_flops("TPU v4") == plan.PEAK_FLOPS_PER_CHIP == 275e12
  assert accelerators.peak_flops("TPU v5 lite") == 197e12 and accelerators.peak_flops("cpu") is None
  assert logger.peak_flops_per_device() is None   # these tests run on CPU
