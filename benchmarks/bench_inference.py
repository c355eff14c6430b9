"""Inference speed: decoding with the KV cache vs recomputing the whole forward pass per token, prefill, and eval.

    python benchmarks/bench_inference.py                                   # demo model and ladder_124m shapes
    python benchmarks/bench_inference.py --models demo --new_tokens 64 256 1024 --repeats 3
    python benchmarks/bench_inference.py --models demo --only_cache_slots --slot_batches 1 64   # step vs cache

Random parameters of each model's shapes (speed does not depend on their values); float32; batch --batch of
--prompt-token prompts; greedy; no eos, so every run makes exactly N new tokens. Per model:
  * decode, cache:     `inference.decode.generate` (prefill once, then one jitted step per token); tokens/s of the
                       decode loop after the prefill (a first untimed run compiles).
  * decode, recompute: no cache: every new token runs the full causal forward pass over the whole sequence so
                       far, right-padded to a power-of-two bucket (every bucket compiled before timing).
  * prefill:           the jitted prefill of `--prefill_lengths` tokens per row into a fresh cache.
  * eval:              the trainer's eval computation (`train.steps.loss_sums`, jitted) on [--eval_batch,
                       seq_len + 1] windows.
  * step vs cache slots: one decode step (`decode_functions`' jitted step, the cache donated) at each of
                       --cache_slots; beside it the step's attention alone (every layer's
                       `cached_self_attention`), and a jitted sum over the cache's k and v: what reading every
                       slot once costs by itself. All sizes and functions are interleaved in one
                       process (`timing.interleaved`: each sample the mean over >= 100 ms of calls, the
                       order reversed every repeat); medians over --slot_repeats. Batch --slot_batches.
Times are the fastest of --repeats runs (load from other processes only ever adds time) with the median beside;
models over 50M parameters (ladder_124m) and recomputations of 1024+ tokens run once after the warm-up, their
recomputation stops at --max_recompute new tokens, and their eval batch is 1 × 1024.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import interleaved

from tokenformer_jax.config import count_params, load_config
from tokenformer_jax.inference import decode
from tokenformer_jax.model import LanguageModel, init_params
from tokenformer_jax.model.layers import cached_self_attention
from tokenformer_jax.train.steps import loss_sums

MODELS = {"demo": "experiments/demo.py:demo", "ladder_124m": "experiments/paper.py:ladder_124m"}


def model_config(name: str, longest: int):
  cfg = load_config(MODELS[name])
  cfg = getattr(cfg, "model", cfg)
  return cfg.replace(max_seq_len=max(cfg.max_seq_len, decode.bucket_length(longest)))   # no position table


def best(fn, repeats: int) -> tuple[float, float]:
  times = []
  for _ in range(repeats):
    times.append(fn())
  return min(times), float(np.median(times))


def cached_decode(cfg, params, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
  decode.generate(cfg, params, prompts, max_new_tokens=new_tokens)   # compiles
  run = lambda: decode.generate(cfg, params, prompts, max_new_tokens=new_tokens).decode_seconds / (new_tokens - 1)
  return best(run, repeats)   # seconds per token (the first token comes from the prefill)


def recomputed_decode(cfg, params, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
  model = LanguageModel(cfg)
  greedy = jax.jit(lambda p, tokens, last: jnp.argmax(
      jnp.take_along_axis(model.apply({"params": p}, tokens), last[:, None, None], axis=1)[:, 0], axis=-1))
  batch, prompt = len(prompts), len(prompts[0])
  total = prompt + new_tokens
  widths = sorted({decode.bucket_length(length) for length in range(prompt, total)})
  for width in widths:   # compile every bucket first
    greedy(params, np.zeros((batch, width), np.int32), np.zeros(batch, np.int32)).block_until_ready()

  def run():
    tokens = np.zeros((batch, decode.bucket_length(total)), np.int32)
    tokens[:, :prompt] = prompts
    start = time.perf_counter()
    for length in range(prompt, total - 1):
      width = decode.bucket_length(length)
      tokens[:, length] = np.asarray(greedy(params, tokens[:, :width], np.full(batch, length - 1, np.int32)))
    return (time.perf_counter() - start) / (new_tokens - 1)
  return best(run, repeats)


def prefill_seconds(cfg, params, batch: int, length: int, repeats: int) -> tuple[float, float]:
  prefill, _ = decode.decode_functions(cfg, None)
  tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = np.full(batch, length, np.int32)
  sampling = (jnp.float32(0), jnp.int32(0), jnp.float32(1))

  def run():
    cache = decode.init_cache(cfg, batch, length)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    jax.block_until_ready(prefill(params, cache, tokens, lengths, jax.random.key(0), *sampling))
    return time.perf_counter() - start
  run()
  return best(run, repeats)


def step_by_cache_slots(cfg, params, batch: int, slots: list[int], repeats: int) -> dict:
  """{(what, slots): [repeats] ms}, all interleaved, for a cache of each length: "step", a decode step; "attend",
  the step's attention alone (`layers.cached_self_attention` on every layer's cache: the new rows written, the
  two products over all slots); "read", a sum over the cache's keys and values (every slot read once, the least
  any step can do). Every row sits at position 64: one slot written, all of them attended (the mask costs the
  same at any position)."""
  _, step = decode.decode_functions(cfg, None)
  sampling = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
  token, position, key = np.full(batch, 5, np.int32), np.full(batch, 64, np.int32), jax.random.key(0)
  x = jnp.ones((batch, 1, cfg.d_model), cfg.dtype)
  attend = jax.jit(lambda cache: [cached_self_attention(x, x, x, cfg, layer, position) for layer in cache],
                   donate_argnums=0)
  read = jax.jit(lambda cache: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(cache)))
  caches, fns = {}, {}
  for n in slots:
    caches["step", n], caches["attend", n] = decode.init_cache(cfg, batch, n), decode.init_cache(cfg, batch, n)

    def run_step(n=n):
      sampled, _, caches["step", n] = step(params, caches["step", n], token, position, key, *sampling)   # donated
      return sampled

    def run_attend(n=n):
      outs, caches["attend", n] = zip(*attend(caches["attend", n]))
      return outs
    fns["step", n], fns["attend", n] = run_step, run_attend
    fns["read", n] = lambda n=n: read(caches["step", n])
  return interleaved(fns, repeats)


def print_cache_slots(cfg, params, batch: int, slots: list[int], repeats: int) -> None:
  times = {name: float(np.median(t)) for name, t in step_by_cache_slots(cfg, params, batch, slots, repeats).items()}
  first = slots[0]
  added = lambda what, n: times[what, n] - times[what, first]
  print(f"  batch {batch}: {'slots':>6} {'step ms':>8} {'tok/s':>8} {'attend ms':>9} {'read ms':>8} "
        f"{'added: step':>11} {'attend':>7} {'read':>7} {'step/read':>9}")
  for n in slots:
    ratio = f"{added('step', n) / added('read', n):9.2f}" if n != first else ""
    print(f"  {'':>8} {n:>6} {times['step', n]:8.3f} {batch * 1e3 / times['step', n]:8.0f} {times['attend', n]:9.3f} "
          f"{times['read', n]:8.3f} {added('step', n):11.3f} {added('attend', n):7.3f} {added('read', n):7.3f} "
          f"{ratio:>9}", flush=True)


def eval_seconds(cfg, params, batch: int, seq_len: int, repeats: int) -> tuple[float, float]:
  step = jax.jit(lambda p, t, m: loss_sums(cfg, p, t, m))
  tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  mask = np.ones((batch, seq_len), np.float32)
  jax.block_until_ready(step(params, tokens, mask))

  def run():
    start = time.perf_counter()
    jax.block_until_ready(step(params, tokens, mask))
    return time.perf_counter() - start
  return best(run, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--new_tokens", nargs="+", type=int, default=[64, 256, 1024])
  parser.add_argument("--large_new_tokens", nargs="+", type=int, default=[64, 256],
                      help="--new_tokens for models over 50M parameters (CPU time)")
  parser.add_argument("--max_recompute", type=int, default=64, help="largest recomputed run for models over 50M")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--prefill_lengths", nargs="+", type=int, default=[128, 512])
  parser.add_argument("--eval_batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache_slots", nargs="+", type=int, default=[128, 256, 512, 1024, 2048])
  parser.add_argument("--slot_batches", nargs="+", type=int, default=[1])
  parser.add_argument("--slot_repeats", type=int, default=15)
  parser.add_argument("--only_cache_slots", action="store_true", help="run only the step-vs-cache-slots table")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].platform}  batch {args.batch}  prompt {args.prompt} tokens  float32  greedy  "
        f"repeats {args.repeats} (tokens/s of the fastest run; median in brackets)")
  for name in args.models:
    cfg = model_config(name, args.prompt + max(args.new_tokens) + 1)
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    large = count_params(cfg)["total"] > 50e6
    repeats = 1 if large else args.repeats
    print(f"\n{name}: {count_params(cfg)['total'] / 1e6:.1f}M parameters, d={cfg.d_model}, {cfg.n_layers} layers, "
          f"vocab {cfg.padded_vocab}")
    if not large or args.only_cache_slots:   # a large model's table takes minutes on a CPU: only when asked
      print(f"  decode step vs cache slots (ms per step, median of {args.slot_repeats}; 'added': over "
            f"{args.cache_slots[0]} slots; ratio: step added / read added):")
      for batch in args.slot_batches:
        print_cache_slots(cfg.replace(max_seq_len=max(cfg.max_seq_len, max(args.cache_slots))), params, batch,
                          args.cache_slots, args.slot_repeats)
    if args.only_cache_slots:
      continue
    prompts = np.random.default_rng(1).integers(4, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    rate = lambda seconds, tokens: f"{tokens / seconds[0]:9.1f} [{tokens / seconds[1]:9.1f}]"
    print(f"  {'new tokens':>10}  {'cache tok/s':>22}  {'recompute tok/s':>22}  speed-up")
    for new_tokens in (args.large_new_tokens if large else args.new_tokens):
      cached = cached_decode(cfg, params, prompts, new_tokens, repeats)
      line = f"  {new_tokens:>10}  {rate(cached, args.batch):>22}"
      if large and new_tokens > args.max_recompute:
        line += f"  {'(skipped)':>22}"
      else:
        recomputed = recomputed_decode(cfg, params, prompts, new_tokens, 1 if new_tokens >= 1024 else repeats)
        line += f"  {rate(recomputed, args.batch):>22}  {recomputed[0] / cached[0]:7.1f}×"
      print(line, flush=True)
    for length in args.prefill_lengths:
      seconds = prefill_seconds(cfg, params, args.batch, length, repeats)
      print(f"  prefill {args.batch}×{length}: {rate(seconds, args.batch * length)} tok/s", flush=True)
    eval_batch, seq_len = (1, 1024) if large else (args.eval_batch, 128)
    seconds = eval_seconds(cfg, params, eval_batch, seq_len, repeats)
    print(f"  eval {eval_batch}×{seq_len}: {rate(seconds, eval_batch * seq_len)} tok/s", flush=True)


if __name__ == "__main__":
  main()
