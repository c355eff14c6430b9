"""Token-token cost (paper Fig. 5 / Table 3): training FLOPs per token against sequence length, analytic.

  python -m experiments.token_cost                  # instant; docs/results/token_cost.*
  python -m experiments.token_cost --smoke

For the paper's ladder TokenFormers (d = 768, 12 layers; 124M → 1.4B by parameter tokens) and Transformers
of the same depth and the same non-embedding parameters (12·L·d² = 2·L·d·Σn, so d grows with the model),
`config.flops_per_token`: 6 FLOPs per matmul parameter per token plus 12·L·d·T for token-token attention.
A TokenFormer scales its parameters with d fixed, so its token-token term stays that of the 124M model.
"""
from __future__ import annotations

import math
import sys

from etils import epath

from experiments import _harness as h
from tokenformer_jax import report
from tokenformer_jax.config import count_params, flops_per_token, load_config

NAME = "token_cost"
HEAD_DIM = 64


def matching_transformer(tokenformer):
  """Same layers, vocabulary and non-embedding parameters (to a head's width): d = sqrt(N / 12L)."""
  n = count_params(tokenformer, storage=False)["non_embedding"]
  d = max(HEAD_DIM, round(math.sqrt(n / (12 * tokenformer.n_layers)) / HEAD_DIM) * HEAD_DIM)
  return tokenformer.replace(name=tokenformer.name.replace("ladder", "transformer"), architecture="transformer",
                             param_tokens=None, d_model=d, n_heads=d // HEAD_DIM, max_seq_len=1 << 20)


def token_token_flops(model, seq_len: int) -> int:
  """The attention part of flops_per_token on its own (forward + backward, per token)."""
  return 3 * model.n_layers * 2 * 2 * seq_len * model.d_model


def run(workdir: str, out: str, smoke: bool = False, seeds: int | None = None) -> dict:
  ladder = load_config(f"{h.REPO / 'experiments' / 'paper.py'}:LADDER")
  if smoke:
    ladder = ladder[:2]
  pairs = [(m, matching_transformer(m)) for m in ladder]
  lengths = [2 ** k for k in range(9, 11 if smoke else 18)]   # 512 … 131072
  flops = {(m.name, t): flops_per_token(m, t) for pair in pairs for m in pair for t in lengths}
  plot(pairs, lengths, flops, epath.Path(out) / f"{NAME}.png")
  rows = ["| TokenFormer (d, tokens a/f) | Transformer of equal non-emb. params (d) | non-emb. params "
          "TokenFormer / Transformer | " + " | ".join(f"T = {t:,}" for t in lengths[::2]) + " |",
          "|---|---|---|" + "---|" * len(lengths[::2])]
  ratios = {}
  for tf, tr in pairs:
    cells = []
    for t in lengths[::2]:
      ratio = flops[(tr.name, t)] / flops[(tf.name, t)]
      ratios[(tf.name, t)] = ratio
      cells.append(f"{ratio:.2f} ({token_token_flops(tr, t) / flops[(tr.name, t)]:.0%}, "
                   f"{token_token_flops(tf, t) / flops[(tf.name, t)]:.0%})")
    rows.append(f"| {tf.name} ({tf.d_model}, {tf.param_tokens.query}/{tf.param_tokens.ffn}) | {tr.name} ({tr.d_model}) "
                f"| {report.human(h.non_embedding(tf))} / {report.human(h.non_embedding(tr))} | "
                + " | ".join(cells) + " |")
  markdown = (f"# Token-token cost: FLOPs against sequence length\n\n"
              "Each cell: the Transformer's training FLOPs per token ÷ the TokenFormer's at that sequence length, "
              "and in brackets the share of token-token attention in each (Transformer, TokenFormer).\n\n"
              "Command: `python -m experiments.token_cost` (analytic: `tokenformer_jax.config.flops_per_token`, "
              "training FLOPs per token = 3 × forward; vocabulary 50,304 in storage; Transformers with 64-wide "
              "heads).\n\n"
              f"![FLOPs per token against sequence length]({NAME}.png)\n\n" + "\n".join(rows) + "\n")
  h.write_results(out, NAME, markdown)
  return {"markdown": markdown, "flops": flops, "ratios": ratios, "pairs": pairs, "lengths": lengths}


def plot(pairs, lengths, flops, path) -> None:
  fig, ax = report.new_figure(figsize=(8, 5.5))
  colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
  for i, (tf, tr) in enumerate(pairs):
    total = count_params(tf, storage=False)["total"]
    size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.0f}M"
    ax.plot(lengths, [flops[(tr.name, t)] for t in lengths], color=colors[i % 4], linestyle="--", marker="s",
            markersize=3, label=f"Transformer ≈{size} (d={tr.d_model})")
    ax.plot(lengths, [flops[(tf.name, t)] for t in lengths], color=colors[i % 4], marker="o", markersize=3,
            label=f"TokenFormer {size} (d={tf.d_model})")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length T (tokens)")
  ax.set_ylabel("training FLOPs per token")
  ax.set_title("Fig. 5 analog: equal parameters, growing T (analytic, config.flops_per_token)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7.5)
  report.save_figure(fig, path)
  h.say(f"wrote {path}")


def main(argv=None) -> None:
  args = h.parse_args(__doc__.splitlines()[0], NAME, argv)
  run(args.workdir, args.out, smoke=args.smoke)


if __name__ == "__main__":
  main(sys.argv[1:])
