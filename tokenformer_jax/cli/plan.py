"""Plan a TPU v4 run from this machine: compile the real train step for a topology (needs `pip install -e '.[plan]'`).

  python -m tokenformer_jax.cli.plan --config=experiments/paper.py:ladder_1_4b --topology=v4-32
  python -m tokenformer_jax.cli.plan --config=experiments/paper.py:ladder_1_4b --topology=v4-32 \
      --set model.remat=full --set mesh.preset=fsdp_tp --set mesh.tensor=4
  python -m tokenformer_jax.cli.plan --ladder              # every ladder stage: its smallest fitting slice
  python -m tokenformer_jax.cli.plan --ladder --slices=v4-32   # every ladder stage on a v4-32

A model config (experiments/paper.py) is planned with the paper's ladder recipe: 512 × 1024 tokens per step,
bf16 compute, FSDP over all chips. A TrainConfig is planned as it is. --set applies to the TrainConfig.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # a plan compiles for a TPU that is not here

from absl import app, flags  # noqa: E402

from tokenformer_jax import plan  # noqa: E402
from tokenformer_jax.cli.common import CONFIG, OVERRIDES, one_line_errors, quiet_console  # noqa: E402
from tokenformer_jax.config import ModelConfig, TrainConfig, apply_overrides, load_config  # noqa: E402

TOPOLOGY = flags.DEFINE_string("topology", "v4-32", "A TPU v4 slice: v4-N (N cores = N/2 chips), v4:XxYxZ, Sxv4-N.")
TOKENS = flags.DEFINE_float("tokens", 30e9, "Token budget for the days and chip-hours (single config).")
LADDER = flags.DEFINE_bool("ladder", False, "Plan every ladder stage and the Pile 1.5B: smallest slice that fits.")
SLICES = flags.DEFINE_list("slices", list(plan.LADDER_SLICES), "--ladder: the slices to try, smallest first.")
REMATS = flags.DEFINE_list("remats", list(plan.REMAT_ORDER), "--ladder: remat policies to try, in this order.")
STAGES = flags.DEFINE_list("stages", [], "--ladder: only these stages (config names), e.g. ladder_1_4b.")

# (config, token budget, global batch, sequence length): paper §4.1 and App. D/F.
LADDER_STAGES = (("experiments/paper.py:ladder_124m", 300e9, 512, 1024),
                 ("experiments/paper.py:ladder_354m", 30e9, 512, 1024),
                 ("experiments/paper.py:ladder_757m", 30e9, 512, 1024),
                 ("experiments/paper.py:ladder_1_4b", 30e9, 512, 1024),
                 ("experiments/paper.py:pile_1_5b", 300e9, 1024, 2048))


def train_config(spec: str, overrides, global_batch: int = 512, seq_len: int = 1024) -> TrainConfig:
  cfg = load_config(spec)
  if isinstance(cfg, ModelConfig):
    cfg = plan.ladder_train_config(cfg, global_batch=global_batch, seq_len=seq_len)
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f"{spec} is a {type(cfg).__name__}; plan needs a ModelConfig or a TrainConfig")
  return apply_overrides(cfg, overrides)


def ladder() -> None:
  rows = []
  for spec, tokens, global_batch, seq_len in LADDER_STAGES:
    if STAGES.value and spec.partition(":")[2] not in STAGES.value:
      continue
    cfg = train_config(spec, OVERRIDES.value, global_batch, seq_len)
    print(f"{cfg.model.name}: {global_batch} × {seq_len} tokens per step", flush=True)
    try:
      found = plan.smallest_fit(cfg, SLICES.value, REMATS.value, log=lambda line: print(line, flush=True))
    except Exception as error:  # noqa: BLE001 (one stage's failure leaves the others' rows)
      found, failure = None, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    else:
      failure = f"fits none of {', '.join(SLICES.value)}"
    rows.append(plan.table_row(found, tokens) if found else
                f"| {cfg.model.name} | {failure} | | | | | | | {tokens:.3g} | | |")
    print(rows[-1], flush=True)
  print("\n" + plan.TABLE_HEADER + "\n" + "\n".join(rows))


@one_line_errors(ValueError, plan.PlanError)
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; fields are set with --set field=value")
  quiet_console(os.path.join(tempfile.gettempdir(), "tokenformer_jax", "logs"), "plan")
  reason = plan.libtpu_missing()
  if reason:
    raise plan.PlanError(reason)
  if LADDER.value:
    return ladder()
  if not CONFIG.value:
    raise ValueError("--config is required (or --ladder), e.g. --config=experiments/paper.py:ladder_1_4b")
  result = plan.plan(train_config(CONFIG.value, OVERRIDES.value), TOPOLOGY.value)
  print(plan.describe(result, TOKENS.value))


if __name__ == "__main__":
  app.run(main)
