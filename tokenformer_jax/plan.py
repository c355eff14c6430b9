"""A TPU plan before spending money: compile the real train step for a TPU v4 topology on this machine.

With `libtpu` installed (`pip install -e '.[plan]'`) JAX can describe a TPU slice that is not there
(`jax.experimental.topologies`) and the real TPU compiler can compile for it. Nothing runs; from the compiled
step we read, per chip:

  memory   parameters and optimizer state (from their shardings), and the compiler's own total: arguments,
           outputs not aliased to them, and temporaries (activations, gradients, gathered weights). A step that
           does not fit is refused by the compiler ("ran out of memory on HBM"); we report what it needed.
  FLOPs    the compiler's count, and the analytic model FLOPs (`config.flops_per_token`, 6N + attention).
  time     the compiler's cost model (`optimal_seconds`), from which MFU = model FLOPs / (chips · 275 TFLOP/s
           · time), and days and chip-hours for a token budget.

Two details of XLA shape the time estimate. Its cost analysis counts a loop body once, so the time comes from
the same step compiled without loops: layers unrolled (at 2 and 3 layers, extrapolated linearly in depth, as
every layer is the same) and without the TPU compiler's windowed einsums (loops that overlap an FSDP
all-gather with its matmul; the estimate is then of plain all-gathers). And libtpu's cost model returns -1 s
for each "ConcatBitcast" custom call (a join of asynchronous slices that moves no data); those are added
back. Memory always comes from the step exactly as it will run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import re

from tokenformer_jax import accelerators
from tokenformer_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig, DataConfig, flops_per_token

# The TPU v4 facts (peak FLOP/s, HBM, hosts, the slice topologies) are tokenformer_jax/accelerators.py's table.
PEAK_FLOPS_PER_CHIP = accelerators.V4.peak_bf16_flops
HBM_PER_CHIP = accelerators.V4.hbm_bytes
HBM_USABLE = accelerators.V4.usable_hbm_bytes
CHIPS_PER_HOST = accelerators.V4.chips_per_host
LADDER_SLICES = ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128", "v4-256")
REMAT_ORDER = ("none", "lean", "projections", "full")   # least recomputation first
GiB = 2**30
# For the cost compile only: no windowed-einsum loops (see _cost).
NO_LOOPS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 10**6}


class PlanError(ValueError):
  """A plan cannot be made (no libtpu, an unknown topology, a config that does not shard); says what to do."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                   # as given: "v4-32", "2xv4-32", "v4:2x2x4"
  grid: tuple[int, int, int]  # chips per slice along x, y, z
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.grid) * self.num_slices


def parse_topology(text: str) -> Topology:
  """'v4-32' (32 TensorCores = 16 chips), 'v4:2x2x4' (a chip grid), '2xv4-32' (two slices, over DCN). The valid
  slices are accelerators.py's (the launcher's too)."""
  match = re.fullmatch(r"(?:(\d+)x)?(v4-\d+|v4:(\d+)x(\d+)x(\d+))", text.strip().lower())
  if not match:
    raise PlanError(f"topology {text!r}: expected v4-N (e.g. v4-32), v4:XxYxZ (a chip grid), or Sxv4-N for S slices")
  slices = int(match.group(1) or 1)
  if slices < 1:
    raise PlanError(f"topology {text!r}: at least one slice")
  if match.group(3) is None:
    try:
      grid = accelerators.v4_slice(match.group(2)).grid
    except ValueError as error:
      raise PlanError(f"topology {text!r}: {error}") from None
  else:
    grid = tuple(int(match.group(i)) for i in (3, 4, 5))
    if not accelerators.v4_grid_valid(grid):
      raise PlanError(f"topology {text!r}: a v4 chip grid is 2x2x1, 2x2x2, 2x2x4, 2x4x4, or AxBxC with A <= B <= C "
                      f"multiples of 4 and at most {accelerators.V4.pod_chips} chips")
  return Topology(text.strip(), grid, slices)


def libtpu_missing() -> str | None:
  """Why a TPU plan cannot be compiled here (None when it can)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return "libtpu is not installed: pip install -e '.[plan]' (it pins the libtpu of this jax)"
  return None


def topology_devices(topology: Topology) -> list:
  """Device descriptions of a TPU v4 topology, for compiling; no TPU is needed."""
  reason = libtpu_missing()
  if reason:
    raise PlanError(reason)
  # A process on this machine may already hold libtpu's lock file; a description needs no exclusive TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  accelerators.describe_absent_tpu()
  from jax.experimental import topologies
  grid = "x".join(map(str, topology.grid))
  description = topologies.get_topology_desc(platform="tpu", topology_name=f"v4:{grid}", chip_config_name="megacore",
                                             chips_per_host_bounds=CHIPS_PER_HOST, num_slices=topology.num_slices)
  return list(description.devices)


# The train configuration of a ladder stage -------------------------------------------------------------
def ladder_train_config(model: ModelConfig, *, global_batch: int = 512, seq_len: int = 1024) -> TrainConfig:
  """The paper's ladder recipe (App. D) for a model: 512 × 1024 tokens per step, bf16 compute, FSDP over all
  chips (parameters and optimizer state split along the parameter-token axis)."""
  return TrainConfig(model=model.replace(dtype="bfloat16", max_seq_len=max(model.max_seq_len, seq_len)),
                     data=DataConfig(seq_len=seq_len), optim=OptimConfig(), global_batch=global_batch,
                     mesh=MeshConfig(data=1, fsdp=-1, tensor=1, preset="fsdp"))


# Compiling ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
  config: str
  topology: str
  chips: int
  mesh: dict[str, int]
  preset: str
  remat: str
  grad_accum: int
  tokens_per_step: int
  fits: bool
  hbm: dict[str, float]                 # bytes per chip: params, optimizer, total (and limit)
  model_flops_per_step: float
  compiler_flops_per_step: float | None = None
  step_seconds: float | None = None
  cost_micro_steps: int = 1             # the cost compile's split of the batch (see _cost)
  error: str | None = None
  kernel: str = "plain"                 # model.pattention_kernel

  @property
  def kernel_estimate(self) -> bool:
    """Whether the step time rests on a Pallas kernel's own `cost_estimate` (XLA's cost model cannot look inside
    a Pallas call and takes the kernel's word for it): a figure to read, not one to rank kernels by."""
    return self.kernel == "pallas"

  @property
  def mfu(self) -> float | None:
    if not self.step_seconds:
      return None
    return self.model_flops_per_step / (self.chips * PEAK_FLOPS_PER_CHIP * self.step_seconds)

  def days(self, tokens: float) -> float | None:
    return None if not self.step_seconds else tokens / self.tokens_per_step * self.step_seconds / 86400

  def chip_hours(self, tokens: float) -> float | None:
    days = self.days(tokens)
    return None if days is None else days * 24 * self.chips


def _step_and_inputs(cfg: TrainConfig, devices):
  """The real jitted train step for `cfg` on a mesh of `devices` (the trainer's own `build_run`), and abstract
  (state, batch) inputs."""
  from tokenformer_jax.train.setup import LayoutError, build_run
  try:   # a v4 host drives 4 chips, each loading its own rows of the batch
    run = build_run(cfg, devices, processes=max(1, len(devices) // math.prod(CHIPS_PER_HOST)))
  except LayoutError as error:
    raise PlanError(str(error)) from None
  return run.train_step, run.abstract, run.abstract_batch(), run.mesh


def _bytes_per_chip(tree) -> float:
  import jax
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _out_of_memory(error: Exception) -> str | None:
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
    return None
  return text.strip().splitlines()[0][:300]


def _corrected_seconds(compiled) -> float | None:
  seconds = compiled.cost_analysis().get("optimal_seconds")
  if seconds is None:
    return None
  seconds += compiled.as_text().count('custom_call_target="ConcatBitcast"')   # each was counted as -1 s
  return seconds if seconds > 0 else None


def _cost(cfg: TrainConfig, devices) -> tuple[float | None, float | None, int]:
  """(compiler FLOPs per chip, cost-model seconds, micro-steps) of one step.

  XLA's cost analysis counts a loop body once, so this compiles the step with no loops: layers unrolled (at
  2 and 3 layers, extrapolated linearly to the model's depth; the first layer differs, since remat does not
  recompute the last one), and without windowed einsums (the TPU compiler's loops that overlap an FSDP
  all-gather with its matmul). A step of k micro-batches costs k micro-steps. Unrolled layers need more
  memory than scanned ones; when that compile does not fit, the batch is split into more micro-steps (which
  slightly over-estimates: each gathers the weights, and the optimizer update is counted once per split).
  """
  splits = cfg.grad_accum
  while True:
    try:
      flops, seconds = _cost_of_micro_steps(cfg, splits, devices)
      return flops, seconds, splits
    except Exception as error:  # noqa: BLE001 (the TPU compiler's out-of-memory error)
      if _out_of_memory(error) is None or cfg.global_batch % (2 * splits) or not _splits(cfg, 2 * splits, devices):
        raise
      splits *= 2


def _splits(cfg: TrainConfig, splits: int, devices) -> bool:
  """Whether a batch of global_batch / splits sequences still lays out over the mesh."""
  from tokenformer_jax import sharding
  from tokenformer_jax.train.setup import LayoutError, check_batch_layout
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, len(devices))))
  try:
    check_batch_layout(cfg.replace(global_batch=cfg.global_batch // splits, grad_accum=1), shape)
  except LayoutError:
    return False
  return True


def _cost_of_micro_steps(cfg: TrainConfig, splits: int, devices) -> tuple[float | None, float | None]:
  depths = [d for d in (2, 3) if d <= cfg.model.n_layers] or [cfg.model.n_layers]
  micro = cfg.replace(global_batch=cfg.global_batch // splits, grad_accum=1)
  # Mixup / cutmix draw λ by jax.random.beta, a rejection loop: costed without them (a few elementwise passes over
  # the images, next to the model's matmuls; the memory compile above keeps them).
  micro = micro.replace(data=micro.data.replace(image_mixup=0.0, image_cutmix=0.0))
  measured = []
  for depth in depths:
    model = cfg.model.replace(n_layers=depth, unroll_layers=True)
    step, abstract, batch, _ = _step_and_inputs(micro.replace(model=model), devices)
    compiled = step.lower(abstract, batch).compile(compiler_options=NO_LOOPS)
    if " while(" in compiled.as_text():
      return None, None
    measured.append((compiled.cost_analysis().get("flops"), _corrected_seconds(compiled)))
  if any(v is None for pair in measured for v in pair):
    return None, None
  (f_low, s_low), (f_high, s_high) = measured[0], measured[-1]
  more = cfg.model.n_layers - depths[0]
  flops = f_low + more * (f_high - f_low) if more else f_low
  seconds = s_low + more * (s_high - s_low) if more else s_low
  return flops * splits, seconds * splits


def plan(cfg: TrainConfig, topology: str | Topology, *, cost: bool = True) -> Plan:
  """Compile `cfg`'s train step for `topology` and read memory, FLOPs and the cost-model time per chip."""
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  devices = topology_devices(topology)
  step, abstract, batch, mesh = _step_and_inputs(cfg, devices)
  tokens = cfg.global_batch * cfg.example_tokens   # an image: its patches (and class token)
  result = Plan(config=cfg.model.name, topology=topology.name, chips=len(devices), mesh=dict(mesh.shape),
                preset=cfg.mesh.preset, remat=cfg.model.remat, grad_accum=cfg.grad_accum, tokens_per_step=tokens,
                fits=False, hbm={"params": _bytes_per_chip(abstract.params),
                                 "optimizer": _bytes_per_chip(abstract.opt_state), "limit": float(HBM_USABLE)},
                model_flops_per_step=float(flops_per_token(cfg.model, cfg.example_tokens) * tokens),
                kernel=cfg.model.pattention_kernel)
  try:
    compiled = step.lower(abstract, batch).compile()
  except Exception as error:  # the TPU compiler refuses a step that does not fit in HBM
    message = _out_of_memory(error)
    if message is None:
      raise
    result.error = message
    needed = re.findall(r"\(([\d.]+)([KMGT])\)", message)
    if needed:
      value, unit = needed[0]
      result.hbm["temp"] = float(value) * 2 ** (10 * "KMGT".index(unit) + 10)
    return result
  memory = compiled.memory_analysis()
  result.hbm.update(
      temp=float(memory.temp_size_in_bytes),
      total=float(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                  + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes))
  # The compiler checks its temporaries against the usable HBM; the state lives there too.
  result.fits = result.hbm["total"] <= HBM_USABLE
  if not result.fits:
    result.error = f"state + temporaries {result.hbm['total'] / GiB:.2f} GiB > {HBM_USABLE / GiB:.2f} GiB usable"
    return result
  if cost:
    flops_per_chip, result.step_seconds, result.cost_micro_steps = _cost(cfg, devices)
    result.compiler_flops_per_step = None if flops_per_chip is None else flops_per_chip * len(devices)
  return result


def plan_in_child(cfg: TrainConfig, topology: str, cost: bool) -> Plan:
  """`plan` in a fresh process: a compiler crash (it happens on odd shapes) costs one candidate, not the table."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    try:
      return pool.submit(plan, cfg, topology, cost=cost).result()
    except concurrent.futures.process.BrokenProcessPool:
      topo = parse_topology(topology)
      return Plan(config=cfg.model.name, topology=topology, chips=topo.chips, mesh={}, preset=cfg.mesh.preset,
                  remat=cfg.model.remat, grad_accum=cfg.grad_accum,
                  tokens_per_step=cfg.global_batch * cfg.example_tokens,
                  fits=False, hbm={}, model_flops_per_step=0.0, error="the TPU compiler crashed",
                  kernel=cfg.model.pattention_kernel)


# Printing -----------------------------------------------------------------------------------------------
def _gib(value: float | None) -> str:
  return "?" if value is None else f"{value / GiB:.1f}"


def _number(value: float | None, fmt: str) -> str:
  return "?" if value is None else format(value, fmt)


TABLE_HEADER = ("| stage | slice (chips) | mesh, preset | kernel, remat | HBM/chip GiB: params + opt, temp, total | "
                "FLOPs/step model (compiler) | step (cost model) | MFU | tokens | days | chip-hours |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(result: Plan, tokens: float, name: str | None = None) -> str:
  mesh = "×".join(str(v) for v in result.mesh.values()) if result.mesh else "?"
  memory = (f"{_gib(result.hbm.get('params', 0) + result.hbm.get('optimizer', 0))}, {_gib(result.hbm.get('temp'))}, "
            + (_gib(result.hbm.get("total")) if result.fits else f"does not fit ({result.error or ''})"))
  compiler = f" ({result.compiler_flops_per_step:.3g})" if result.compiler_flops_per_step else ""
  mfu = "?" if result.mfu is None else f"{result.mfu:.1%}"
  step = "?" if result.step_seconds is None else f"{result.step_seconds:.3f} s"
  if result.step_seconds is not None and result.cost_micro_steps > 1:
    step += f" (in {result.cost_micro_steps} parts)"
  if result.step_seconds is not None and result.kernel_estimate:
    step += " (kernel's estimate)"
    mfu += " (kernel's estimate)"
  return (f"| {name or result.config} | {result.topology} ({result.chips}) | {mesh}, {result.preset} | "
          f"{result.kernel}, {result.remat} | {memory} | {result.model_flops_per_step:.3g}{compiler} | {step} | "
          f"{mfu} | {tokens:.3g} | "
          f"{_number(result.days(tokens), '.1f')} | {_number(result.chip_hours(tokens), ',.0f')} |")


def describe(result: Plan, tokens: float) -> str:
  """A plan as a few lines for the console."""
  lines = [f"{result.config} on {result.topology}: {result.chips} chips, mesh {result.mesh}, preset {result.preset}, "
           f"kernel {result.kernel}, remat {result.remat}, grad_accum {result.grad_accum}, "
           f"{result.tokens_per_step} tokens per step",
           f"  HBM per chip: params {_gib(result.hbm.get('params'))} GiB, optimizer "
           f"{_gib(result.hbm.get('optimizer'))} GiB, activations/temp {_gib(result.hbm.get('temp'))} GiB, total "
           f"{_gib(result.hbm.get('total'))} GiB of {HBM_USABLE / GiB:.2f} GiB usable ({_gib(HBM_PER_CHIP)} GiB HBM)"
           + ("" if result.fits else f"  -> DOES NOT FIT: {result.error}")]
  if result.fits:
    lines.append(f"  FLOPs per step: model {result.model_flops_per_step:.4g}, compiler "
                 f"{_number(result.compiler_flops_per_step, '.4g')}")
    if result.cost_micro_steps > 1:
      lines.append(f"  (the loop-free cost compile did not fit in HBM: costed as {result.cost_micro_steps} "
                   "micro-steps, a slight over-estimate)")
    lines.append(f"  cost-model step time {_number(result.step_seconds, '.4f')} s, MFU "
                 f"{'?' if result.mfu is None else f'{result.mfu:.1%}'} of {PEAK_FLOPS_PER_CHIP / 1e12:.0f} TFLOP/s "
                 f"per chip" + (" (the Pallas calls in it: the kernel's own estimate, not the compiler's)"
                                if result.kernel_estimate else ""))
    lines.append(f"  {tokens:.3g} tokens: {_number(result.days(tokens), '.2f')} days, "
                 f"{_number(result.chip_hours(tokens), ',.0f')} chip-hours")
  return "\n".join(lines)
