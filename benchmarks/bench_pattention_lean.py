"""Lean (blocked custom_vjp) vs plain Pattention: fwd+bwd time and XLA's temporary memory as n grows.

    python benchmarks/bench_pattention_lean.py [--d 768] [--n 576 2304 8640 34496] [--tokens 1024]
                                               [--block 2048] [--normalization l2_norm_gelu] [--repeats 5]

Each variant is jit(value_and_grad(⟨O, G⟩)) w.r.t. x, K_P and V_P for a fixed random cotangent G (as in
bench_pattention.py), float32. Memory is the compiled function's `temp_size_in_bytes` (XLA's memory analysis:
buffers live inside the call, not its arguments or outputs); the plain version's includes the [tokens, n]
scores and Θ kept for the backward pass, the lean version's one [tokens, block] tile at a time.
"""
from __future__ import annotations

import argparse
import functools

import jax
import numpy as np

from bench_pattention import fwd_bwd, layer_inputs
from timing import interleaved, paired_ratio
from tokenformer_jax.model.pattention import pattention
from tokenformer_jax.model.pattention_lean import lean_pattention

MiB = 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--d", type=int, default=768)
  parser.add_argument("--n", type=int, nargs="+", default=[576, 2304, 8640, 34496],
                      help="the ladder's FFN and attention counts as stored (rounded up to a multiple of 64)")
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--block", type=int, default=2048)
  parser.add_argument("--normalization", default="l2_norm_gelu")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  kernels = {"plain": functools.partial(pattention, normalization=args.normalization),
             "lean": functools.partial(lean_pattention, normalization=args.normalization, block=args.block)}
  print(f"device: {jax.devices()[0].device_kind}  d = {args.d}  tokens = {args.tokens}  Θ = {args.normalization}  "
        f"block {args.block}  float32  repeats {args.repeats}  (ms: median; ratio: median of per-repeat ratios)")
  print(f"\n{'n':>6} {'plain ms':>9} {'lean ms':>9} {'lean/plain':>10}  [p25, p75]  {'plain temp MiB':>14} "
        f"{'lean temp MiB':>13}  {'scores MiB':>10}")
  for n in args.n:
    inputs = layer_inputs(args.tokens, args.d, n)
    steps = {name: fwd_bwd(f, (0, 1, 2)) for name, f in kernels.items()}
    temp = {name: step.lower(*inputs).compile().memory_analysis().temp_size_in_bytes / MiB
            for name, step in steps.items()}
    times = interleaved({name: functools.partial(step, *inputs) for name, step in steps.items()}, args.repeats)
    ratio, low, high = paired_ratio(times, "lean", "plain")
    print(f"{n:>6} {np.median(times['plain']):>9.1f} {np.median(times['lean']):>9.1f} {ratio:>10.3f}  "
          f"[{low:.3f}, {high:.3f}]  {temp['plain']:>14.1f} {temp['lean']:>13.1f}  "
          f"{args.tokens * n * 4 / MiB:>10.1f}", flush=True)


if __name__ == "__main__":
  main()
