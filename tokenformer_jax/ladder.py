"""A progressive-scaling ladder, defined once: its stages are what the plan compiles and the launcher runs.

A `Stage` is one rung: a TrainConfig (the model and the whole recipe: compute dtype, remat, mesh preset and
sizes, gradient accumulation, batch, schedule, steps), the slice it runs on, its token budget, and how its
parameters start (from scratch, or grown from the previous rung). `cli.plan --ladder=NAME` compiles exactly
these configs for exactly these slices; `launch.ladder --ladder=NAME` trains exactly these configs there;
and before a TPU is created, `launch.ladder` asks the plan whether each stage fits its slice (`check_fits`).
A change to the recipe (say `model.remat`, or any new model field) is one change to a stage's config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

from tokenformer_jax.config import ModelConfig, TrainConfig, apply_overrides, load_config

INITS = ("scratch", "zero_keys", "random")
LADDER_FILE = "experiments/ladder.py"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One rung: train `config` for `tokens` tokens on `accelerator`, growing from the previous rung by `init`."""
  name: str               # unique; also the config's name in the ladder file and the stage's directory
  config: TrainConfig
  accelerator: str        # the slice: a TPU type ("v4-64") for the tpu backend; "cpu" for the local one
  tokens: int             # the token budget; config.steps = ceil(tokens / (global_batch × seq_len))
  init: str = "scratch"   # "scratch" (the first stage), or the growth init of new parameter tokens
  overrides: tuple[str, ...] = ()   # --set field=value this stage's jobs add to the ladder file's config (a plan's
                                    # choice of slice: grad_accum, model.remat; see apply_choice)

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"stage {self.name}: init must be one of {INITS}, got {self.init!r}")
    if self.config.steps != steps_for(self.tokens, self.config):
      raise ValueError(f"stage {self.name}: {self.tokens} tokens need {steps_for(self.tokens, self.config)} steps "
                       f"of {self.tokens_per_step} tokens, but config.steps={self.config.steps}")

  @property
  def tokens_per_step(self) -> int:
    return self.config.global_batch * self.config.data.seq_len

  @property
  def steps(self) -> int:
    return self.config.steps

  def settings(self) -> str:
    """The stage in one line: what the plan compiles and the launcher runs (both print this line)."""
    cfg = self.config
    mesh = f"data={cfg.mesh.data},fsdp={cfg.mesh.fsdp},tensor={cfg.mesh.tensor}"
    return (f"stage {self.name}: {cfg.model.name} on {self.accelerator} | {cfg.model.dtype}, mesh {cfg.mesh.preset} "
            f"({mesh}), {cfg.model.pattention_kernel} Pattention, {'tanh' if cfg.model.approximate_gelu else 'erf'} "
            f"GeLU, remat {cfg.model.remat}, grad_accum {cfg.grad_accum}, batch {cfg.global_batch} × "
            f"{cfg.data.seq_len} | {cfg.optim.schedule} lr {cfg.optim.learning_rate:g} warmup "
            f"{cfg.optim.warmup_steps} | {cfg.steps:,} steps, {self.tokens:,} tokens | init {self.init}")


def steps_for(tokens: int, cfg: TrainConfig) -> int:
  return math.ceil(tokens / (cfg.global_batch * cfg.example_tokens))   # (an image: its patches and class token)


def stage(name: str, base: TrainConfig, model: ModelConfig, *, first: ModelConfig, tokens: int, accelerator: str,
          init: str, **recipe) -> Stage:
  """A stage of `model` trained with `base` changed by `recipe` (TrainConfig fields, e.g. mesh=, grad_accum=,
  and `model_changes=dict(...)` for model fields such as dtype or remat). The model keeps the first stage's
  norm scale: with the scale fixed, zero-key growth leaves the model's function unchanged (paper App. B)."""
  model = model.replace(name=name, norm_scale_tokens=first.param_tokens, **recipe.pop("model_changes", {}))
  config = base.replace(model=model, **recipe)
  return Stage(name, config.replace(steps=steps_for(tokens, config)), accelerator, tokens, init)


def load_ladder(ladder: str, overrides=()) -> tuple[str, tuple[Stage, ...]]:
  """`NAME` (a ladder of experiments/ladder.py's LADDERS) or `FILE.py:NAME` → (the file, its stages with the
  `--set` overrides applied to every stage). The file must also define each stage's TrainConfig under the
  stage's name: that is what cli.train and cli.grow load on the workers."""
  if ":" in ladder:
    path, _, name = ladder.rpartition(":")
    ladders = {name: load_config(ladder)}
  else:
    path, name, ladders = LADDER_FILE, ladder, load_config(f"{LADDER_FILE}:LADDERS")
    if name not in ladders:
      raise ValueError(f"unknown ladder {name!r}; {LADDER_FILE} has: {', '.join(ladders)} (or give FILE.py:NAME)")
  stages = tuple(ladders[name])
  if not stages or not all(isinstance(s, Stage) for s in stages):
    raise ValueError(f"{path}:{name} must be a tuple of tokenformer_jax.ladder.Stage")
  for s in stages:
    if load_config(f"{path}:{s.name}") != s.config:
      raise ValueError(f"{path} must define {s.name} = the TrainConfig of stage {s.name} (cli.train loads "
                       "it by that name)")
  return path, tuple(dataclasses.replace(s, config=apply_overrides(s.config, overrides)) for s in stages)


# Does each stage fit its slice? -----------------------------------------------------------------------------
def check_fits(stages, *, planner: Callable | None = None, say=print) -> bool:
  """Compile every TPU stage's train step for its slice (memory only, no cost estimate) and raise a ValueError
  naming the first stage that does not fit. Returns False (having said so) when libtpu is not installed and
  the check was skipped; True when every stage was checked and fits. `planner(cfg, slice)` → plan.Plan
  defaults to `plan.plan` in a child process (a compiler crash costs one stage, not the launcher)."""
  from tokenformer_jax import plan
  if planner is None:
    reason = plan.libtpu_missing()
    if reason:
      say(f"# fit check skipped: {reason}")
      return False
    planner = lambda cfg, topology: plan.plan_in_child(cfg, topology, cost=False)   # noqa: E731
  for s in stages:
    if s.accelerator == "cpu":
      continue
    say(f"# fit check: compiling {s.name}'s train step for {s.accelerator} ...")
    try:
      result = planner(s.config, s.accelerator)
    except plan.PlanError as error:
      raise ValueError(f"stage {s.name} cannot be planned on {s.accelerator}: {error}") from None
    if not result.fits:
      total = result.hbm.get("total", result.hbm.get("temp"))
      needed = f"{total / plan.GiB:.1f} GiB" if total else "more than it has"
      raise ValueError(f"stage {s.name} does not fit {s.accelerator}: its step needs {needed} per chip of "
                       f"{plan.HBM_USABLE / plan.GiB:.2f} GiB usable ({result.error}); change the stage in its "
                       "ladder file (a larger slice, model.remat, mesh.preset=fsdp, grad_accum) and plan it with "
                       f"python -m tokenformer_jax.cli.plan --ladder=... --stages={s.name}")
    say(f"# fit check: {s.name} fits {s.accelerator} ({result.hbm['total'] / plan.GiB:.1f} GiB per chip)")
  return True



# The slices that cost least: `cli.plan --ladder --search --deadline_days` chooses, `launch.ladder --slices_from` runs -
@dataclasses.dataclass(frozen=True)
class Option:
  """A stage on one slice, as the plan costed it: the recipe's global batch in grad_accum micro-batches."""
  stage: str
  accelerator: str
  chips: int
  remat: str
  grad_accum: int
  mfu: float | None
  days: float
  chip_hours: float

  @classmethod
  def of(cls, stage: Stage, result) -> "Option":
    """From a plan.Plan of the stage's step (fitting, with a step time)."""
    return cls(stage.name, result.topology, result.chips, result.remat, result.grad_accum, result.mfu,
               result.days(stage.tokens), result.chip_hours(stage.tokens))

  @property
  def overrides(self) -> tuple[str, ...]:
    return (f"grad_accum={self.grad_accum}", f"model.remat={self.remat}")


def cheapest_within(options: list[list[Option]], deadline_days: float) -> list[Option]:
  """One option per stage (`options[i]`: stage i's) with the fewest chip-hours in all, the stages run one after
  another within `deadline_days`. A ValueError in one line when no choice makes the deadline."""
  frontier: list[tuple[float, float, tuple[Option, ...]]] = [(0.0, 0.0, ())]   # (days, chip-hours, choice)
  for stage_options in options:
    grown = sorted(((days + o.days, hours + o.chip_hours, (*picks, o)) for days, hours, picks in frontier
                    for o in stage_options), key=lambda entry: entry[:2])
    frontier = []   # what can still win: days up, chip-hours strictly down
    for entry in grown:
      if entry[0] <= deadline_days and (not frontier or entry[1] < frontier[-1][1]):
        frontier.append(entry)
    if not frontier:
      break
  if frontier and len(frontier[0][2]) == len(options):
    return list(min(frontier, key=lambda entry: entry[1])[2])
  if not all(options):
    stuck = next(i for i, o in enumerate(options) if not o)
    raise ValueError(f"--deadline_days={deadline_days:g}: stage {stuck + 1} of {len(options)} fits none of the "
                     "slices tried (--slices)")
  fastest = [min(o, key=lambda option: option.days) for o in options]
  raise ValueError(f"--deadline_days={deadline_days:g} cannot be met: the fastest slices tried take "
                   f"{sum(o.days for o in fastest):.2f} days ("
                   + ", ".join(f"{o.stage} on {o.accelerator} {o.days:.2f}" for o in fastest)
                   + "); allow more days or try larger --slices")


def write_choice(path: str, ladder: str, deadline_days: float, chosen: list[Option], own: list[Option | None],
                 stages) -> dict:
  """PLAN.json: per stage, the chosen slice and the --set overrides that go with it, and the ladder's own."""
  record = {"ladder": ladder, "deadline_days": deadline_days, "stages": [
      {**dataclasses.asdict(c), "set": list(c.overrides), "global_batch": s.config.global_batch, "tokens": s.tokens,
       "ladder_choice": None if o is None else dataclasses.asdict(o)}
      for c, o, s in zip(chosen, own, stages, strict=True)]}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def apply_choice(stages, path: str) -> tuple[Stage, ...]:
  """The stages with the slices (and grad_accum, remat) a plan chose (PLAN.json of `cli.plan --deadline_days`);
  stages it does not name keep theirs. A ValueError names a stage the file names but the ladder lacks, or one
  planned with another global batch or token budget (the file is then stale: plan again)."""
  try:
    with open(path) as f:
      chosen = {entry["stage"]: entry for entry in json.load(f)["stages"]}
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(f"--slices_from={path}: not a plan's choice of slices ({error})") from None
  names = {s.name for s in stages}
  if set(chosen) - names:
    raise ValueError(f"--slices_from={path} names stage(s) {', '.join(sorted(set(chosen) - names))} that this "
                     f"ladder does not have ({', '.join(sorted(names))})")
  out = []
  for s in stages:
    entry = chosen.get(s.name)
    if entry is None:
      out.append(s)
      continue
    if (entry.get("global_batch"), entry.get("tokens")) != (s.config.global_batch, s.tokens):
      raise ValueError(f"--slices_from={path}: stage {s.name} was planned with global_batch "
                       f"{entry.get('global_batch')} and {entry.get('tokens')} tokens, the ladder has "
                       f"{s.config.global_batch} and {s.tokens}; plan it again")
    sets = tuple(entry["set"])
    out.append(dataclasses.replace(s, config=apply_overrides(s.config, sets), accelerator=entry["accelerator"],
                                   overrides=s.overrides + sets))
  return tuple(out)
