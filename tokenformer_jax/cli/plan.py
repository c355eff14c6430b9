"""Plan a TPU v4 run from this machine: compile the real train step for a topology (needs `pip install -e '.[plan]'`).

  python -m tokenformer_jax.cli.plan --config=experiments/paper.py:ladder_1_4b --topology=v4-32
  python -m tokenformer_jax.cli.plan --config=experiments/ladder.py:paper_1_4b --topology=v4-128 \
      --set model.remat=full --set mesh.preset=fsdp_tp --set mesh.tensor=4
  python -m tokenformer_jax.cli.plan --ladder=paper                 # each stage exactly as launch.ladder runs it
  python -m tokenformer_jax.cli.plan --ladder=paper --stages=paper_1_4b --search --slices=v4-32,v4-64
  python -m tokenformer_jax.cli.plan --ladder=paper --dry_run       # the stages' settings; compiles nothing
  python -m tokenformer_jax.cli.plan --ladder=paper --stages=paper_1_4b --search --kernels=plain,lean
  python -m tokenformer_jax.cli.plan --ladder=paper --compare --kernels=plain,lean --remats=projections,lean
  python -m tokenformer_jax.cli.plan --ladder=paper --compare --kernels=plain,lean,pallas --remats=projections
  python -m tokenformer_jax.cli.plan --ladder=paper --search --deadline_days=14 --slices_out=PLAN.json \
      --plan_cache=plans.jsonl     # the slices that cost least; then launch.ladder --slices_from=PLAN.json

A model config (experiments/paper.py) is planned with a default recipe: 512 × 1024 tokens per step, bf16
compute, FSDP over all chips. A TrainConfig is planned as it is. --set applies to the TrainConfig (to every
stage with --ladder). --ladder plans the stages of a ladder (tokenformer_jax/ladder.py), each on its own slice
with its own recipe, and prints the README's ladder table; --search tries other slices and remat policies;
--compare tries kernels and remat policies on each stage's own slice and names the fastest. --deadline_days plans
every stage on every --slices (the least recomputation of --remats, then the fewest micro-batches that fit: the
recipe's global batch through gradient accumulation, so the optimisation is unchanged) and chooses per stage the
slice that minimises the ladder's chip-hours with the stages, run one after another, done within the deadline.
"""
import dataclasses
import hashlib
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # a plan compiles for a TPU that is not here

from absl import app, flags  # noqa: E402

from tokenformer_jax import plan, plan_search  # noqa: E402
from tokenformer_jax.cli.common import SET_HINT, TEMP_LOGS, command, quiet_console  # noqa: E402
from tokenformer_jax.cli.config_flags import CONFIG, OVERRIDES  # noqa: E402
from tokenformer_jax.config import ModelConfig, TrainConfig, apply_overrides, load_config  # noqa: E402
from tokenformer_jax.ladder import Option, cheapest_within, load_ladder, write_choice  # noqa: E402

TOPOLOGY = flags.DEFINE_string("topology", "v4-32", "A TPU v4 slice: v4-N (N cores = N/2 chips), v4:XxYxZ, Sxv4-N.")
TOKENS = flags.DEFINE_float("tokens", None, "Token budget for the days and chip-hours (single config); default 30e9, "
                            "and for an image classifier its own recipe: steps × images × tokens per image.")
LADDER = flags.DEFINE_string("ladder", None, "Plan the stages of this ladder (paper, tiny, or FILE.py:NAME), "
                             "each on its slice with its recipe, exactly as launch.ladder runs them.")
STAGES = flags.DEFINE_list("stages", [], "--ladder: only these stages, e.g. paper_1_4b.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "--ladder: print each stage's settings; compile nothing.")
SEARCH = flags.DEFINE_bool("search", False, "--ladder: instead of each stage's slice and remat, find the smallest "
                           "of --slices (then the least recomputation of --remats) on which it fits.")
COMPARE = flags.DEFINE_bool("compare", False, "--ladder: plan every --kernels × --remats on each stage's own slice, "
                             "with its cost, and name the fastest that fits (what the stage's recipe should be).")
SLICES = flags.DEFINE_list("slices", list(plan.LADDER_SLICES), "--search: the slices to try, smallest first.")
REMATS = flags.DEFINE_list("remats", list(plan.REMAT_ORDER), "--search, --compare: remat policies to try, in "
                           "this order.")
DEADLINE = flags.DEFINE_float("deadline_days", None, "--ladder --search: choose per stage the slice (and grad_accum) "
                              "of --slices that minimises the ladder's chip-hours within this many days in all.")
SLICES_OUT = flags.DEFINE_string("slices_out", None, "--deadline_days: write the choice here as JSON (PLAN.json, "
                                 "for launch.ladder --slices_from).")
PLAN_CACHE = flags.DEFINE_string("plan_cache", None, "--search: reuse the plans recorded in this file (JSON lines) "
                                 "and record new ones, so that a rerun with another deadline compiles nothing.")
KERNELS = flags.DEFINE_list("kernels", [], "--search, --compare: Pattention kernels to compare (plain, lean, pallas): "
                            "one row per stage and kernel. Empty: each stage's own kernel. --compare never names "
                            "pallas fastest: its step time is the kernel's own estimate.")


def train_config(spec: str, overrides) -> TrainConfig:
  cfg = load_config(spec)
  if isinstance(cfg, ModelConfig):
    cfg = plan.ladder_train_config(cfg)
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"{spec} is a {type(cfg).__name__}; plan needs a ModelConfig or a TrainConfig")
  return apply_overrides(cfg, overrides)


def ladder() -> None:
  _, stages = load_ladder(LADDER.value, OVERRIDES.value)
  unknown = set(STAGES.value) - {s.name for s in stages}
  if unknown:
    raise ValueError(f"--stages: no stage {', '.join(sorted(unknown))} in ladder {LADDER.value} (it has "
                     f"{', '.join(s.name for s in stages)})")
  stages = [s for s in stages if not STAGES.value or s.name in STAGES.value]
  for stage in stages:
    print(stage.settings(), flush=True)
  if DRY_RUN.value:
    return
  if DEADLINE.value is not None:
    cheapest(stages, DEADLINE.value, planner(PLAN_CACHE.value), SLICES.value, REMATS.value,
             ladder_name=LADDER.value, out=SLICES_OUT.value)
    return
  reason = plan.libtpu_missing()
  if reason:
    raise plan.PlanError(reason)
  if COMPARE.value:
    return compare(stages, KERNELS.value, REMATS.value)
  rows = []
  for stage in stages:
    for kernel in KERNELS.value or [stage.config.model.pattention_kernel]:
      cfg = stage.config.replace(model=stage.config.model.replace(pattention_kernel=kernel))
      try:
        if SEARCH.value:
          found = plan_search.smallest_fit(cfg, SLICES.value, REMATS.value, log=lambda line: print(line, flush=True))
        else:
          found = plan.plan_in_child(cfg, stage.accelerator, cost=True)
      except Exception as error:  # noqa: BLE001 (one stage's failure leaves the others' rows)
        found, failure = None, first_line(error)
      else:
        failure = f"fits none of {', '.join(SLICES.value)}" if SEARCH.value else f"does not fit {stage.accelerator}"
      rows.append(plan.table_row(found, stage.tokens, stage.name) if found else
                  failed_row(stage, failure, kernel))
      print(rows[-1], flush=True)
  print("\n" + plan.TABLE_HEADER + "\n" + "\n".join(rows))


def first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def failed_row(stage, failure: str, kernel: str) -> str:
  return f"| {stage.name} | {failure} | | {kernel} | | | | | {stage.tokens:.3g} | | |"


def compare(stages, kernels, remats) -> None:
  """Each stage on its own slice with every kernel × remat: one row each, then the fastest that fits. A pallas row's
  step time is its kernel's own estimate (plan.Plan.kernel_estimate): shown, never ranked."""
  rows, best, unranked = [], [], False
  for stage in stages:
    fastest, stage_unranked_fit = None, False
    for kernel in kernels or [stage.config.model.pattention_kernel]:
      for remat in remats:
        cfg = stage.config.replace(model=stage.config.model.replace(pattention_kernel=kernel, remat=remat))
        try:
          result = plan.plan_in_child(cfg, stage.accelerator, cost=True)
        except Exception as error:  # noqa: BLE001 (one candidate's failure leaves the others' rows)
          rows.append(failed_row(stage, first_line(error), f"{kernel}, {remat}"))
        else:
          rows.append(plan.table_row(result, stage.tokens, stage.name))
          unranked |= result.kernel_estimate
          stage_unranked_fit |= result.kernel_estimate and result.fits
          if (result.fits and result.step_seconds and not result.kernel_estimate
              and (fastest is None or result.step_seconds < fastest.step_seconds)):
            fastest = result
        print(rows[-1], flush=True)
    best.append(f"{stage.name} on {stage.accelerator}: " + (
        f"kernel {fastest.kernel}, remat {fastest.remat} (MFU {fastest.mfu:.1%})" if fastest else
        "only pallas fits (not ranked)" if stage_unranked_fit else "nothing fits"))
  note = ("\n(pallas rows are not ranked: their step time is the kernel's own estimate; time them on a TPU with "
          "benchmarks/pattention_kernels.py)" if unranked else "")
  print("\n" + plan.TABLE_HEADER + "\n" + "\n".join(rows) + "\n\nfastest that fits:\n  " + "\n  ".join(best) + note)


# The slices that cost least -----------------------------------------------------------------------------------
def planner(cache: str | None):
  """plan.plan_in_child, through `cache` (JSON lines of {"key", "plan"}) when one is given."""
  if not cache:
    return lambda cfg, topology, cost=True: plan.plan_in_child(cfg, topology, cost)
  records = {}

  def read() -> None:   # again before each compile: another search may have recorded it meanwhile
    if os.path.exists(cache):
      with open(cache) as f:
        records.update({r["key"]: r["plan"] for r in map(json.loads, filter(str.strip, f))})

  def cached(cfg, topology, cost=True):
    key = hashlib.sha256(repr((cfg, topology, cost)).encode()).hexdigest()
    if key not in records:
      read()
    if key not in records:
      records[key] = dataclasses.asdict(plan.plan_in_child(cfg, topology, cost))
      with open(cache, "a") as f:
        f.write(json.dumps({"key": key, "plan": records[key]}) + "\n")
    return plan.Plan(**records[key])
  return cached


def cheapest(stages, deadline: float, plan_one, slices, remats, *, ladder_name: str, out: str | None = None) -> list:
  """Every stage on every one of `slices` (and on its own, as the ladder defines it), then the choice of one per
  stage with the fewest chip-hours within `deadline` days: printed as a table, and written to `out` (PLAN.json)."""
  if not deadline > 0:
    raise ValueError(f"--deadline_days={deadline:g}: give a positive number of days")
  for topology in slices:
    plan.parse_topology(topology)   # a bad slice is one line before anything compiles
  if plan.libtpu_missing():
    raise plan.PlanError(plan.libtpu_missing())
  say = lambda line: print(line, flush=True)   # noqa: E731
  options, own, rows = [], [], []
  for stage in stages:
    found = []
    for topology in slices:
      try:
        result = plan_search.fit_on(stage.config, topology, remats, log=say, planner=plan_one)
      except Exception as error:  # noqa: BLE001 (one slice's failure leaves the others' rows)
        say(f"  {stage.name} on {topology}: {first_line(error)}")
        continue
      if result is not None and result.step_seconds:
        found.append(Option.of(stage, result))
        rows.append(plan.table_row(result, stage.tokens, stage.name))
        say(rows[-1])
    own.append(ladder_choice(stage, found, plan_one))
    options.append(found + [o for o in own[-1:] if o is not None and o not in found])
  chosen = cheapest_within(options, deadline)
  print("\n" + plan.TABLE_HEADER + "\n" + "\n".join(rows) + "\n\n" + choice_table(chosen, own, deadline))
  if out:
    write_choice(out, ladder_name, deadline, chosen, own, stages)
    print(f"\nwrote {out}: python -m launch.ladder --ladder={ladder_name} --slices_from={out} ...")
  return chosen


def ladder_choice(stage, found: list[Option], plan_one) -> Option | None:
  """The stage as its ladder defines it (its slice, remat, grad_accum), costed: from `found` when it is there."""
  cfg = stage.config
  try:
    plan.parse_topology(stage.accelerator)
  except plan.PlanError:   # not a TPU stage (a local ladder's "cpu")
    return None
  for option in found:
    if (option.accelerator, option.remat, option.grad_accum) == (stage.accelerator, cfg.model.remat, cfg.grad_accum):
      return option
  try:
    result = plan_one(cfg, stage.accelerator, cost=True)
  except Exception:  # noqa: BLE001 (the ladder's own slice may not take the stage: the table says so)
    return None
  return Option.of(stage, result) if result.fits and result.step_seconds else None


def choice_table(chosen: list[Option], own: list[Option | None], deadline: float) -> str:
  def cells(o: Option | None) -> str:
    if o is None:   # a CPU stage, or one that does not fit its own slice
      return "not costed | | | |"
    mfu = "?" if o.mfu is None else f"{o.mfu:.1%}"
    return (f"{o.accelerator} ({o.chips}), {o.remat}, grad_accum {o.grad_accum} | {mfu} | {o.days:.2f} | "
            f"{o.chip_hours:,.0f} |")
  lines = ["| stage | ladder's slice, remat, grad_accum | MFU | days | chip-hours | chosen slice, remat, grad_accum "
           "| MFU | days | chip-hours |", "|---|---|---|---|---|---|---|---|---|"]
  lines += [f"| {c.stage} | {cells(o)} {cells(c)}" for c, o in zip(chosen, own, strict=True)]
  days, hours = sum(c.days for c in chosen), sum(c.chip_hours for c in chosen)
  line = f"chosen within {deadline:g} days: {days:.2f} days, {hours:,.0f} chip-hours"
  if all(o is not None for o in own):
    own_days, own_hours = sum(o.days for o in own), sum(o.chip_hours for o in own)
    lines.append(f"| total | | | {own_days:.2f} | {own_hours:,.0f} | | | {days:.2f} | {hours:,.0f} |")
    line += (f"; the ladder's own slices: {own_days:.2f} days, {own_hours:,.0f} chip-hours; saved "
             f"{own_hours - hours:,.0f} chip-hours ({(own_hours - hours) / own_hours:.0%})")
  return "\n".join(lines) + "\n\n" + line


@command(plan.PlanError, hint=SET_HINT)
def main(argv):
  quiet_console(TEMP_LOGS, "plan")
  if (DEADLINE.value is not None or SLICES_OUT.value) and not LADDER.value:
    raise ValueError("--deadline_days and --slices_out plan a ladder: add --ladder=NAME")
  if SLICES_OUT.value and DEADLINE.value is None:
    raise ValueError("--slices_out writes the choice of --deadline_days: add --deadline_days=D")
  if LADDER.value:
    return ladder()
  reason = plan.libtpu_missing()
  if reason:
    raise plan.PlanError(reason)
  if not CONFIG.value:
    raise ValueError("--config is required (or --ladder), e.g. --config=experiments/paper.py:ladder_1_4b")
  cfg = train_config(CONFIG.value, OVERRIDES.value)
  tokens = TOKENS.value
  if tokens is None:
    tokens = cfg.steps * cfg.global_batch * cfg.example_tokens if cfg.model.vision is not None else 30e9
  print(plan.describe(plan.plan(cfg, TOPOLOGY.value), tokens))


if __name__ == "__main__":
  app.run(main)
