"""The paper's vision claims in miniature, on scikit-learn's digits (experiments/vision.py), 3 seeds each.

  python -m experiments.vision_study              # ~20 CPU-minutes; docs/results/vision/
  python -m experiments.vision_study --smoke      # seconds: every code path on a few steps

1. The main job (`digits`, a TokenFormer) against its dense twin (`digits_vit`: a ViT with the same width, depth,
   parameters within 2%, and the same recipe): test top-1 against steps (Table 2's claim: they match).
2. Table 4's Θ in the Pattentions: softmax (exp + L1), gelu_l1_norm (GeLU + L1), l2_norm_gelu (GeLU + L2, the
   default and the main job).
3. Table 5's block norms: γ and β, β only, none (non-parametric: the default and the main job).
4. Growth: each main-job run grown into `digits_grown` (zero keys, the norm scale kept) and trained for a third of
   the main job's steps, against `digits_grown` trained from scratch for the main job's steps: test top-1 against
   cumulative training FLOPs (the grown run's count includes its parent's).

Seeds 0, 1, 2 change the initialisation; the data order and the augmentation draws are the same. Every run lives
under --workdir in a directory named by a hash of its config, and a finished one is not trained again: rerun to
resume. Whichever way the results come out, they are written to --out as vision.md, vision.png and digits.png.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

from experiments import _harness as h
from tokenformer_jax.config import apply_overrides, count_params, flops_per_token, load_config
from tokenformer_jax.inference import evaluate_images, load_model

NAME = "vision"
SEEDS = 3
THETAS = {"softmax": "softmax (exp + L1)", "gelu_l1_norm": "GeLU + L1", "l2_norm_gelu": "GeLU + L2 (default)"}
NORMS = {"scale_bias": "γ and β", "bias": "β only", "none": "none (default)"}


def configs(smoke: bool):
  base = load_config("experiments/vision.py:digits")
  vit = load_config("experiments/vision.py:digits_vit")
  grown = load_config("experiments/vision.py:digits_grown")
  if smoke:
    fast = ["steps=6", "eval_every=3", "checkpoint_every=6", "optim.warmup_steps=2"]
    base, vit, grown = (apply_overrides(c, fast) for c in (base, vit, grown))
  return base, vit, grown


def curve(workdir) -> dict:
  """{"steps", "top1", "loss"} of the run's evaluations, from its metrics.jsonl (the last record of a step wins)."""
  evals: dict[int, dict] = {}
  for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "eval/top1" in record:
      evals[record["step"]] = record
  steps = sorted(evals)
  return {"steps": np.array(steps), "top1": np.array([evals[s]["eval/top1"] for s in steps]),
          "loss": np.array([evals[s]["eval/loss"] for s in steps]), "path": str(workdir)}


def train(cfg, root, *, init_from=None, name: str) -> dict:
  from tokenformer_jax.train.loop import train as train_loop
  workdir = h.run_dir(root, cfg, epath.Path(init_from).name if init_from else "")
  if not h.finished(cfg, workdir):
    final = train_loop(cfg, str(workdir), init_from=None if init_from is None else str(init_from))
    h.say(f"{name}: test top-1 {final['eval/top1']:.2%}")
  out = curve(workdir)
  out.update(name=name, flops_per_step=step_flops(cfg))
  return out


def step_flops(cfg) -> float:
  return float(flops_per_token(cfg.model, cfg.example_tokens)) * cfg.global_batch * cfg.example_tokens


def run(workdir: str, out: str, smoke: bool = False, seeds: int | None = None) -> dict:
  h.quiet()
  base, vit, grown_target = configs(smoke)
  seeds = seeds or (1 if smoke else SEEDS)
  runs: dict[str, list[dict]] = {}

  def each(key, cfg, label, **kw):
    runs.setdefault(key, []).append(train(cfg, workdir, name=label, **kw))

  for seed in range(seeds):
    each("tokenformer", base.replace(seed=seed), f"TokenFormer, seed {seed}")
  for seed in range(seeds):
    each("vit", vit.replace(seed=seed), f"ViT, seed {seed}")
  for theta in ("softmax", "gelu_l1_norm"):
    for seed in range(seeds):
      each(f"theta/{theta}", base.replace(seed=seed, model=base.model.replace(normalization=theta)),
           f"Θ {theta}, seed {seed}")
  for norm in ("scale_bias", "bias"):
    for seed in range(seeds):
      each(f"norm/{norm}", base.replace(seed=seed, model=base.model.replace(block_norm=norm)),
           f"norms {norm}, seed {seed}")
  runs["theta/l2_norm_gelu"] = runs["norm/none"] = runs["tokenformer"]

  continued = grown_target.replace(steps=max(base.steps // 3, 1), eval_every=max(base.eval_every // 2, 1),
                                   checkpoint_every=max(base.steps // 3, 1),
                                   optim=grown_target.optim.replace(warmup_steps=max(base.optim.warmup_steps // 2, 1)))
  for seed in range(seeds):
    parent = runs["tokenformer"][seed]
    cfg, grown_dir = h.grow_run(_as_curve(parent), base.replace(seed=seed), continued, workdir, init="zero_keys",
                                seed=seed)
    result = train(cfg, workdir, init_from=grown_dir, name=f"grown, seed {seed}")
    result["start_flops"] = base.steps * parent["flops_per_step"]
    result["at_growth"] = evaluate_images(load_model(str(grown_dir)))["top1"]
    result["steps"], result["top1"] = np.r_[0, result["steps"]], np.r_[result["at_growth"], result["top1"]]
    runs.setdefault("grown", []).append(result)
    each("scratch", grown_target.replace(seed=seed), f"digits_grown from scratch, seed {seed}")

  summary = summarize(runs, base, vit, grown_target, continued, seeds)
  plot(runs, base, epath.Path(out))
  h.write_results(out, NAME, summary)
  return runs


class _as_curve:   # what h.grow_run reads of a parent run: its directory
  def __init__(self, result: dict):
    self.path = result["path"]


def finals(results: list[dict], key: str = "top1") -> list[float]:
  return [float(r[key][-1]) for r in results]


def pct(values) -> str:
  values = 100 * np.asarray(values)
  spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
  return f"{np.mean(values):.2f}{spread} ({', '.join(f'{v:.2f}' for v in values)})"


def summarize(runs, base, vit, grown_target, continued, seeds) -> str:
  params = lambda cfg: count_params(cfg.model)["total"]
  lines = ["# Vision in miniature: scikit-learn's digits",
           "",
           "Written by `python -m experiments.vision_study` ([experiments/vision_study.py](../../../experiments/"
           "vision_study.py); configs in [experiments/vision.py](../../../experiments/vision.py)). The fixed test split "
           "(360 of the 1,797 images, stratified, seed 0), never seen in training; test top-1 in % after the last "
           f"step, mean ± std over seeds 0..{seeds - 1} (per seed in brackets). Recipe of every run: "
           f"{base.steps} steps of {base.global_batch} images, AdamW lr {base.optim.learning_rate:g} (warmup "
           f"{base.optim.warmup_steps}, cosine to {base.optim.min_lr_ratio:g}×), weight decay "
           f"{base.optim.weight_decay:g}, random crops (pad {base.data.image_crop_padding}).",
           "",
           "## The main job, and TokenFormer against a ViT at matched parameters (paper Table 2)",
           "",
           "| model | parameters | test top-1 % | min | max |", "|---|---|---|---|---|"]
  for key, cfg, label in (("tokenformer", base, "`digits` (TokenFormer)"), ("vit", vit, "`digits_vit` (ViT)")):
    values = finals(runs[key])
    lines.append(f"| {label} | {params(cfg):,} | {pct(values)} | {100 * min(values):.2f} | {100 * max(values):.2f} |")
  lines += ["", "## Θ of the Pattentions (paper Table 4: 79.6 → 81.7 → 82.5 on ImageNet)", "",
            "| Θ | test top-1 % | final test loss |", "|---|---|---|"]
  for theta, label in THETAS.items():
    lines.append(f"| {label} | {pct(finals(runs[f'theta/{theta}']))} | "
                 f"{h.mean_spread(finals(runs[f'theta/{theta}'], 'loss'))} |")
  lines += ["", "## The block norms (paper Table 5: 82.6, 82.5, 82.5 on ImageNet)", "",
            "| learnable in the block norms | test top-1 % | final test loss |", "|---|---|---|"]
  for norm, label in NORMS.items():
    lines.append(f"| {label} | {pct(finals(runs[f'norm/{norm}']))} | "
                 f"{h.mean_spread(finals(runs[f'norm/{norm}'], 'loss'))} |")
  grown_flops = [r["start_flops"] + continued.steps * r["flops_per_step"] for r in runs["grown"]]
  scratch_flops = grown_target.steps * runs["scratch"][0]["flops_per_step"]
  lines += ["", "## Growth against training from scratch, per training FLOP", "",
            f"`digits` ({params(base):,} parameters, {base.steps} steps) grown into `digits_grown` "
            f"({params(grown_target):,}: attention tokens {base.model.tokens('query')} → "
            f"{grown_target.model.tokens('query')}, FFN {base.model.tokens('ffn')} → {grown_target.model.tokens('ffn')},"
            f" zero keys, the norm scale kept) and trained {continued.steps} more steps, against `digits_grown` "
            f"trained from scratch for {grown_target.steps} steps. FLOPs: `config.flops_per_token` × tokens "
            "(the grown run's include its parent's).", "",
            "| run | training FLOPs | test top-1 % |", "|---|---|---|",
            f"| the parents (`digits`) | {base.steps * runs['tokenformer'][0]['flops_per_step']:.3g} | "
            f"{pct(finals(runs['tokenformer']))} |",
            f"| grown, before training (cli.eval of the grown checkpoint) | | "
            f"{pct([r['at_growth'] for r in runs['grown']])} |",
            f"| grown + {continued.steps} steps | {np.mean(grown_flops):.3g} | {pct(finals(runs['grown']))} |",
            f"| from scratch | {scratch_flops:.3g} | {pct(finals(runs['scratch']))} |", "",
            f"The grown runs spent {np.mean(grown_flops) / scratch_flops:.2f}× the scratch runs' training FLOPs (their "
            f"parents' included) and ended {100 * (np.mean(finals(runs['grown'])) - np.mean(finals(runs['scratch']))):+.2f}"
            " points from them. Right after growth they compute their parents' function (the same top-1); their "
            "lowest evaluation in the continued training, where a fresh AdamW warms up to the full peak learning "
            f"rate, was {100 * np.mean([r['top1'].min() for r in runs['grown']]):.2f}% (mean over seeds).",
            "",
            f"TokenFormer − ViT: {100 * (np.mean(finals(runs['tokenformer'])) - np.mean(finals(runs['vit']))):+.2f} "
            "points with the recipe chosen for the TokenFormer (learning rate and schedule not tuned for the ViT).",
            "", "![test top-1 against steps and FLOPs](vision.png)", "",
            "The main job's test top-1 against steps, per seed: ![digits](digits.png)", ""]
  return "\n".join(lines)


def plot(runs, base, out: epath.Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    h.say("matplotlib is not installed: no plots")
    return
  out.mkdir(parents=True, exist_ok=True)

  def band(ax, results, label, color, x=lambda r: r["steps"]):
    for i, r in enumerate(results):
      ax.plot(x(r), 100 * r["top1"], color=color, alpha=0.8, lw=1, label=label if i == 0 else None)

  fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
  band(axes[0], runs["tokenformer"], "TokenFormer (digits)", "C0")
  band(axes[0], runs["vit"], "ViT (digits_vit)", "C1")
  for i, (theta, label) in enumerate(THETAS.items()):
    band(axes[1], runs[f"theta/{theta}"], label, f"C{i}")
  for i, (norm, label) in enumerate(NORMS.items()):
    band(axes[2], runs[f"norm/{norm}"], label, f"C{i}")
  tf_flops = lambda r: r["steps"] * r["flops_per_step"]
  band(axes[3], runs["tokenformer"], "digits (the parents)", "C0", tf_flops)
  band(axes[3], runs["grown"], "grown, continued", "C2", lambda r: r["start_flops"] + r["steps"] * r["flops_per_step"])
  band(axes[3], runs["scratch"], "digits_grown from scratch", "C3", tf_flops)
  titles = ("TokenFormer vs ViT (matched parameters)", "Θ (Table 4)", "block norms (Table 5)",
            "grown vs from scratch")
  for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=10)
    ax.set_ylim(80, 100)
    ax.set_ylabel("test top-1 %")
    ax.set_xlabel("training FLOPs" if ax is axes[3] else "step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(out / f"{NAME}.png", dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(runs["tokenformer"]):
    ax.plot(r["steps"], 100 * r["top1"], marker="o", ms=3, label=f"seed {i}: {100 * r['top1'][-1]:.1f}%")
  ax.axhline(97, color="grey", ls="--", lw=0.8)
  ax.set_ylim(50, 100)
  ax.set_xlabel("step")
  ax.set_ylabel("test top-1 %")
  ax.set_title(f"cli.train --config=experiments/vision.py:digits ({base.steps} steps)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(out / "digits.png", dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  args = h.parse_args(__doc__.splitlines()[0], NAME, argv)
  out = args.out if args.out != str(h.RESULTS) else str(h.RESULTS / NAME)
  run(args.workdir if args.workdir != "runs/growth" else "runs/vision", out, smoke=args.smoke, seeds=args.seeds)


if __name__ == "__main__":
  main()
