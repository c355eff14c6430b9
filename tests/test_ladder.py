"""One ladder definition: the plan compiles and the launcher runs the same stages, and the launcher refuses a
stage that the plan finds does not fit its slice before it calls gcloud."""
from __future__ import annotations

import dataclasses
import json
import types

import pytest

from helpers import assert_fails_with_one_line, run_cli
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


# The slices that cost least -----------------------------------------------------------------------------------
TINY_SLICES = ("v4-8", "v4-16", "v4-32")
SECONDS = {4: 400.0, 8: 250.0}   # the stand-in cost model's step time on 4 and 8 chips (40 s more per micro-batch)


def tiny_tpu_plans(cfg, topology, cost=True):
  """The TPU compiler's answers for the tiny ladder's stages, stood in: a step fits while each chip holds at most
  2 rows of a micro-batch (tiny_2: 1 row); slower but fewer chips on a v4-8 (4 chips) than on a v4-16 (8)."""
  chips = plan.parse_topology(topology).chips
  micro = cfg.global_batch // cfg.grad_accum
  if micro % chips:
    raise plan.PlanError(f"micro-batch {micro} does not split over {chips} chips")
  total = micro // chips * (20 if cfg.model.name == "tiny_2" else 12) * plan.GiB
  fits = total <= plan.HBM_USABLE
  return plan.Plan(config=cfg.model.name, topology=topology, chips=chips, mesh={"data": chips, "fsdp": 1, "tensor": 1},
                   preset=cfg.mesh.preset, remat=cfg.model.remat, grad_accum=cfg.grad_accum,
                   tokens_per_step=cfg.global_batch * cfg.data.seq_len, fits=fits,
                   hbm={"params": 1e6, "optimizer": 2e6, "total": total}, model_flops_per_step=1e15,
                   step_seconds=SECONDS[chips] + 40.0 * (cfg.grad_accum - 1) if fits and cost else None)


@pytest.fixture
def tiny_plans(tmp_path, monkeypatch, capsys):
  """The tiny ladder searched over TINY_SLICES with the stand-in compiler, its stages on a v4-16 of their own,
  within 0.25 days: (what it chose, what it printed, PLAN.json, the plan cache that now holds every answer)."""
  from tokenformer_jax.cli import plan as plan_cli
  monkeypatch.setattr(plan, "plan_in_child", tiny_tpu_plans)
  monkeypatch.setattr(plan, "libtpu_missing", lambda: None)
  _, stages = load_ladder("tiny")
  stages = [dataclasses.replace(s, accelerator="v4-16") for s in stages]
  cache, out = tmp_path / "plans.jsonl", tmp_path / "PLAN.json"
  chosen = plan_cli.cheapest(stages, 0.25, plan_cli.planner(str(cache)), TINY_SLICES, ["none"],
                             ladder_name="tiny", out=str(out))
  return chosen, capsys.readouterr().out, json.loads(out.read_text()), cache


def test_the_search_chooses_the_slices_with_the_fewest_chip_hours_within_the_deadline(tiny_plans):
  chosen, printed, record, _ = tiny_plans
  # Steps: tiny_0 30, tiny_1 and tiny_2 20. All on v4-16 (the ladder's own): 70 × 250 s = 0.2025 days, 38.9
  # chip-hours. A v4-8 saves chip-hours (4 chips × 400 s < 8 × 250 s) but takes longer: within 0.25 days only
  # one stage can move, and tiny_1 saves the most (tiny_2 needs 2 micro-batches there: 440 s a step).
  assert [(c.stage, c.accelerator, c.grad_accum) for c in chosen] == [
      ("tiny_0", "v4-16", 1), ("tiny_1", "v4-8", 1), ("tiny_2", "v4-16", 1)]
  assert sum(c.days for c in chosen) == pytest.approx((30 * 250 + 20 * 400 + 20 * 250) / 86400)
  assert sum(c.chip_hours for c in chosen) == pytest.approx((8 * 30 * 250 + 4 * 20 * 400 + 8 * 20 * 250) / 3600)
  assert "global_batch=8 does not split over its chips with any grad_accum" in printed   # v4-32: 16 chips
  assert "  tiny_2 on v4-8 (remat none, grad_accum 1): does not fit" in printed
  # MFU = 1e15 model FLOPs / (8 chips × 275e12 × 250 s) = 0.18% (4 × 400 s: 0.23%)
  assert ("| tiny_1 | v4-16 (8), none, grad_accum 1 | 0.2% | 0.06 | 11 | v4-8 (4), none, grad_accum 1 | 0.2% | "
          "0.09 | 9 |") in printed
  assert chosen[1].mfu == pytest.approx(1e15 / (4 * 275e12 * 400))
  assert ("chosen within 0.25 days: 0.24 days, 37 chip-hours; the ladder's own slices: 0.20 days, 39 chip-hours; "
          "saved 2 chip-hours (6%)") in printed
  entries = {e["stage"]: e for e in record["stages"]}
  assert entries["tiny_1"]["set"] == ["grad_accum=1", "model.remat=none"] and entries["tiny_1"]["chips"] == 4
  assert entries["tiny_1"]["ladder_choice"]["accelerator"] == "v4-16" and record["deadline_days"] == 0.25


def test_more_days_move_every_stage_to_the_cheapest_slice_and_too_few_are_one_line(tiny_plans):
  from tokenformer_jax.ladder import cheapest_within
  _, _, _, cache = tiny_plans
  # The same answers from the cache, for another deadline: all on the v4-8, tiny_2 in 2 micro-batches.
  from tokenformer_jax.cli import plan as plan_cli
  _, stages = load_ladder("tiny")
  chosen = plan_cli.cheapest(stages, 1.0, plan_cli.planner(str(cache)), TINY_SLICES, ["none"], ladder_name="tiny")
  assert [(c.accelerator, c.grad_accum) for c in chosen] == [("v4-8", 1), ("v4-8", 1), ("v4-8", 2)]
  with pytest.raises(ValueError, match=r"^--deadline_days=0.1 cannot be met: the fastest slices tried take 0.20 "
                                       r"days \(tiny_0 on v4-16 0.09, tiny_1 on v4-16 0.06, tiny_2 on v4-16 0.06\)"):
    plan_cli.cheapest(stages, 0.1, plan_cli.planner(str(cache)), TINY_SLICES, ["none"], ladder_name="tiny")
  with pytest.raises(ValueError, match="fits none of the slices tried"):
    cheapest_within([[], []], 1.0)


@pytest.mark.slow
def test_the_launcher_creates_the_slices_the_plan_chose(tiny_plans, tmp_path):
  # As a user runs them: the plan (its answers from the cache: nothing compiles) refuses a deadline nothing meets
  # in one line; the launcher's dry run creates the slices of PLAN.json (a v4-16, a v4-8, a v4-16 again) and trains
  # each stage with the plan's grad_accum and remat.
  _, _, _, cache = tiny_plans
  result = run_cli("tokenformer_jax.cli.plan", "--ladder=tiny", "--search", f"--slices={','.join(TINY_SLICES)}",
                   "--remats=none", f"--plan_cache={cache}", "--deadline_days=0.1", f"--slices_out={tmp_path}/no.json")
  assert_fails_with_one_line(result, "--deadline_days=0.1 cannot be met: the fastest slices tried take 0.20 days")
  assert not (tmp_path / "no.json").exists()
  out = run("launch.ladder", "--ladder=tiny", "--backend=tpu", "--workdir=gs://bkt/tiny", "--project=p", "--zone=z",
            f"--slices_from={cache.parent}/PLAN.json", "--dry_run")
  creates = [line.split()[5:7] + [w for w in line.split() if w.startswith("--accelerator-type=")]
             for line in out.splitlines() if line.startswith("gcloud compute tpus tpu-vm create")]
  assert creates == [["tokenformer-tiny-0", "--zone=z", "--accelerator-type=v4-16"],
                     ["tokenformer-tiny-1", "--zone=z", "--accelerator-type=v4-8"],
                     ["tokenformer-tiny-2", "--zone=z", "--accelerator-type=v4-16"]]
  trains = [line for line in out.splitlines() if "tokenformer_jax.cli.train" in line]
  assert len(trains) == 3 and all("--set=grad_accum=1 --set=model.remat=none" in line for line in trains)
  assert "# stage tiny_1: tiny_1 on v4-8 | float32" in out
