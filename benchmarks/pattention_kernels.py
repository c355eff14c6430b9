"""plain vs lean vs pallas Pattention on whatever accelerator this machine has: one Pattention's fwd+bwd at the
ladder's shapes, then one full train step of a ladder model, in one short run (a few minutes on a TPU or GPU).

    python benchmarks/pattention_kernels.py                              # TPU / GPU: the defaults below
    python benchmarks/pattention_kernels.py --tokens 16384 --n 576 2304 8640 34496 \
        --train_step experiments/ladder.py:paper_124m --batch 8 --seq_len 1024
    JAX_PLATFORMS=cpu python benchmarks/pattention_kernels.py --tokens 256 --d 128 --n 300 \
        --train_step experiments/ladder.py:tiny_0 --batch 2 --seq_len 64 --repeats 2   # a smoke run

Pattention: x [tokens, d] in bf16 (the ladder's compute dtype), K_P, V_P [n, d] float32 (cast inside each kernel),
Θ = l2_norm_gelu with the tanh GeLU (the ladder's recipe), jit(value_and_grad(⟨O, G⟩)) w.r.t. x, K_P and V_P
(bench_pattention.fwd_bwd). The n are the ladder's stored counts (124M: 576 / 2304, 1.4B: 8640 / 34496). Times are
interleaved medians (timing.py); TFLOP/s counts the model's 6 matmuls of tokens·n·d (the kernels' recomputations
are their own cost). The train step is the trainer's own (bench_train_step.runner: fwd + bwd + AdamW) of one ladder
stage's model with each kernel, at --batch × --seq_len tokens on one device.

The pallas kernel is compiled by Mosaic on a TPU only; on a GPU or CPU it runs in Pallas interpret mode (a check of
its numerics, not of its speed), and the table says so.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench_pattention import fwd_bwd, layer_inputs
from timing import interleaved, paired_ratio
from tokenformer_jax.config import load_config
from tokenformer_jax.model.pattention import pattention
from tokenformer_jax.model.pattention_lean import lean_pattention
from tokenformer_jax.model.pattention_pallas import pallas_pattention

KERNELS = {"plain": pattention, "lean": lean_pattention, "pallas": pallas_pattention}


def pattention_table(args, mode: str) -> None:
  print(f"\none Pattention fwd+bwd: d = {args.d}, {args.tokens} tokens, bf16, Θ = {args.normalization} (tanh GeLU), "
        f"pallas: {mode}; repeats {args.repeats}")
  print("|      n | " + " | ".join(f"{k} ms (TFLOP/s)" for k in args.kernels) + " | "
        + " | ".join(f"{k} / plain" for k in args.kernels if k != "plain") + " |")
  print("|---:|" + "---:|" * (2 * len(args.kernels) - ("plain" in args.kernels)))
  for n in args.n:
    x, keys, values, cotangent = layer_inputs(args.tokens, args.d, n)
    inputs = (x.astype(jnp.bfloat16), keys, values, cotangent.astype(jnp.bfloat16))
    steps = {name: fwd_bwd(functools.partial(KERNELS[name], normalization=args.normalization, approximate_gelu=True),
                           (0, 1, 2)) for name in args.kernels}
    times = interleaved({name: functools.partial(step, *inputs) for name, step in steps.items()}, args.repeats)
    model_flops = 6 * 2 * args.tokens * n * args.d
    cells = [f"{np.median(t):.2f} ({model_flops / np.median(t) / 1e9:.3g})" for t in times.values()]
    ratios = [f"{paired_ratio(times, name, 'plain')[0]:.3f}" for name in args.kernels
              if name != "plain" and "plain" in times]
    print(f"| {n:>6} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


def train_step_table(args, mode: str) -> None:
  from bench_train_step import runner
  model = load_config(args.train_step).model
  print(f"\none train step of {args.train_step}'s model ({model.n_layers} layers, d = {model.d_model}, {model.dtype}, "
        f"remat {model.remat}): {args.batch} × {args.seq_len} tokens on one device, pallas: {mode}")
  steps = {name: runner(model.replace(pattention_kernel=name), args.batch, args.seq_len) for name in args.kernels}
  times = interleaved(steps, args.repeats)
  print("| kernel | step ms | tokens/s | ÷ plain |\n|---|---:|---:|---:|")
  for name, t in times.items():
    ratio = f"{paired_ratio(times, name, 'plain')[0]:.3f}" if "plain" in times else "?"
    print(f"| {name} | {np.median(t):.1f} | {args.batch * args.seq_len / np.median(t) * 1e3:,.0f} | {ratio} |",
          flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--d", type=int, default=768)
  parser.add_argument("--n", type=int, nargs="+", default=[576, 2304, 8640, 34496])
  parser.add_argument("--normalization", default="l2_norm_gelu", choices=["l2_norm_gelu", "gelu_l2_norm"])
  parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
  parser.add_argument("--train_step", default="experiments/ladder.py:paper_124m",
                      help="a TrainConfig (FILE.py:NAME) whose model's train step to time, or 'none'")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  platform = jax.devices()[0].platform
  mode = "Mosaic" if platform == "tpu" else "interpret mode (no TPU: numerics, not speed)"
  print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
  pattention_table(args, mode)
  if args.train_step != "none":
    train_step_table(args, mode)


if __name__ == "__main__":
  main()
