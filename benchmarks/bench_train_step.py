"""One AdamW train step of ladder_124m (TokenFormer) vs transformer_124m (GPT-2-shaped), side by side.

    python benchmarks/bench_train_step.py [--batch 2 --seq_len 256] [--repeats 9] [--vocab_sizes 50277 8192]

Both are 12 layers, d=768, 12 heads, float32, with (near-)equal non-embedding parameters and FLOPs per token
(printed). The Transformer is run with positions="none", as the ladder model, so the only difference is
Pattention (576 tokens for q/k/v/o, 2304 for the FFN) vs Dense+bias (d×d, and a 4d GeLU MLP), and
parametric vs non-parametric block LayerNorms. At CPU-sized batches the tied 50,304-way logits are ~half the
FLOPs, so the comparison is repeated with a small vocabulary, where the blocks dominate.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from timing import interleaved, min_ratio, paired_ratio
from tokenformer_jax.config import (DataConfig, MeshConfig, OptimConfig, TrainConfig, count_params, flops_per_token,
                                    load_config)
from tokenformer_jax.train.setup import build_run

# The module, not the function of the same name that tokenformer_jax.model re-exports.
pattention_module = importlib.import_module("tokenformer_jax.model.pattention")
NO_NORM = "  (Θ = GeLU only)"


@contextlib.contextmanager
def theta_without_norm():
  """Breakdown only: Pattention's Θ becomes a plain GeLU (no L2 norm) while a step is traced."""
  original = pattention_module.normalize_scores
  pattention_module.normalize_scores = lambda s, *, approximate_gelu=False, **_: jax.nn.gelu(
      s.astype(jnp.float32), approximate=approximate_gelu)
  try:
    yield
  finally:
    pattention_module.normalize_scores = original


def runner(cfg, batch, seq_len):
  """A no-argument callable that runs one step on fixed random tokens, threading the donated state.

  The step is the trainer's own (`build_run`: fwd + bwd + clipped AdamW, state donated), on one device, and is
  compiled here, ahead of time, so that a patch active during this call is what gets traced.
  """
  run = build_run(TrainConfig(model=cfg, data=DataConfig(seq_len=seq_len), optim=OptimConfig(learning_rate=1e-4),
                              global_batch=batch, mesh=MeshConfig(data=1)), jax.devices()[:1])
  state = [run.init_state()]
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, cfg.vocab_size)
  inputs = jax.device_put({"tokens": tokens, "mask": jnp.ones((batch, seq_len), jnp.float32)},
                          jax.tree.map(lambda a: a.sharding, run.abstract_batch()))
  step = run.train_step.lower(run.abstract, run.abstract_batch()).compile()

  def one_step():
    state[0], metrics = step(state[0], inputs)
    return state[0], metrics
  return one_step


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[50277, 8192],
                      help="one comparison per vocabulary: the paper's (padded to 50,304), and a small one")
  parser.add_argument("--no_norm_variant", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the TokenFormer with Θ = plain GeLU, to split its overhead into the L2 "
                           "norm and the rest (layer shapes)")
  args = parser.parse_args()

  tokenformer = load_config("experiments/paper.py:ladder_124m")
  transformer = load_config("experiments/paper.py:transformer_124m").replace(positions="none")
  tokens = args.batch * args.seq_len

  print(f"$ python {' '.join(sys.argv)}")
  print(f"device: {jax.devices()[0].device_kind}  batch {args.batch} × seq {args.seq_len} = {tokens} tokens/step"
        f"  float32  AdamW  repeats {args.repeats} (interleaved, after 2 warm-up steps)\n"
        f"step ms, tokens/s, GFLOP/s: medians; ratio: median of per-repeat ratios to the Transformer [p25, p75];"
        f" min ratio: of the fastest steps")
  print(f"\n{'model':<17} {'vocab':>6} {'non-emb params':>15} {'GFLOP/token':>12} {'step ms':>8} {'min ms':>7}"
        f" {'tokens/s':>8} {'GFLOP/s':>7} {'ratio':>6}  [p25, p75]  {'min ratio':>9}")
  for vocab in args.vocab_sizes:
    cfgs = {c.name: c.replace(vocab_size=vocab) for c in (tokenformer, transformer)}
    runners = {name: runner(cfg, args.batch, args.seq_len) for name, cfg in cfgs.items()}
    if args.no_norm_variant:
      with theta_without_norm():
        runners[NO_NORM] = runner(cfgs[tokenformer.name], args.batch, args.seq_len)
      cfgs[NO_NORM] = cfgs[tokenformer.name]
    times = interleaved(runners, args.repeats)
    del runners
    for name, cfg in cfgs.items():
      ms = float(np.median(times[name]))
      fpt = flops_per_token(cfg, args.seq_len)
      r = paired_ratio(times, name, transformer.name)
      shown = (f"{r[0]:>6.3f}  [{r[1]:.3f}, {r[2]:.3f}]  {min_ratio(times, name, transformer.name):>9.3f}"
               if name != transformer.name else f"{1:>6.3f}")
      print(f"{name:<17} {cfg.padded_vocab:>6} {count_params(cfg)['non_embedding']:>15,} {fpt / 1e9:>12.3f} "
            f"{ms:>8.0f} {times[name].min():>7.0f} {tokens / ms * 1e3:>8.0f} {fpt * tokens / ms / 1e6:>7.1f} {shown}",
            flush=True)
    del times
    gc.collect()   # free the first pair's parameters and optimizer state before the second pair


if __name__ == "__main__":
  main()
