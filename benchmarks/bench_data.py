"""Does the data pipeline keep up with the trainer? Demo config, this CPU.

  python benchmarks/bench_data.py [--config=experiments/demo.py:demo] [--steps=30]

Measures, each as a median over `--steps` batches/steps after warm-up:
  pipeline    host batches from the grain iterator (tokens/s), and the one-off cost of building it
              (reading and tokenizing the corpus)
  transfer    host batch → global jax.Array on the mesh (make_array_from_process_local_data)
  step        the jitted train step (forward + backward + AdamW), waited for
  metrics     fetching the step's metrics to the host (what logging costs)
and prints the pipeline's throughput as a multiple of what the trainer consumes.
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from tokenformer_jax.config import load_config  # noqa: E402
from tokenformer_jax.data.pipeline import make_train_iterator  # noqa: E402
from tokenformer_jax.data.tokenizer import Tokenizer  # noqa: E402
from tokenformer_jax.train.setup import build_run  # noqa: E402

CONFIG = flags.DEFINE_string("config", "experiments/demo.py:demo", "The experiment to measure.")
STEPS = flags.DEFINE_integer("steps", 30, "Timed batches / steps.")


def median_ms(samples: list[float]) -> float:
  return statistics.median(samples) * 1e3


def main(_):
  cfg = load_config(CONFIG.value)
  tokens_per_batch = cfg.global_batch * cfg.data.seq_len
  tokenizer = Tokenizer.load(cfg.data.tokenizer)

  started = time.perf_counter()
  batches = make_train_iterator(cfg.data, tokenizer, global_batch=cfg.global_batch)
  build_seconds = time.perf_counter() - started
  next(batches)
  fetch = []
  for _ in range(STEPS.value):
    t = time.perf_counter()
    host_batch = next(batches)
    fetch.append(time.perf_counter() - t)

  run = build_run(cfg)   # the trainer's own mesh, state shardings and jitted step
  state, train_step = run.init_state(), run.train_step
  t = time.perf_counter()
  state, metrics = train_step(state, run.to_global(host_batch))
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - t
  transfer, step, fetch_metrics = [], [], []
  for _ in range(STEPS.value):
    t = time.perf_counter()
    global_batch = jax.block_until_ready(run.to_global(host_batch))
    transfer.append(time.perf_counter() - t)
    t = time.perf_counter()
    state, metrics = train_step(state, global_batch)
    jax.block_until_ready(state)
    step.append(time.perf_counter() - t)
    t = time.perf_counter()
    jax.device_get(metrics)
    fetch_metrics.append(time.perf_counter() - t)

  pipeline_tps = tokens_per_batch / statistics.median(fetch)
  trainer_tps = tokens_per_batch / statistics.median(step)
  print(f"config {CONFIG.value}: batch {cfg.global_batch} × {cfg.data.seq_len} = {tokens_per_batch} tokens, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), medians over {STEPS.value}")
  print(f"  pipeline build (read + tokenize the corpus, once)   {build_seconds:8.2f} s")
  print(f"  train step compile (first call)                      {compile_seconds:8.2f} s")
  print(f"  host batch from the pipeline                         {median_ms(fetch):8.2f} ms  "
        f"{pipeline_tps / 1e3:9.1f}k tokens/s")
  print(f"  host → device transfer                               {median_ms(transfer):8.2f} ms")
  print(f"  train step (fwd + bwd + AdamW)                       {median_ms(step):8.2f} ms  "
        f"{trainer_tps / 1e3:9.1f}k tokens/s")
  print(f"  metrics to host                                      {median_ms(fetch_metrics):8.2f} ms")
  print(f"  the pipeline supplies {pipeline_tps / trainer_tps:.0f}× what the trainer consumes")


if __name__ == "__main__":
  app.run(main)
