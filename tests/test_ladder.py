"""One ladder definition: the plan compiles and the launcher runs the same stages, and the launcher refuses a
stage that the plan finds does not fit its slice before it calls gcloud."""
from __future__ import annotations

import types

import pytest

from helpers import run_cli
from launch import gcloud, ladder as ladder_main
from launch.ladder import launch_ladder
from launch.runner import Runner
from tokenformer_jax import plan
from tokenformer_jax.ladder import load_ladder

TPU_DATA = ["--set=data.tfds_data_dir=gs://bkt/tfds", "--set=data.tokenizer=gs://bkt/neox.model", "--set=grad_accum=2"]


def run(module, *args):
  result = run_cli(module, *args, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.slow
def test_plan_and_launch_name_the_same_stages_with_the_same_settings():
  planned = run("tokenformer_jax.cli.plan", "--ladder=paper", "--dry_run", *TPU_DATA)
  launched = run("launch.ladder", "--ladder=paper", "--backend=tpu", "--workdir=gs://bkt/ladder", "--project=p",
                 "--zone=z", "--dry_run", *TPU_DATA)
  planned = [line for line in planned.splitlines() if line.startswith("stage ")]
  launched = [line[2:] for line in launched.splitlines() if line.startswith("# stage ") and " | " in line]
  assert planned == launched and len(planned) == 4
  # ... and they are experiments/ladder.py's stages, with the override applied to every one
  _, stages = load_ladder("paper")
  for line, stage in zip(planned, stages, strict=True):
    cfg = stage.config
    assert line.startswith(f"stage {stage.name}: {stage.name} on {stage.accelerator} | {cfg.model.dtype}, mesh "
                           f"{cfg.mesh.preset} ")
    assert f"remat {cfg.model.remat}, grad_accum 2, batch 512 × 1024" in line and cfg.grad_accum == 1


def not_fitting(name):
  def planner(cfg, topology, cost=True):
    planned.append((cfg.model.name, topology, cost))
    fits = cfg.model.name != name
    return plan.Plan(config=cfg.model.name, topology=topology, chips=64, mesh={}, preset=cfg.mesh.preset,
                     remat=cfg.model.remat, grad_accum=cfg.grad_accum, tokens_per_step=1, fits=fits,
                     hbm={"total": (20 if fits else 45.5) * plan.GiB}, model_flops_per_step=1.0,
                     error=None if fits else "state + temporaries 45.50 GiB > 30.75 GiB usable")
  planned = []
  return planner, planned


def test_launch_refuses_a_stage_that_does_not_fit_before_any_gcloud_call(monkeypatch):
  # launch.tpu reads its flags from absl's global FLAGS; here they are given directly. Preflight (project, zone,
  # bucket) is the backend's first gcloud call.
  tpu_flags = types.SimpleNamespace(env=[], compilation_cache="", slices=1, preflight=True)
  monkeypatch.setattr(ladder_main, "flags", types.SimpleNamespace(FLAGS=tpu_flags))
  monkeypatch.setattr(ladder_main, "make_spec", lambda name, accelerator: gcloud.TpuSpec(
      name=name, zone="us-central2-b", project="p", accelerator=accelerator))
  monkeypatch.setattr(ladder_main, "preflight", lambda *args: (_ for _ in ()).throw(RuntimeError("gcloud called")))
  planner, planned = not_fitting("paper_757m")
  monkeypatch.setattr(plan, "libtpu_missing", lambda: None)
  monkeypatch.setattr(plan, "plan_in_child", planner)
  overrides = [o.removeprefix("--set=") for o in TPU_DATA[:2]]
  said = []
  runner = Runner(attempts=1, say=said.append)
  with pytest.raises(ValueError, match=r"stage paper_757m does not fit v4-128: its step needs 45.5 GiB per chip"):
    launch_ladder("paper", "tpu", "gs://bkt/ladder", overrides, runner, "tf")
  assert planned == [("paper_124m", "v4-64", False), ("paper_354m", "v4-64", False), ("paper_757m", "v4-128", False)]

  # Without libtpu the check is skipped, and says so, before the first gcloud call.
  monkeypatch.setattr(plan, "libtpu_missing", lambda: "libtpu is not installed: pip install -e '.[plan]'")
  said.clear()
  with pytest.raises(RuntimeError, match="gcloud called"):
    launch_ladder("paper", "tpu", "gs://bkt/ladder", overrides, runner, "tf")
  assert said[0].startswith("# fit check skipped: libtpu is not installed") and len(planned) == 3


def test_compare_plans_each_stage_on_its_own_slice_and_names_the_fastest_that_fits(monkeypatch, capsys):
  # The TPU compiler's answers, stood in: lean+none does not fit; of the rest, plain+projections is fastest for
  # 354m and lean+lean for 1.4B (per-candidate cost-model seconds below).
  seconds = {("paper_354m", "plain", "projections"): 0.34, ("paper_354m", "lean", "projections"): 0.41,
             ("paper_354m", "lean", "lean"): 0.40, ("paper_1_4b", "plain", "projections"): 0.47,
             ("paper_1_4b", "lean", "projections"): 0.52, ("paper_1_4b", "lean", "lean"): 0.45}
  planned = []

  def planner(cfg, topology, cost=True):
    key = (cfg.model.name, cfg.model.pattention_kernel, cfg.model.remat)
    planned.append((*key, topology, cost))
    return plan.Plan(config=cfg.model.name, topology=topology, chips=64, mesh={"data": 1, "fsdp": 64, "tensor": 1},
                     preset=cfg.mesh.preset, remat=cfg.model.remat, grad_accum=1, tokens_per_step=512 * 1024,
                     fits=key in seconds, hbm={"total": 8 * plan.GiB}, model_flops_per_step=4e15,
                     step_seconds=seconds.get(key), kernel=cfg.model.pattention_kernel)

  from tokenformer_jax.cli import plan as plan_cli
  monkeypatch.setattr(plan, "plan_in_child", planner)
  _, stages = load_ladder("paper")
  plan_cli.compare([s for s in stages if s.name in ("paper_354m", "paper_1_4b")], ["plain", "lean"],
                   ["none", "projections", "lean"])
  out = capsys.readouterr().out
  # Every kernel × remat, each with its cost, on the stage's own slice (v4-64 for 354m, v4-128 for 1.4B).
  assert [(name, kernel, remat) for name, kernel, remat, _, _ in planned] == [
      (name, kernel, remat) for name in ("paper_354m", "paper_1_4b") for kernel in ("plain", "lean")
      for remat in ("none", "projections", "lean")]
  assert {(name, topology, cost) for name, _, _, topology, cost in planned} == {
      ("paper_354m", "v4-64", True), ("paper_1_4b", "v4-128", True)}
  assert out.count("| paper_354m |") == 2 * 6 and out.count("| paper_1_4b |") == 2 * 6   # streamed, then tabled
  # MFU = 4e15 / (64 chips · 275e12 · seconds): 66.8% at 0.34 s, 50.5% at 0.45 s.
  fastest = out.split("fastest that fits:")[1].split()
  assert " ".join(fastest) == ("paper_354m on v4-64: kernel plain, remat projections (MFU 66.8%) "
                               "paper_1_4b on v4-128: kernel lean, remat lean (MFU 50.5%)")
