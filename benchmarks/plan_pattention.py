"""One Pattention fwd+bwd compiled for one TPU v4 chip: the TPU compiler's FLOPs, bytes, cost-model time and
temporary memory per kernel (plain, lean, pallas). Nothing runs; it needs libtpu (`pip install -e '.[plan]'`).

    python benchmarks/plan_pattention.py [--tokens 32768] [--n 576 2304 8620 34480] [--kernels plain lean pallas]
                                         [--gelu erf tanh]

x [tokens, 768] in bfloat16 (the ladder's compute dtype), K_P and V_P [n, 768] float32 (cast in the kernel), the
loss ⟨O, O⟩ differentiated with respect to all three. 32,768 tokens are one chip's share of the ladder's
512 × 1024-token step on a v4-32. MFU = model FLOPs (6 · 2 · tokens · n · d: two matmuls, forward and backward)
÷ (275 TFLOP/s × cost-model seconds). The lean kernel's block loops are unrolled so that XLA counts every block:
that compile is slow (minutes) and large (≈ 10 GiB of host memory at n = 34,480).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile for a TPU that is not here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from tokenformer_jax import plan  # noqa: E402
from tokenformer_jax.model.pattention import pattention  # noqa: E402
from tokenformer_jax.model.pattention_lean import lean_pattention  # noqa: E402
from tokenformer_jax.model.pattention_pallas import pallas_pattention  # noqa: E402

# pallas: the Mosaic kernels with the model's default blocks (2048 parameter tokens, 512 tokens, fitted to VMEM); the
# cost model's time for them is the kernels' own estimate (their cost_estimate), not the compiler's.
KERNELS = {"plain": pattention, "lean": functools.partial(lean_pattention, unroll=True),
           "pallas": functools.partial(pallas_pattention, block=2048, token_block=512)}


def compile_one(kernel, tokens: int, n: int, d: int, device, approximate_gelu: bool):
  placed = SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16, sharding=placed)
  k = v = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=placed)
  loss = lambda x, k, v: jnp.sum(jnp.square(kernel(x, k, v, approximate_gelu=approximate_gelu).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, k, v).compile()


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=32768)
  parser.add_argument("--d", type=int, default=768)
  parser.add_argument("--n", type=int, nargs="+", default=[576, 2304, 8620, 34480],
                      help="the ladder's attention and FFN token counts (124M: 576, 2304; 1.4B: 8620, 34480)")
  parser.add_argument("--kernels", nargs="+", default=["plain", "lean"], choices=sorted(KERNELS))
  parser.add_argument("--gelu", nargs="+", default=["erf"], choices=["erf", "tanh"],
                      help="the exact GeLU (erf) and/or its tanh approximation")
  args = parser.parse_args()
  reason = plan.libtpu_missing()
  if reason:
    parser.exit(1, f"error: {reason}\n")
  device = plan.topology_devices(plan.parse_topology("v4-8"))[0]
  print(f"TPU v4, one chip; d = {args.d}, {args.tokens} tokens, bf16 compute")
  print("| n | kernel, GeLU | compiler FLOPs ÷ model | bytes accessed | cost-model ms | MFU | temp MiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for n in args.n:
    model = 6 * 2 * args.tokens * n * args.d
    for name, gelu in ((name, gelu) for name in args.kernels for gelu in args.gelu):
      start = time.perf_counter()
      compiled = compile_one(KERNELS[name], args.tokens, n, args.d, device, gelu == "tanh")
      cost, seconds = compiled.cost_analysis(), plan._corrected_seconds(compiled)
      mfu = "?" if not seconds else f"{model / (plan.PEAK_FLOPS_PER_CHIP * seconds):.1%}"
      print(f"| {n} | {name}, {gelu} | {cost['flops'] / model:.3f} | {cost.get('bytes accessed', 0):.3g} | "
            f"{'?' if not seconds else f'{seconds * 1e3:.2f}'} | {mfu} | "
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:,.0f} | {time.perf_counter() - start:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
