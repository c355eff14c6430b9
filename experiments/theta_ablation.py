"""Θ ablation (the direction of paper Table 4) and the norm scale after growth, in miniature, on this CPU.

  python -m experiments.theta_ablation              # minutes on a 2-core CPU; docs/results/theta_ablation.*
  python -m experiments.theta_ablation --smoke      # seconds: every code path on toy sizes

1. The ladder's first model (growth_pays.py's ×1 TokenFormer) trained on the same budget with each Θ:
   softmax (exp + L1), gelu_l2_norm and l2_norm_gelu (the paper's and this framework's default), over seeds.
2. Each l2_norm_gelu model grown ×4 with zero-key tokens and trained on B/4, once keeping the old norm scale
   sqrt(n_old) (this framework's default: exactly function-preserving) and once with the authors' live
   sqrt(n_new): the validation loss right after growth and after the continued training.
"""
from __future__ import annotations

import sys

import numpy as np
from etils import epath

from experiments import _harness as h
from experiments import growth_pays
from tokenformer_jax import report

NAME = "theta_ablation"
THETAS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def run(workdir: str, out: str, smoke: bool = False, seeds: int | None = None) -> dict:
  h.quiet()
  s = growth_pays.setup(smoke)
  seeds = seeds or (1 if smoke else 2)
  budget, reduced = s["budget"], s["budget"] // s["fraction"]
  tf_models, _ = growth_pays.models(s)
  base, bigger = tf_models[0], tf_models[1]
  configs = {}
  thetas = ("l2_norm_gelu", "softmax") if smoke else THETAS   # (smoke: gelu_l2_norm takes the same path)
  theta = {t: [] for t in thetas}
  for seed in range(seeds):
    for t in thetas:
      cfg = growth_pays.config(s, base.replace(normalization=t), budget, seed=seed)
      configs[(t, seed)] = cfg
      theta[t].append(h.train_run(cfg, workdir, name=f"{t}, seed {seed}"))
  grown: dict[str, list[report.Curve]] = {"keep": [], "follow": []}
  for seed in range(seeds):
    parent = theta["l2_norm_gelu"][seed]
    for scale in grown:
      train_cfg, grown_dir = h.grow_run(parent, configs[("l2_norm_gelu", seed)],
                                        growth_pays.config(s, bigger, reduced), workdir, init="zero_keys",
                                        seed=0, keep_scale=scale == "keep")
      grown[scale].append(h.train_run(train_cfg, workdir, init_from=grown_dir,
                                      name=f"grown ×4, scale {scale}, seed {seed}"))
  summary = summarize(theta, grown, s, seeds)
  plot(theta, grown, epath.Path(out) / f"{NAME}.png")
  h.write_results(out, NAME, summary["markdown"])
  return summary


def loss_at_step0(curve: report.Curve) -> float:
  return float(curve.eval_loss[0]) if len(curve.eval_steps) and curve.eval_steps[0] == 0 else float("nan")


def summarize(theta, grown, s, seeds) -> dict:
  finals = {t: [c.final_eval_loss for c in curves] for t, curves in theta.items()}
  rows = ["| Θ | final validation loss (mean ± std over seeds) | per seed |", "|---|---|---|"]
  for t in theta:
    rows.append(f"| {t} | {h.mean_spread(finals[t])} | {', '.join(f'{v:.3f}' for v in finals[t])} |")
  parents = [c.final_eval_loss for c in theta["l2_norm_gelu"]]
  after = {k: [loss_at_step0(c) for c in curves] for k, curves in grown.items()}
  final = {k: [c.final_eval_loss for c in curves] for k, curves in grown.items()}
  growth_rows = ["| norm scale after growth | loss before growth | loss right after growth (step 0) | change | "
                 "loss after B/4 of training |", "|---|---|---|---|---|"]
  labels = {"keep": "kept sqrt(n_old) (default)", "follow": "live sqrt(n_new) (authors' code)"}
  for k in grown:
    change = [a - p for a, p in zip(after[k], parents)]
    growth_rows.append(f"| {labels[k]} | {h.mean_spread(parents)} | {h.mean_spread(after[k])} | "
                       f"{h.mean_spread(change)} | {h.mean_spread(final[k])} |")
  markdown = (f"# Θ ablation and the norm scale after growth\n\n"
              f"Command: `python -m experiments.theta_ablation` (the ×1 TokenFormer of "
              f"[growth_pays](growth_pays.md): d={s['d']}, {s['layers']} layers, {s['budget']} steps of "
              f"{s['batch']}×{s['seq_len']} tokens; seeds 0..{seeds - 1} change the initialisation, the data order "
              "is the same).\n\n"
              f"![Θ ablation]({NAME}.png)\n\n## Θ on the same budget\n\n" + "\n".join(rows) + "\n\n"
              f"## After zero-key growth ×1 → ×4: kept scale vs live sqrt(n)\n\n" + "\n".join(growth_rows) + "\n\n"
              f"## Every run\n\n{report.table([c for v in (*theta.values(), *grown.values()) for c in v])}")
  return {"markdown": markdown, "finals": finals, "parents": parents, "after_growth": after, "grown_final": final}


def plot(theta, grown, path) -> None:
  fig, axes = report.new_figure(2, figsize=(13, 5))
  colors = {"l2_norm_gelu": "tab:blue", "gelu_l2_norm": "tab:green", "softmax": "tab:red",
            "keep": "tab:blue", "follow": "tab:orange"}

  def band(ax, curves, label, color):
    steps = curves[0].eval_steps
    losses = np.array([c.eval_loss for c in curves if len(c.eval_loss) == len(steps)])
    x = curves[0].tokens(steps) - curves[0].start_tokens
    ax.plot(x, losses.mean(0), color=color, marker="o", markersize=3.5,
            label=f"{label} (mean of {len(losses)} seed{'s' if len(losses) > 1 else ''})")
    if len(losses) > 1:
      ax.fill_between(x, losses.min(0), losses.max(0), color=color, alpha=0.2)

  for t, curves in theta.items():
    band(axes[0], curves, t, colors[t])
  labels = {"keep": "kept scale sqrt(n_old)", "follow": "live sqrt(n_new)"}
  for k, curves in grown.items():
    band(axes[1], curves, labels[k], colors[k])
  before = np.mean([c.final_eval_loss for c in theta["l2_norm_gelu"]])
  axes[1].axhline(before, color="gray", linestyle=":", label="the ×1 model before growth")
  for ax, title in ((axes[0], "Θ on the same budget (band: min-max over seeds)"),
                    (axes[1], "zero-key growth ×1 → ×4, then B/4 of training")):
    ax.set_xlabel("training tokens of this run")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  values = np.concatenate([c.eval_loss[c.eval_steps > 0] for v in theta.values() for c in v])
  axes[0].set_ylim(values.min() - 0.05, np.percentile(values, 80))
  report.save_figure(fig, path)
  h.say(f"wrote {path}")


def main(argv=None) -> None:
  args = h.parse_args(__doc__.splitlines()[0], NAME, argv)
  run(args.workdir, args.out, smoke=args.smoke, seeds=args.seeds)


if __name__ == "__main__":
  main(sys.argv[1:])
