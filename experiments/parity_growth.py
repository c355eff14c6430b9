"""The parity study's growth phase: does growing pay, and by which recipe? (python -m experiments.parity
--phase=growth; the runner, its records and its report are experiments/parity.py's.)

A 3-stage ladder per family, each stage ×4 the non-embedding parameters of the one before, the top stage the
parity study's size (d, layers, heads of context and batch as there):
  - TokenFormer: the same d and depth, only the parameter tokens grow (attention a, FFN f = 4a per stage:
    f = 3d/16, 3d/4, 3d; the top one is exactly the study's "tokenformer"), by four recipes: new tokens
    zero_keys or random × AdamW state reset or carried (cli.grow --init, --optimizer);
  - Transformer: widened by Net2Net, d/4, d/2, d with 1, 2, 4 heads (head size d/4; the top one differs from the
    study's Transformer only in its head count), the dense growth baseline.
Stage 0 trains from scratch on B (the sweep's token count); each grown stage trains on B/2 from its parent's
final checkpoint. The scratch twin of every stage trains on B (the top TokenFormer's twin is the study's own
sweep run at the best learning rate). Every run uses its family's best learning rate of the sweep (tuned at the
top size; the smaller stages inherit it) with its own warmup and decay, seed 0.

The compute ratio of a grown stage: the FLOPs at which its validation loss first reaches the twin's final loss,
over the twin's FLOPs, cumulative (every stage before it included, stage 0's B too) and for the stage alone (the
paper's Fig. 4); "not reached" with the remaining gap when it never does.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from experiments import _harness as h
from experiments import parity
from tokenformer_jax import report
from tokenformer_jax.config import ModelConfig, ParamTokens, TrainConfig, flops_per_token
from tokenformer_jax.run import RunDir

STAGES = 3
GROWN_FRACTION = 2   # a grown stage trains on B / 2
RECIPES = {"tokenformer": ("zero_keys+reset", "zero_keys+carry", "random+reset", "random+carry"),
           "transformer": ("net2net",)}
FAMILY_LABELS = {"tokenformer": "TokenFormer", "transformer": "Transformer (Net2Net)"}


def stage_model(family: str, stage: int, s: parity.Scale) -> ModelConfig:
  """Stage `stage` (0, 1, 2) of a family's ladder: ×4 non-embedding parameters per stage."""
  down = 4 ** (STAGES - 1 - stage)
  top = parity.model(family, s)
  if family == "tokenformer":
    if stage == STAGES - 1:
      return top   # the study's own model: its sweep run is the top stage's scratch twin
    ffn = 3 * s.d // down
    return top.replace(name=f"tokenformer_stage{stage}", param_tokens=ParamTokens.uniform(max(round(ffn / 4), 1), ffn))
  return top.replace(name=f"transformer_stage{stage}", d_model=s.d // 2 ** (STAGES - 1 - stage), n_heads=2 ** stage)


@dataclasses.dataclass(frozen=True)
class Growth:
  """One run of the growth phase: a scratch run of a stage, or a stage grown from the same recipe's stage before."""
  family: str
  stage: int
  recipe: str      # "scratch" or one of RECIPES[family]
  lr: float
  seed: int = 0

  def tokens(self, s: parity.Scale) -> int:
    return s.sweep_tokens if self.recipe == "scratch" else s.sweep_tokens // GROWN_FRACTION

  def name(self, s: parity.Scale) -> str:
    return f"{self.family}{self.stage}-{self.recipe}-lr{self.lr:g}-{self.tokens(s)}-s{self.seed}"

  @property
  def parent(self) -> Growth | None:
    if self.recipe == "scratch":
      return None
    return dataclasses.replace(self, stage=self.stage - 1, recipe=self.recipe if self.stage > 1 else "scratch")

  @classmethod
  def parse(cls, name: str) -> Growth | None:
    """The run a record's name stands for, or None if it is not a growth-phase name."""
    parts = name.split("-")
    if len(parts) != 5 or not parts[0][-1:].isdigit():
      return None
    family, stage, recipe, lr, seed = parts[0][:-1], int(parts[0][-1]), parts[1], parts[2], parts[4]
    if family not in RECIPES or recipe not in ("scratch", *RECIPES[family]) or not 0 <= stage < STAGES:
      return None
    return cls(family, stage, recipe, float(lr.removeprefix("lr")), int(seed.removeprefix("s")))

  def config(self, s: parity.Scale, corpus: str) -> TrainConfig:
    evals = None if self.recipe == "scratch" else s.evals   # a grown curve needs points to interpolate between
    return parity.config(self.family, self.lr, self.tokens(s), self.seed, s, corpus,
                         model_cfg=stage_model(self.family, self.stage, s), evals=evals)


def trained(g: Growth, s: parity.Scale, args) -> report.Curve:
  """g's curve, trained (and grown from its ancestors, trained first where they are not) unless finished."""
  cfg = g.config(s, args.corpus)
  if g.parent is None:
    return h.train_run(cfg, args.workdir, name=g.name(s))
  from tokenformer_jax.cli.grow import grow_checkpoint
  source = pathlib.Path(trained(g.parent, s, args).path)
  grown = source.parent / f"{g.name(s)}-grown"
  if not RunDir(grown).finished(0):   # (cli.grow puts a grown checkpoint in place whole)
    init, optimizer = ("zero_keys", "reset") if g.recipe == "net2net" else g.recipe.split("+")
    grow_checkpoint(str(source), None, cfg, str(grown), init=init, optimizer=optimizer, seed=g.seed)
  return h.train_run(cfg, args.workdir, init_from=grown, name=g.name(s))


def record(g: Growth, s: parity.Scale, args) -> dict:
  """g's record (with its parent's recorded first): read if recorded, else trained and written."""
  parent = record(g.parent, s, args) if g.parent else None
  path = pathlib.Path(args.out) / parity.NAME / "runs" / f"{g.name(s)}.json"
  if path.exists():
    return json.loads(path.read_text())
  h.say(f"{g.name(s)}: training {g.tokens(s) / 1e6:g}M tokens" + (f" from {parent['name']}" if parent else ""))
  cfg = g.config(s, args.corpus)
  curve = trained(g, s, args)
  flops = float(flops_per_token(cfg.model, cfg.data.seq_len)) * curve.end_tokens
  result = dict(
      name=g.name(s), architecture=f"{g.family}_stage{g.stage}", phase="growth", family=g.family, stage=g.stage,
      recipe=g.recipe, grown_from=parent["name"] if parent else None,
      non_embedding_params=h.non_embedding(cfg.model), tokens=int(curve.end_tokens), flops=flops,
      cumulative_flops=flops + (parent["cumulative_flops"] if parent else 0.0), learning_rate=g.lr, seed=g.seed,
      final_val_loss=curve.final_eval_loss, command=parity.command(g.name(s), args),
      curve={"tokens": curve.tokens(curve.eval_steps).tolist(), "val_loss": curve.eval_loss.tolist()},
      steps=cfg.steps)
  report.write_text(path, json.dumps(result, indent=1) + "\n")
  h.say(f"{g.name(s)}: validation loss {result['final_val_loss']:.4f}; recorded {path}")
  return result


def twin_name(family: str, stage: int, lr: float, s: parity.Scale) -> str:
  """The scratch twin of a stage: the top TokenFormer's is the study's sweep run at that learning rate."""
  if family == "tokenformer" and stage == STAGES - 1:
    return parity.Spec(family, lr, s.sweep_tokens, 0).name
  return Growth(family, stage, "scratch", lr).name(s)


def twin(family: str, stage: int, lr: float, s: parity.Scale, args) -> dict:
  if family == "tokenformer" and stage == STAGES - 1:
    return parity.record(parity.Spec(family, lr, s.sweep_tokens, 0), s, args)
  return record(Growth(family, stage, "scratch", lr), s, args)


def run(best: dict[str, float], s: parity.Scale, args, recipes: tuple[str, ...] = ()) -> None:
  """Every family whose sweep is done (`best`: architecture → learning rate), every recipe (or `recipes`)."""
  for family, lr in best.items():
    if family not in RECIPES:
      continue
    chosen = [r for r in RECIPES[family] if not recipes or r in recipes]
    if not chosen:
      continue
    for recipe in chosen:
      record(Growth(family, STAGES - 1, recipe, lr), s, args)
    for stage in range(1, STAGES):
      twin(family, stage, lr, s, args)


# The report -------------------------------------------------------------------------------------------
def flops_to_reach(run: dict, loss: float) -> float | None:
  """The run's own FLOPs at which its validation loss first reaches `loss` (linear between evaluations)."""
  x = np.asarray(run["curve"]["tokens"], float) * run["flops"] / run["tokens"]
  y = np.asarray(run["curve"]["val_loss"], float)
  for i in range(len(y)):
    if y[i] <= loss:
      if i == 0:
        return float(x[0])
      return float(x[i - 1] + (y[i - 1] - loss) / (y[i - 1] - y[i]) * (x[i] - x[i - 1]))
  return None


def ratios(grown: dict, twin_run: dict) -> tuple[float | None, float | None]:
  """(cumulative, this stage alone) FLOPs for `grown` to reach the twin's final loss, over the twin's FLOPs."""
  own = flops_to_reach(grown, twin_run["final_val_loss"])
  if own is None:
    return None, None
  before = grown["cumulative_flops"] - grown["flops"]
  return (before + own) / twin_run["flops"], own / twin_run["flops"]


def report_lines(done: dict[str, dict], s: parity.Scale, out: pathlib.Path) -> list[str]:
  """The growth section of parity.md (and parity_growth.png); empty while no grown stage is recorded."""
  grown = [r for r in done.values() if r.get("phase") == "growth" and r["recipe"] != "scratch" and r["stage"] > 0]
  if not grown:
    return []
  lines = ["## Growth: a 3-stage ladder, grown against scratch twins", "",
           "Each stage ×4 the non-embedding parameters of the one before; stage 0 from scratch on B tokens, each "
           f"grown stage on B/{GROWN_FRACTION} from the one before, every scratch twin on B; the family's best "
           "sweep learning rate everywhere, seed 0 (one seed: differences of a few hundredths are within the "
           "seeds' spread of the final runs). Ratio < 1: growth paid.", "",
           "| grown stage | recipe | params | its loss | twin's loss | ratio (cumulative) | ratio (stage alone) |",
           "|---|---|---|---|---|---|---|"]
  twins = {}
  for g in sorted(grown, key=lambda r: (r["family"], r["recipe"], r["stage"])):
    t = done.get(twin_name(g["family"], g["stage"], g["learning_rate"], s))
    if t is None:
      continue
    twins[g["family"], g["stage"]] = t
    if stage0 := done.get(Growth(g["family"], 0, "scratch", g["learning_rate"]).name(s)):
      twins[g["family"], 0] = stage0   # (plotted: where every chain starts)
    cumulative, alone = ratios(g, t)
    reached = (f"{cumulative:.2f} | {alone:.2f}" if cumulative is not None else
               f"not reached (gap {g['final_val_loss'] - t['final_val_loss']:+.3f}) | —")
    lines.append(f"| {FAMILY_LABELS[g['family']]} stage {g['stage']} | {g['recipe']} | "
                 f"{report.human(g['non_embedding_params'])} | {g['final_val_loss']:.3f} | {t['final_val_loss']:.3f} | "
                 f"{reached} |")
  plot(done, grown, twins, out / f"{parity.NAME}_growth.png")
  return lines + ["", f"![validation loss against cumulative FLOPs]({parity.NAME}_growth.png)", ""]


def plot(done: dict[str, dict], grown: list[dict], twins: dict, path: pathlib.Path) -> None:
  fig, axes = report.new_figure(len(RECIPES), figsize=(11, 4.2))
  for ax, family in zip(axes, RECIPES):
    for i, recipe in enumerate(RECIPES[family]):
      chain = sorted((g for g in grown if g["family"] == family and g["recipe"] == recipe), key=lambda g: g["stage"])
      for j, g in enumerate(chain):
        start = g["cumulative_flops"] - g["flops"]
        x = start + np.asarray(g["curve"]["tokens"]) * g["flops"] / g["tokens"]
        ax.plot(x, g["curve"]["val_loss"], color=f"C{i}", label=recipe if j == 0 else None)
    for (f, stage), t in sorted(twins.items()):
      if f == family:
        ax.plot(np.asarray(t["curve"]["tokens"]) * t["flops"] / t["tokens"], t["curve"]["val_loss"], "k--",
                alpha=0.3 + 0.3 * stage, label=f"scratch stage {stage}")
    ax.set(xscale="log", xlabel="cumulative training FLOPs", ylabel="validation loss", title=FAMILY_LABELS[family])
    if ax.get_legend_handles_labels()[1]:   # a family with no run yet (a partial study) has nothing to name
      ax.legend(fontsize=7)
  report.save_figure(fig, path)
