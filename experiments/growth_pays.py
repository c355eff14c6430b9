"""Does growth pay? Progressive scaling in miniature (paper §4.1, Fig. 3/4, Tables 6-7), on this CPU.

  python -m experiments.growth_pays                 # minutes on a 2-core CPU; docs/results/growth_pays.*
  python -m experiments.growth_pays --smoke         # seconds: every code path on toy sizes

The paper's ladder shape: same width and depth, only the parameter tokens grow (×1 → ×4 → ×9 here, chosen so
that every TokenFormer has exactly the non-embedding parameters of a dense Transformer of width 32, 64, 96;
the paper's ladder is ×1 → ×3.7 → ×8.4 → ×15). Stage 0 trains from scratch on the full budget B; each next
stage grows the previous one (new tokens "zero_keys" or "random") and trains on B/4. Baselines: TokenFormers of
each size and dense Transformers of matching size, from scratch, on B and on B/4. The x axis charges a grown
model with every stage before it; the "compute ratio" is the cumulative FLOPs a grown model needs to reach its
scratch twin's final validation loss, over the twin's FLOPs (< 1: growth paid).
"""
from __future__ import annotations

import sys

from etils import epath

from experiments import _harness as h
from tokenformer_jax import report

NAME = "growth_pays"
INITS = ("zero_keys", "random")


def setup(smoke: bool) -> dict:
  """The one configuration every growth experiment shares (so they share runs)."""
  if smoke:
    # (attention tokens, FFN tokens, the Transformer width with the same non-embedding parameters)
    sizes = [(12, 48, 16), (48, 192, 32)]
    return dict(d=16, layers=1, heads=1, sizes=sizes, budget=4, fraction=1, seq_len=32, batch=8, lr=5e-3,
                warmup=1, evals=2, eval_batches=1)
  # d=32: 12·L·d² = 2·L·d·(4a + f) with f = 4a gives a = d·3/4 = 24 → ×4: a = 96 (d 64), ×9: a = 216 (d 96)
  sizes = [(24, 96, 32), (96, 384, 64), (216, 864, 96)]
  return dict(d=32, layers=2, heads=2, sizes=sizes, budget=240, fraction=4, seq_len=64, batch=16, lr=3e-3,
              warmup=20, evals=8, eval_batches=4)


STYLES = ("ladder", "neox")


def neox(model):
  """The authors' PyTorch init (embedding N(0, 0.02²), keys N(0, 0.02²)) with plain logits, for a TokenFormer."""
  return model.replace(init="neox", logits_divide_by_sqrt_d=False)


def models(s: dict, style: str = "ladder"):
  tf = [h.tokenformer(f"tokenformer_x{i}", s["d"], s["layers"], s["heads"], a, f)
        for i, (a, f, _) in enumerate(s["sizes"])]
  if style == "neox":
    tf = [neox(m) for m in tf]
  dense = [h.transformer(f"transformer_d{d}", d, s["layers"], s["heads"] * d // s["d"]) for _, _, d in s["sizes"]]
  return tf, dense


def config(s: dict, model, steps: int, seed: int = 0, **changes):
  return h.train_config(model, steps, seq_len=s["seq_len"], batch=s["batch"], lr=s["lr"], warmup=s["warmup"],
                        evals=s["evals"], eval_batches=s["eval_batches"], seed=seed, **changes)


def run(workdir: str, out: str, smoke: bool = False, seeds: int | None = None, style: str = "ladder") -> dict:
  """style="neox": every TokenFormer with the NeoX init and plain logits instead of the ladder's (results in
  growth_pays_neox.*); the Transformers are the same runs."""
  h.quiet()
  s = setup(smoke)
  name = NAME if style == "ladder" else f"{NAME}_{style}"
  budget, reduced = s["budget"], s["budget"] // s["fraction"]
  tf_models, dense_models = models(s, style)
  scale = [h.non_embedding(m) / h.non_embedding(tf_models[0]) for m in tf_models]
  curves: dict[str, report.Curve] = {}

  # Stage 0 from scratch (the full budget), then each grown stage on the reduced budget, for both inits.
  first = config(s, tf_models[0], budget)
  curves["scratch_0_full"] = h.train_run(first, workdir, name="TokenFormer ×1, scratch, B")
  for init in INITS[:1] if smoke else INITS:   # (smoke: "random" differs only in grow(), tested elsewhere)
    parent_cfg, parent = first, curves["scratch_0_full"]
    for i in range(1, len(tf_models)):
      train_cfg, grown_dir = h.grow_run(parent, parent_cfg, config(s, tf_models[i], reduced), workdir, init=init,
                                        seed=0)
      curve = h.train_run(train_cfg, workdir, init_from=grown_dir,
                          name=f"TokenFormer ×{scale[i]:.0f}, grown ({init}), B/{s['fraction']}").after(parent)
      curves[f"grown_{init}_{i}"] = curve
      parent_cfg, parent = train_cfg, curve

  # Baselines from scratch: every TokenFormer size and every matching Transformer on B, the grown sizes
  # also on B/fraction (the budget each grown stage had).
  for i in range(len(tf_models)):
    for label, steps in (("full", budget), ("reduced", reduced)):
      if i == 0 and label == "reduced":
        continue
      tag = "B" if label == "full" else f"B/{s['fraction']}"
      if not (i == 0 and label == "full"):
        curves[f"scratch_{i}_{label}"] = h.train_run(config(s, tf_models[i], steps), workdir,
                                                     name=f"TokenFormer ×{scale[i]:.0f}, scratch, {tag}")
      if smoke and i > 0:   # (smoke: the width-16 Transformer, which continued_training needs, is enough)
        continue
      curves[f"dense_{i}_{label}"] = h.train_run(config(s, dense_models[i], steps), workdir,
                                                 name=f"Transformer d={dense_models[i].d_model}, scratch, {tag}")

  # Why the Transformers lead here: the ladder style's N(0, 1) embedding moves ~lr per step under AdamW, i.e.
  # barely within B steps, where the Transformer's N(0, 0.02) one does not lag. The ×1 TokenFormer again with
  # the PyTorch (NeoX) init and plain logits, the only change.
  if not smoke and style == "ladder":
    probe = neox(tf_models[0])
    curves["probe_neox"] = h.train_run(config(s, probe, budget), workdir,
                                       name="TokenFormer ×1, NeoX init, plain logits, scratch, B")
  summary = summarize(curves, tf_models, dense_models, scale, s, name, style)
  plot(curves, len(tf_models), scale, s, epath.Path(out) / f"{name}.png", style)
  h.write_results(out, name, summary["markdown"])
  return summary


def reach(curve: report.Curve, target: report.Curve) -> tuple[float | None, float | None]:
  """(cumulative FLOPs, this stage's own FLOPs) at which `curve` first reaches `target`'s final loss."""
  flops = curve.flops_to_reach(target.final_eval_loss)
  return (flops, None if flops is None else flops - curve.start_flops)


def summarize(curves, tf_models, dense_models, scale, s, name: str = NAME, style: str = "ladder") -> dict:
  fraction = s["fraction"]
  rows = ["| size | TokenFormer non-emb. params (tokens a/f) | Transformer d (non-emb. params) | grown zero_keys | "
          f"grown random | TokenFormer scratch B | TokenFormer scratch B/{fraction} | Transformer scratch B | "
          f"Transformer scratch B/{fraction} |", "|---|---|---|---|---|---|---|---|---|"]
  for i, model in enumerate(tf_models):
    def loss(key):
      return f"{curves[key].final_eval_loss:.3f}" if key in curves else "—"
    rows.append(f"| ×{scale[i]:.0f} | {report.human(h.non_embedding(model))} ({model.param_tokens.query}/"
                f"{model.param_tokens.ffn}) | {dense_models[i].d_model} "
                f"({report.human(h.non_embedding(dense_models[i]))}) | "
                f"{loss(f'grown_zero_keys_{i}') if i else '(stage 0)'} | "
                f"{loss(f'grown_random_{i}') if i else '(stage 0)'} | "
                f"{loss(f'scratch_{i}_full')} | {loss(f'scratch_{i}_reduced')} | {loss(f'dense_{i}_full')} | "
                f"{loss(f'dense_{i}_reduced')} |")
  if "probe_neox" in curves:
    rows.append(f"| ×1, NeoX init (embedding std 0.02), logits not ÷ sqrt(d) | "
                f"{report.human(h.non_embedding(tf_models[0]))} | — | — | — | "
                f"{curves['probe_neox'].final_eval_loss:.3f} | — | — | — |")
  ratios = ["| grown model | its final loss | twin (scratch, B) | twin's loss | twin's FLOPs | cumulative FLOPs to "
            "reach the twin's loss | ratio (cumulative) | ratio (this stage only) |",
            "|---|---|---|---|---|---|---|---|"]
  results = {}
  for init in INITS:
    for i in range(1, len(tf_models)):
      if f"grown_{init}_{i}" not in curves:
        continue
      grown = curves[f"grown_{init}_{i}"]
      for twin_key in (k for k in (f"scratch_{i}_full", f"dense_{i}_full") if k in curves):
        twin = curves[twin_key]
        cumulative, own = reach(grown, twin)
        ratio = None if cumulative is None else cumulative / twin.end_flops
        ratio_own = None if own is None else own / twin.end_flops
        results[(init, i, twin_key)] = ratio
        ratios.append(
            f"| {grown.name} | {grown.final_eval_loss:.3f} | {twin.name} | {twin.final_eval_loss:.3f} | "
            f"{report.human(twin.end_flops)} | {report.human(cumulative) if cumulative else 'not reached'} | "
            f"{f'{ratio:.2f}' if ratio is not None else '—'} | "
            f"{f'{ratio_own:.2f}' if ratio_own is not None else '—'} |")
  setup_line = (f"d={s['d']}, {s['layers']} layers, seq {s['seq_len']}, batch {s['batch']}, peak lr {s['lr']}, "
                f"cosine to 0.1×; budget B = {s['budget']} steps "
                f"({report.human(s['budget'] * s['batch'] * s['seq_len'])} "
                f"tokens), grown stages and the reduced baselines B/{fraction} = {s['budget'] // fraction} steps; "
                "shipped Python-docs corpus, 10% of documents held out for validation; seed 0")
  command = "python -m experiments.growth_pays" + ("" if style == "ladder" else f" --style={style}")
  styled = ("TokenFormers in the ladder style (App. D: embedding N(0, 1), logits ÷ sqrt(d), fan-in init)"
            if style == "ladder" else "TokenFormers with the NeoX init (embedding and keys N(0, 0.02²)) and plain "
            "logits; the Transformers are the same runs as in [growth_pays](growth_pays.md)")
  markdown = (f"# Does growth pay? Progressive scaling in miniature\n\n"
              f"Command: `{command}` (setup: {setup_line}; {styled}).\n\n"
              f"![validation loss against cumulative FLOPs]({name}.png)\n\n"
              f"## Final validation loss (nats/token)\n\n" + "\n".join(rows) + "\n\n"
              f"## Compute to reach the scratch twin's loss\n\n"
              "Cumulative FLOPs include every earlier stage (stage 0's full budget too); \"this stage only\" counts "
              "the grown stage's own training, as the paper's Fig. 4 does.\n\n" + "\n".join(ratios) + "\n\n"
              f"## Every run\n\n{report.table(list(curves.values()))}")
  return {"markdown": markdown, "ratios": results, "curves": curves}


def plot(curves, n_sizes: int, scale, s, path, style: str = "ladder") -> None:
  colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
  fig, axes = report.new_figure(2, figsize=(14, 5.6))

  def draw(ax, curve, color, linestyle, marker, own=False):
    x = curve.flops(curve.eval_steps) - (curve.start_flops if own else 0.0)
    ax.plot(x, curve.eval_loss, color=color, linestyle=linestyle, marker=marker, markersize=3.5, label=curve.name)

  for i in range(n_sizes):
    c = colors[i % len(colors)]
    for ax in axes:
      draw(ax, curves[f"scratch_{i}_full"], c, "--" if i else "-", "s")
      if f"dense_{i}_full" in curves:
        draw(ax, curves[f"dense_{i}_full"], c, ":", "^")
    if i == 0 and "probe_neox" in curves:
      draw(axes[0], curves["probe_neox"], "tab:purple", "-", "D")
    if i:
      for ax, own in ((axes[0], False), (axes[1], True)):
        draw(ax, curves[f"grown_zero_keys_{i}"], c, "-", "o", own)
        if f"grown_random_{i}" in curves:
          draw(ax, curves[f"grown_random_{i}"], c, "-.", "x", own)
      draw(axes[1], curves[f"scratch_{i}_reduced"], c, (0, (1, 3)), "v")
      if f"dense_{i}_reduced" in curves:
        draw(axes[1], curves[f"dense_{i}_reduced"], c, (0, (3, 5)), "<")
  values = [v for c in curves.values() for v in c.eval_loss[c.eval_steps > 0]]
  low, high = min(values), sorted(values)[int(0.85 * (len(values) - 1))]
  for ax, label, title in (
      (axes[0], "cumulative training FLOPs (a grown model is charged with every stage before it)",
       "Fig. 3 analog: cumulative cost"),
      (axes[1], "training FLOPs of the run itself (a grown stage: its own stage only)",
       f"Fig. 4 analog: per-stage cost, with the B/{s['fraction']} baselines")):
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(low - 0.05 * (high - low), high)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper right", ncol=1)
  chain = "→".join(f"×{x:.0f}" for x in scale)
  fig.suptitle(f"Progressive scaling in miniature: TokenFormer grown {chain} vs scratch TokenFormers and "
               f"Transformers of matching size (shipped corpus, CPU; TokenFormer init: {style})", fontsize=11)
  report.save_figure(fig, path)
  h.say(f"wrote {path}")


def main(argv=None) -> None:
  args = h.parse_args(__doc__.splitlines()[0], NAME, argv, styles=STYLES)
  run(args.workdir, args.out, smoke=args.smoke, seeds=args.seeds, style=args.style)


if __name__ == "__main__":
  main(sys.argv[1:])
