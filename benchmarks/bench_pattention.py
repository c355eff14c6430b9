"""Pattention fwd+bwd vs an MLP of the same shapes, on this machine's default JAX device.

    python benchmarks/bench_pattention.py [--repeats 15] [--d 128 256 512 768 1024] [--n_ratio 4 0.75]
                                          [--batch 4 --length 256] [--breakdown_d 768]

Both compute O = Θ(x·K_Pᵀ)·V_P with the same einsums and dtypes; Θ is l2_norm_gelu for Pattention and a plain
exact GeLU for the MLP, so the ratio is the price of the L2 normalisation. Each variant is jit(value_and_grad)
of ⟨O, G⟩ for a fixed random G (a real cotangent, so XLA cannot simplify the backward) w.r.t. x, K_P and V_P.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from timing import interleaved, min_ratio, paired_ratio
from tokenformer_jax.model.pattention import normalize_scores, pattention


def mlp(x, keys, values):
  """pattention's einsums and dtypes, with a plain exact GeLU in place of Θ."""
  hidden = jnp.einsum("...i,ni->...n", x, keys.astype(x.dtype), preferred_element_type=jnp.float32)
  hidden = jax.nn.gelu(hidden, approximate=False)
  return jnp.einsum("...n,no->...o", hidden.astype(x.dtype), values.astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


LAYERS = {"pattention": pattention, "mlp": mlp}   # pattention: l2_norm_gelu, n_scale = n
THETAS = {   # breakdown only: Θ by itself on a [tokens, n] score matrix
    "gelu alone": lambda s: jax.nn.gelu(s, approximate=False),
    "l2norm+gelu alone": lambda s: normalize_scores(s, n_scale=s.shape[-1]),
}


def fwd_bwd(f, argnums):
  """jit(value_and_grad(⟨f(*args), G⟩)) with G the last argument."""
  loss = lambda *args: jnp.vdot(f(*args[:-1]), args[-1])
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def layer_inputs(tokens, d, n, seed=0):
  """x [tokens, d], K_P and V_P [n, d] at the fan-in init scale, and the cotangent G [tokens, d]."""
  kx, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (tokens, d)), jax.random.normal(kk, (n, d)) / d ** 0.5,
          jax.random.normal(kv, (n, d)) / n ** 0.5, jax.random.normal(kg, (tokens, d)))


def time_layers(tokens, d, n, repeats, with_thetas=False):
  args = layer_inputs(tokens, d, n)
  fns = {name: functools.partial(fwd_bwd(f, (0, 1, 2)), *args) for name, f in LAYERS.items()}
  if with_thetas:
    scores = args[0] @ args[1].T
    fns |= {name: functools.partial(fwd_bwd(f, 0), scores, scores) for name, f in THETAS.items()}
  return interleaved(fns, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--d", type=int, nargs="+", default=[128, 256, 512, 768, 1024])
  parser.add_argument("--n_ratio", type=float, nargs="+", default=[4.0, 0.75],
                      help="n = ratio·d: 4 is FFN-shaped, 0.75 attention-shaped (576 at d=768, as ladder_124m)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--breakdown_d", type=int, default=768, help="d of the where-the-time-goes table (0: skip)")
  args = parser.parse_args()
  tokens = args.batch * args.length
  print(f"device: {jax.devices()[0].device_kind}  tokens = batch {args.batch} × length {args.length} = {tokens}"
        f"  float32  repeats {args.repeats}  (ms: median; ratio: median of per-repeat ratios [p25, p75]; min ratio: of the fastest samples)")

  print(f"\n{'d':>5} {'n':>5} {'tokens':>6} {'pattention ms':>14} {'mlp ms':>9} {'ratio':>6}  [p25, p75]  {'min ratio':>9}")
  for ratio in args.n_ratio:
    for d in args.d:
      n = int(round(ratio * d))
      t = time_layers(tokens, d, n, args.repeats)
      r, lo, hi = paired_ratio(t, "pattention", "mlp")
      print(f"{d:>5} {n:>5} {tokens:>6} {np.median(t['pattention']):>14.2f} {np.median(t['mlp']):>9.2f} "
            f"{r:>6.3f}  [{lo:.3f}, {hi:.3f}]  {min_ratio(t, 'pattention', 'mlp'):>9.3f}", flush=True)

  if not args.breakdown_d:
    return
  d = args.breakdown_d
  ns = [int(round(ratio * d)) for ratio in args.n_ratio]
  times = {n: time_layers(tokens, d, n, args.repeats, with_thetas=True) for n in ns}
  med = {n: {name: float(np.median(t)) for name, t in times[n].items()} for n in ns}
  print(f"\nWhere the time goes at d={d}, {tokens} tokens (fwd+bwd ms, median)")
  print(f"{'':<48}" + "".join(f"{f'n={n}':>10}" for n in ns))
  rows = {"MLP, Θ = GeLU": "mlp", "Pattention, Θ = GeLU(L2 norm)": "pattention",
          "Θ alone on [tokens, n] scores: GeLU": "gelu alone",
          "Θ alone on [tokens, n] scores: GeLU(L2 norm)": "l2norm+gelu alone"}
  for label, name in rows.items():
    print(f"{label:<48}" + "".join(f"{med[n][name]:>10.2f}" for n in ns))
  # Shares of the Pattention time. The rest is the six matmuls (two forward; dx, dK, dW, dV backward) and
  # the loss's dot. The in-layer share uses the paired ratio r: (r − 1) / r.
  shares = {
      "GeLU (alone)": lambda n: med[n]["gelu alone"] / med[n]["pattention"],
      "L2 norm (alone: difference of the Θ rows)":
          lambda n: (med[n]["l2norm+gelu alone"] - med[n]["gelu alone"]) / med[n]["pattention"],
      "L2 norm (in the layer: Pattention vs MLP)":
          lambda n: 1 - 1 / paired_ratio(times[n], "pattention", "mlp")[0],
  }
  print("share of the Pattention time:")
  for label, share in shares.items():
    print(f"  {label:<46}" + "".join(f"{100 * share(n):>9.1f}%" for n in ns))

if __name__ == "__main__":
  main()
