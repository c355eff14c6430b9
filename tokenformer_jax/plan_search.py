"""The plan's search over slices: on which of a list of TPU v4 slices a stage's step fits, and how.

`smallest_fit`: the smallest slice (then the least recomputation) on which it fits (`cli.plan --ladder --search`).
`fit_on`: on one slice, the least recomputation and then the fewest micro-batches (gradient accumulation: the
recipe's global batch, so the same optimisation) with which it fits, costed (`cli.plan --deadline_days`, which then
chooses per stage the slice that costs least: tokenformer_jax/ladder.py `cheapest_within`). Every candidate is one
compile by the real TPU compiler (plan.py), in its own process.
"""
from __future__ import annotations

from tokenformer_jax import plan, sharding
from tokenformer_jax.config import TrainConfig
from tokenformer_jax.plan import LADDER_SLICES, REMAT_ORDER, Plan, PlanError, Topology, parse_topology


def smallest_fit(cfg: TrainConfig, slices=LADDER_SLICES, remats=REMAT_ORDER, *, log=print) -> Plan | None:
  """The smallest slice (then the least recomputation) on which `cfg`'s step fits, with its cost; None if none.
  Each candidate compiles in its own process."""
  for topology in slices:
    found = fit_on(cfg, topology, remats, accumulate=False, log=log)
    if found is not None:
      return found
  return None


def accumulations(cfg: TrainConfig, topology: str | Topology) -> list[int]:
  """The grad_accum values, from cfg's own up, whose micro-batches (global_batch / grad_accum sequences: the same
  global batch, so the same optimisation) split over `topology`'s data-parallel chips."""
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  try:
    data, fsdp, _ = sharding.mesh_shape(cfg.mesh, topology.chips)
  except ValueError:
    return []
  return [a for a in range(cfg.grad_accum, cfg.global_batch + 1)
          if cfg.global_batch % a == 0 and (cfg.global_batch // a) % (data * fsdp) == 0]


def _more_micro_batches(result: Plan, accum: int, options: list[int]) -> int | None:
  """The grad_accum to try after `accum` did not fit: activations shrink about in proportion to the micro-batch,
  so the one predicted from the memory it needed (at least the next option); None when none is left or the
  state alone does not fit."""
  state = result.hbm.get("params", 0) + result.hbm.get("optimizer", 0)
  needed = result.hbm.get("total") or (result.hbm.get("temp", 0) + state)
  room = plan.HBM_USABLE - state
  later = [a for a in options if a > accum]
  if room <= 0 or not later:
    return None
  wanted = accum * (needed - state) / room if needed > state else 0
  return next((a for a in later if a >= wanted), later[-1])


def fit_on(cfg: TrainConfig, topology: str, remats=REMAT_ORDER, *, accumulate: bool = True, log=print,
           planner=None) -> Plan | None:
  """On `topology`: the least recomputation of `remats`, then (with `accumulate`) the fewest micro-batches, with
  which cfg's step fits; planned with its cost by `planner(cfg, topology, cost)` (default: plan_in_child, each
  candidate compiled in its own process). None if nothing fits."""
  planner = planner or plan.plan_in_child   # looked up now: a test may stand in for it
  for remat in remats:
    candidate = cfg.replace(model=cfg.model.replace(remat=remat))
    options = accumulations(candidate, topology) if accumulate else [cfg.grad_accum]
    if not options:
      log(f"  {cfg.model.name} on {topology}: global_batch={cfg.global_batch} does not split over its chips "
          "with any grad_accum")
      return None
    accum = options[0]
    while accum is not None:
      candidate = candidate.replace(grad_accum=accum)
      try:
        result = planner(candidate, topology, cost=True)
      except PlanError as error:   # e.g. the batch does not split over this slice
        log(f"  {cfg.model.name} on {topology} (remat {remat}, grad_accum {accum}): {error}")
        break
      log(f"  {cfg.model.name} on {topology} (remat {remat}, grad_accum {accum}): "
          + ("fits" if result.fits else (result.error or "does not fit")))
      if result.fits:
        return result
      accum = _more_micro_batches(result, accum, options) if accumulate else None
  return None
