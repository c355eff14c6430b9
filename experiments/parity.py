"""Does TokenFormer match a Transformer? A tuned, multi-seed parity study on unrepeated tokens.

  python -m experiments.parity                     # the whole study, resumable (many CPU hours; see below)
  python -m experiments.parity --phase=sweep       # only the learning-rate sweeps
  python -m experiments.parity --phase=growth      # the sweeps, then the growth ladder (experiments/parity_growth.py)
  python -m experiments.parity --only=NAME         # one run, as its record's `command` says; prints the loss
  python -m experiments.parity --report            # rewrite docs/results/parity.{md,json,png} from the records
  python -m experiments.parity --smoke             # seconds: every code path on toy sizes (tests)

The data: `software-docs.jsonl.gz` (41 M characters, 2,364 documents, about 18 M tokens with the shipped
2,048-piece tokenizer), 5% of its documents held out for validation (no run trains on them). Every run reads
the training windows once at most (the record says which fraction of an epoch it used).

The models, matched in non-embedding parameters (1.23 M each; d = 160, 4 layers, 5 heads, 256 tokens of
context): a TokenFormer in the ladder's init (fan-in) and in the authors' PyTorch init (NeoX), the GPT-2-style
GeLU Transformer, the same Transformer with a SwiGLU MLP, and the "is Pattention just an FFN?" control (the
TokenFormer's shapes with Θ = gelu and no normalisation: every projection a two-layer MLP).

The study, in the order it runs (each finished run recorded as docs/results/parity/runs/NAME.json and skipped
when the runner starts again, on any machine that has the records):
  1. sweep: per architecture, learning rates spaced ×2 on 2.5 M tokens at seed 0; while the best sits at an edge
     of the grid, the grid grows past that edge.
  2. growth: a 3-stage ladder of TokenFormers grown by four recipes (zero_keys or random new tokens × AdamW state
     reset or carried) and of Net2Net-widened Transformers, each grown stage against its scratch twin, at the
     sweep's learning rates (experiments/parity_growth.py says how; about 1.5 CPU-hours).
  3. final: each architecture's best learning rate on 10 M tokens, with 3 seeds for the headline pair (the better
     TokenFormer init and the GeLU Transformer) and 2 for the others.
Then the report: loss against FLOPs, the sweep curves, tables with spreads over seeds, the parity with its
spread, and growth's compute ratio per recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shlex
import sys
import time

import numpy as np

from experiments import _harness as h
from tokenformer_jax import report
from tokenformer_jax.config import DataConfig, ModelConfig, ParamTokens, TrainConfig, flops_per_token

NAME = "parity"
CORPUS = h.REPO.parent / "shared" / "data" / "software-docs.jsonl.gz"
RECORDS = h.RESULTS / NAME / "runs"


@dataclasses.dataclass(frozen=True)
class Scale:
  d: int
  layers: int
  heads: int
  seq_len: int
  batch: int
  sweep_tokens: int
  final_tokens: int
  lrs: tuple[float, ...]        # the sweep's first grid (×2 apart); it grows past an edge that wins
  evals: int                    # validation points per final run (sweeps: a quarter as many, at least 2)
  eval_batches: int             # the same validation windows for every run
  warmup_fraction: float = 0.05


FULL = Scale(d=160, layers=4, heads=5, seq_len=256, batch=16, sweep_tokens=2_500_000, final_tokens=10_000_000,
             lrs=(1e-3, 2e-3, 4e-3, 8e-3), evals=10, eval_batches=48)
SMOKE = Scale(d=16, layers=1, heads=2, seq_len=32, batch=8, sweep_tokens=2560, final_tokens=5120,
              lrs=(0.016, 0.032, 0.064, 0.128), evals=2, eval_batches=2)
MAX_GRID = 8   # a sweep whose best is still at an edge after this many values stops with an error

# Architecture → seeds of its final runs. The headline pair gets 3; which TokenFormer init is the headline's is
# decided by the sweep (the lower best loss).
ARCHITECTURES = ("tokenformer", "transformer", "tokenformer_neox", "transformer_swiglu", "mlp_control")
TOKENFORMERS = ("tokenformer", "tokenformer_neox")   # the two init styles; the headline pair takes one
LABELS = {"tokenformer": "TokenFormer (fan-in init)", "tokenformer_neox": "TokenFormer (NeoX init)",
          "transformer": "Transformer (GeLU)", "transformer_swiglu": "Transformer (SwiGLU)",
          "mlp_control": "MLP control (Θ = gelu)"}


def model(arch: str, s: Scale) -> ModelConfig:
  """The five architectures at one scale, matched in non-embedding parameters (12·L·d² each)."""
  # 2·L·d·(4a + f) = 12·L·d² with f = 4a: a = 3d/4 attention tokens, f = 3d FFN tokens.
  attention, ffn = 3 * s.d // 4, 3 * s.d
  common = dict(name=arch, vocab_size=2048, d_model=s.d, n_layers=s.layers, n_heads=s.heads, positions="none",
                max_seq_len=s.seq_len)
  if arch.startswith("transformer"):
    return ModelConfig(architecture="transformer", logits_divide_by_sqrt_d=False,
                       mlp="swiglu" if arch.endswith("swiglu") else "gelu", **common)
  tokenformer = ModelConfig(param_tokens=ParamTokens.uniform(attention, ffn), logits_divide_by_sqrt_d=True, **common)
  if arch == "tokenformer_neox":
    return tokenformer.replace(init="neox", logits_divide_by_sqrt_d=False)
  if arch == "mlp_control":
    return tokenformer.replace(normalization="gelu")
  return tokenformer


def config(arch: str, lr: float, tokens: int, seed: int, s: Scale, corpus: str, *,
           model_cfg: ModelConfig | None = None, evals: int | None = None) -> TrainConfig:
  """The run of `arch` (or of `model_cfg`, a growth stage's) at one learning rate, length and seed."""
  steps = -(-tokens // (s.batch * s.seq_len))   # at least `tokens`
  data = DataConfig(train_files=(corpus,), validation_fraction=0.05, shuffle_seed=seed)
  evals = evals or (s.evals if tokens >= s.final_tokens else max(s.evals // 4, 2))
  cfg = h.train_config(model_cfg or model(arch, s), steps, seq_len=s.seq_len, batch=s.batch, lr=lr,
                       warmup=max(int(steps * s.warmup_fraction), 1), evals=evals, eval_batches=s.eval_batches,
                       seed=seed, data=data)
  return cfg.replace(checkpoint_every=max(steps // 4, 1), keep_checkpoints=2)   # a killed run resumes here


# Runs and their records -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
  arch: str
  lr: float
  tokens: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.arch}-lr{self.lr:g}-{self.tokens}-s{self.seed}"

  @classmethod
  def parse(cls, name: str) -> Spec:
    try:
      arch, lr, tokens, seed = name.split("-")
      if arch not in ARCHITECTURES or not lr.startswith("lr") or not seed.startswith("s"):
        raise ValueError
      return cls(arch, float(lr[2:]), int(tokens), int(seed[1:]))
    except ValueError:
      raise SystemExit(f"error: --only={name!r} is not a run name ARCH-lrLR-TOKENS-sSEED (ARCH one of "
                       f"{', '.join(ARCHITECTURES)}); the records' names are in {RECORDS}") from None


def records(out: pathlib.Path) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted((out / NAME / "runs").glob("*.json"))}


def command(name: str, args) -> str:
  parts = ["python", "-m", "experiments.parity", f"--only={name}"]
  if args.smoke:
    parts.append("--smoke")
  if pathlib.Path(args.corpus).resolve() != CORPUS.resolve():
    parts.append(f"--corpus={args.corpus}")
  return " ".join(map(shlex.quote, parts))


def train(spec: Spec, s: Scale, args) -> dict:
  """Train one run (resumed if its directory has a checkpoint) and return its record."""
  cfg = config(spec.arch, spec.lr, spec.tokens, spec.seed, s, args.corpus)
  started = time.time()
  curve = h.train_run(cfg, args.workdir, name=spec.name)
  flops = float(flops_per_token(cfg.model, cfg.data.seq_len)) * curve.end_tokens
  return dict(
      name=spec.name, architecture=spec.arch, label=LABELS[spec.arch], non_embedding_params=h.non_embedding(cfg.model),
      tokens=int(curve.end_tokens), flops=flops, learning_rate=spec.lr, seed=spec.seed,
      final_val_loss=curve.final_eval_loss, command=command(spec.name, args),
      curve={"tokens": curve.tokens(curve.eval_steps).tolist(), "val_loss": curve.eval_loss.tolist()},
      seconds=round(time.time() - started, 1), steps=cfg.steps,
      recorded=time.strftime("%Y-%m-%d %H:%M:%S"))


def record(spec: Spec, s: Scale, args) -> dict:
  """The run's record: read if recorded, else trained and written (atomically) under --out."""
  path = pathlib.Path(args.out) / NAME / "runs" / f"{spec.name}.json"
  if path.exists():
    return json.loads(path.read_text())
  h.say(f"{spec.name}: training {spec.tokens / 1e6:g}M tokens")
  result = train(spec, s, args)
  report.write_text(path, json.dumps(result, indent=1) + "\n")
  h.say(f"{spec.name}: validation loss {result['final_val_loss']:.4f} ({result['seconds']:.0f}s); recorded {path}")
  return result


# The plan ---------------------------------------------------------------------------------------------
def best_lr(done: dict[str, dict], arch: str, tokens: int) -> tuple[float | None, list[float]]:
  """The best learning rate of an architecture's sweep and the sweep's grid (sorted)."""
  runs = [r for r in done.values() if r["architecture"] == arch and r["tokens"] >= tokens * 0.99
          and r["tokens"] <= tokens * 1.01 and r["seed"] == 0]
  grid = sorted(r["learning_rate"] for r in runs)
  finite = [r for r in runs if math.isfinite(r["final_val_loss"])]
  if not finite:
    return None, grid
  return min(finite, key=lambda r: r["final_val_loss"])["learning_rate"], grid


def next_sweep_lr(done: dict[str, dict], arch: str, s: Scale) -> float | None:
  """The next learning rate `arch`'s sweep needs (the first grid, then one step past an edge that wins), or
  None when its best value has a worse neighbour on both sides."""
  best, grid = best_lr(done, arch, s.sweep_tokens)
  missing = [lr for lr in s.lrs if not any(math.isclose(lr, g) for g in grid)]
  if missing:
    return missing[0]
  if best is None:
    raise SystemExit(f"error: every sweep run of {arch} diverged; lower the grid (Scale.lrs)")
  if best not in (grid[0], grid[-1]):
    return None
  if len(grid) >= MAX_GRID:
    raise SystemExit(f"error: {arch}'s best learning rate {best:g} is still at the edge of {len(grid)} values")
  return best / 2 if best == grid[0] else best * 2


def sweep(arch: str, s: Scale, args) -> float:
  """Sweep `arch`'s learning rate until its best value has a worse neighbour on both sides; returns it."""
  while (lr := next_sweep_lr(records(pathlib.Path(args.out)), arch, s)) is not None:
    record(Spec(arch, lr, s.sweep_tokens, 0), s, args)
  return best_lr(records(pathlib.Path(args.out)), arch, s.sweep_tokens)[0]


def final_seeds(done: dict[str, dict], s: Scale) -> dict[str, int]:
  """3 seeds for the headline pair (headline_tokenformer, the GeLU Transformer), 2 for the others."""
  headline = headline_tokenformer(*by_phase(done, s))
  return {a: 3 if a in (headline, "transformer") else 2 for a in ARCHITECTURES}


def run(args) -> None:
  s = SMOKE if args.smoke else FULL
  if not pathlib.Path(args.corpus).is_file():
    raise SystemExit(f"error: the corpus {args.corpus} does not exist; pass --corpus=PATH to software-docs.jsonl.gz")
  from experiments import parity_growth
  if args.only:
    if grown := parity_growth.Growth.parse(args.only):   # a growth run: trained with its ancestors
      if grown.name(s) != args.only:
        raise SystemExit(f"error: --only={args.only} is not a run of this scale (it would be {grown.name(s)})")
      loss = parity_growth.trained(grown, s, args).final_eval_loss
    else:
      loss = train(Spec.parse(args.only), s, args)["final_val_loss"]
    recorded = records(pathlib.Path(args.out)).get(args.only)
    line = f"{args.only}: final validation loss {loss:.6f}"
    if recorded:
      relative = abs(loss - recorded["final_val_loss"]) / abs(recorded["final_val_loss"])
      line += f" (recorded {recorded['final_val_loss']:.6f}, relative difference {relative:.1e})"
    print(line)
    return
  if not args.report:
    archs = args.archs.split(",") if args.archs else ARCHITECTURES
    unknown = sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
      raise SystemExit(f"error: --archs: unknown {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    best = {arch: sweep(arch, s, args) for arch in archs}
    if args.phase in ("all", "growth"):
      recipes = tuple(args.recipes.split(",")) if args.recipes else ()
      parity_growth.run(best, s, args, recipes)
    if args.phase in ("all", "final"):
      planned = None   # the headline init style may change as finals come in: plan again until nothing changes
      while (plan := final_seeds(records(pathlib.Path(args.out)), s)) != planned:
        planned = plan
        for arch, seeds in plan.items():
          for seed in range(seeds if arch in archs else 0):
            record(Spec(arch, best[arch], s.final_tokens, seed), s, args)
  write_report(records(pathlib.Path(args.out)), s, pathlib.Path(args.out))


# The report -------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float]:
  values = [v for v in values if math.isfinite(v)]
  if not values:
    return math.nan, math.nan
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def fmt(mean: float, std: float, digits: int = 3) -> str:
  if not math.isfinite(mean):
    return "n/a"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def by_phase(done: dict[str, dict], s: Scale) -> tuple[dict[str, list], dict[str, list]]:
  """(sweeps, finals): each architecture's sweep runs (seed 0, by learning rate) and its final runs."""
  sweeps = {a: sorted((r for r in done.values() if r["architecture"] == a and r["seed"] == 0
                       and abs(r["tokens"] - s.sweep_tokens) <= s.sweep_tokens * 0.01),
                      key=lambda r: r["learning_rate"]) for a in ARCHITECTURES}
  finals = {a: [r for r in done.values() if r["architecture"] == a
                and abs(r["tokens"] - s.final_tokens) <= s.final_tokens * 0.01] for a in ARCHITECTURES}
  return sweeps, finals


def headline_tokenformer(sweeps: dict[str, list], finals: dict[str, list]) -> str:
  """The TokenFormer init style of the headline pair: the lower mean final loss among the styles with at least 2
  final runs; before that, the lower best sweep loss."""
  seeded = [a for a in TOKENFORMERS if len(finals[a]) >= 2]
  if seeded:
    return min(seeded, key=lambda a: mean_std([r["final_val_loss"] for r in finals[a]])[0])
  return min(TOKENFORMERS, key=lambda a: min((r["final_val_loss"] for r in sweeps[a]), default=math.inf))


def write_report(done: dict[str, dict], s: Scale, out: pathlib.Path) -> None:
  sweeps, finals = by_phase(done, s)
  lines = [f"# {'Smoke test: ' if s is SMOKE else ''}TokenFormer against Transformers at matched parameters",
           "", headline(finals, sweeps), "",
           f"Models: d = {s.d}, {s.layers} layers, {s.heads} heads, {s.seq_len} tokens of context, batch {s.batch}; "
           f"sweeps on {s.sweep_tokens / 1e6:g}M tokens at seed 0, finals on {s.final_tokens / 1e6:g}M tokens. "
           "Validation: the same windows of the held-out 5% of documents for every run. Every run's record "
           f"(with the command that reproduces it) is in `{NAME}/runs/`; all of them in `{NAME}.json`.", "",
           "## Learning-rate sweeps (validation loss; best in bold)", "",
           "| architecture | non-embedding params | " + " | ".join(
               f"{lr:g}" for lr in sorted({r['learning_rate'] for rs in sweeps.values() for r in rs})) + " |"]
  grid = sorted({r["learning_rate"] for rs in sweeps.values() for r in rs})
  lines.append("|---|---|" + "---|" * len(grid))
  for arch, runs in sweeps.items():
    if not runs:
      continue
    by_lr = {r["learning_rate"]: r["final_val_loss"] for r in runs}
    best = min(by_lr, key=lambda lr: by_lr[lr] if math.isfinite(by_lr[lr]) else math.inf)
    cells = [("**{:.3f}**" if lr == best else "{:.3f}").format(by_lr[lr]) if lr in by_lr else "" for lr in grid]
    lines.append(f"| {LABELS[arch]} | {runs[0]['non_embedding_params']:,} | " + " | ".join(cells) + " |")
  lines += ["", "## Final runs", "",
            "| architecture | learning rate | seeds | validation loss (mean ± sd) | perplexity | training FLOPs |",
            "|---|---|---|---|---|---|"]
  for arch, runs in finals.items():
    if runs:
      mean, std = mean_std([r["final_val_loss"] for r in runs])
      lines.append(f"| {LABELS[arch]} | {runs[0]['learning_rate']:g} | {len(runs)} | {fmt(mean, std)} | "
                   f"{math.exp(mean):.1f} | {report.human(runs[0]['flops'])} |")
  pending = [a for a in ARCHITECTURES if not finals[a]]
  if pending:
    lines += ["", f"Not run yet: the final runs of {', '.join(LABELS[a] for a in pending)}."]
  plot(sweeps, finals, out / f"{NAME}.png")
  lines += ["", f"![validation loss against learning rate and FLOPs]({NAME}.png)", ""]
  from experiments import parity_growth
  lines += parity_growth.report_lines(done, s, out)
  report.write_text(out / f"{NAME}.md", "\n".join(lines))
  report.write_text(out / f"{NAME}.json", json.dumps({"runs": list(done.values())}, indent=1) + "\n")
  h.say(f"wrote {out / f'{NAME}.md'}")


def headline(finals: dict[str, list], sweeps: dict[str, list]) -> str:
  """What the data say, in one paragraph: the parity of the headline pair (headline_tokenformer − the GeLU
  Transformer) with its spread; the other init style is named where it ends lower on fewer seeds."""
  means = {a: mean_std([r["final_val_loss"] for r in runs])[0] for a, runs in finals.items()}
  tf = headline_tokenformer(sweeps, finals)
  a, b = [r["final_val_loss"] for r in finals[tf]], [r["final_val_loss"] for r in finals["transformer"]]
  if len(a) >= 2 and len(b) >= 2:
    gap = means[tf] - means["transformer"]
    spread = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    verdict = ("behind" if gap > 2 * spread else "ahead of" if gap < -2 * spread else "level with")
    text = (f"**Headline:** at matched non-embedding parameters and {report.human(finals[tf][0]['tokens'])} tokens, "
            f"{LABELS[tf]} is {verdict} the GeLU Transformer: validation loss {gap:+.3f} nats "
            f"(± {spread:.3f}, the standard error of the difference of means over {len(a)} and {len(b)} seeds).")
    for other in TOKENFORMERS:
      if other != tf and finals[other] and means[other] < means[tf]:
        n = len(finals[other])
        text += (f" {LABELS[other]} ends lower so far: {means[other]:.3f} over {n} seed{'s' * (n > 1)} "
                 f"(against {means[tf]:.3f}), {means[other] - means['transformer']:+.3f} nats from the Transformer; "
                 "its other seeds are not run yet.")
    return text
  swept = [a for a in ARCHITECTURES if sweeps[a]]
  best = {a: min(r["final_val_loss"] for r in sweeps[a]) for a in swept}
  return ("**Headline:** not yet: the final runs are not all done. Best sweep losses so far: " +
          ", ".join(f"{LABELS[a]} {v:.3f}" for a, v in best.items()) + ".") if swept else "**Headline:** no runs yet."


def plot(sweeps: dict[str, list], finals: dict[str, list], path: pathlib.Path) -> None:
  fig, (left, right) = report.new_figure(2, figsize=(11, 4.2))
  for arch, runs in sweeps.items():
    if runs:
      left.plot([r["learning_rate"] for r in runs], [r["final_val_loss"] for r in runs], "o-", label=LABELS[arch])
  left.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss", title="sweeps (seed 0)")
  if any(sweeps.values()):
    left.legend(fontsize=8)
  for i, (arch, runs) in enumerate(finals.items()):
    for j, r in enumerate(runs):
      flops_per_token_ = r["flops"] / r["tokens"]
      right.plot(np.array(r["curve"]["tokens"]) * flops_per_token_, r["curve"]["val_loss"], color=f"C{i}",
                 alpha=0.8, label=LABELS[arch] if j == 0 else None)
  right.set(xscale="log", xlabel="training FLOPs", ylabel="validation loss", title="final runs (every seed)")
  if any(finals.values()):
    right.legend(fontsize=8)
  report.save_figure(fig, path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--phase", choices=("sweep", "growth", "final", "all"), default="all",
                      help="sweep: only the sweeps; growth or final: the sweeps, then that phase; all: every phase")
  parser.add_argument("--recipes", default="", help="the growth phase's recipes, a comma list (default: all: "
                      "zero_keys+reset,zero_keys+carry,random+reset,random+carry; the Transformers' net2net)")
  parser.add_argument("--only", default="", help="train just this run (a record's name) and print its loss")
  parser.add_argument("--archs", default="", help=f"a comma list of architectures (default: all of "
                      f"{','.join(ARCHITECTURES)})")
  parser.add_argument("--report", action="store_true", help="only rewrite the report from the records")
  parser.add_argument("--corpus", default=str(CORPUS), help="software-docs.jsonl.gz (from ../shared/data)")
  parser.add_argument("--workdir", default="runs/parity", help="the runs' directories (a killed run resumes)")
  parser.add_argument("--out", default=str(h.RESULTS), help="where the records and the report go")
  parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds (tests)")
  args = parser.parse_args(argv)
  h.quiet()
  run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
