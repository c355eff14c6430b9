"""What each checkpoint tier costs a run: the step-time stall of a save (until training may go on), the time until
it is on disk, and a restore, for the persistent tier (RunCheckpoints, Orbax) and the host-local one (LocalTier),
on the demo model and ladder_124m (~124M parameters) on this machine; then the work an unannounced failure loses
at the default periods.

  JAX_PLATFORMS=cpu python benchmarks/bench_checkpoint_tiers.py --repeats 3

The state is what training saves: float32 parameters and AdamW's state, on one device. Both tiers compute the
checksums of the whole state and copy it to host memory before save() returns (the stall); the rest is written in
the background (Orbax's thread, the local tier's thread), and `written` waits for it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import logging

from bench_checkpoint import make_state
from tokenformer_jax import checkpoint
from tokenformer_jax.checkpoint_local import LocalTier
from tokenformer_jax.config import TrainConfig, count_params, load_config


def persistent(directory, state, abstract) -> tuple[float, float, float]:
  run = checkpoint.RunCheckpoints(directory, keep=None)
  start = time.perf_counter()
  run.save(1, params=state["params"], opt_state=state["opt_state"], config={})
  stall = time.perf_counter() - start
  run.wait()
  written = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(run.restore(1, abstract["params"], abstract["opt_state"]))
  run.close()
  return stall, written, time.perf_counter() - start


def local(directory, state, abstract) -> tuple[float, float, float]:
  tier = LocalTier(directory, directory, every=1, keep=2)
  start = time.perf_counter()
  tier.save(1, state, config={}, data_position={})
  stall = time.perf_counter() - start
  tier.wait()
  written = time.perf_counter() - start
  start = time.perf_counter()
  assert tier.offers(abstract) == [1]   # reads and hashes every file, as a restart does
  restored = tier.restore(1, abstract)
  assert restored is not None
  jax.block_until_ready(restored[0])
  return stall, written, time.perf_counter() - start


def measure(config: str, repeats: int) -> None:
  model = load_config(config)
  model = getattr(model, "model", model)
  params, opt_state = make_state(model)
  state = {"params": params, "opt_state": opt_state}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f"\n{model.name}: {count_params(model)['total'] / 1e6:.1f}M parameters, params + AdamW state "
        f"{size / 2**20:.0f} MiB")
  checkpoint.checksums(state)   # compiled once, outside the timings
  times = {"persistent": [], "local": []}
  for r in range(repeats):   # interleaved, alternating the order: load from other jobs hits both alike
    for name in (("persistent", "local") if r % 2 == 0 else ("local", "persistent")):
      directory = tempfile.mkdtemp(prefix="bench_tiers_")
      times[name].append((persistent if name == "persistent" else local)(directory, state, abstract))
      shutil.rmtree(directory)
  print("| tier | stall of a save | written | restore |")
  print("|---|---|---|---|")
  for name in ("persistent", "local"):
    stall, written, restore = np.median(np.asarray(times[name]), axis=0)
    print(f"| {name} | {stall:.2f} s | {written:.2f} s | {restore:.2f} s |")


def lost_work() -> None:
  defaults = TrainConfig(model=None)
  persistent_every, local_every = defaults.checkpoint_every, defaults.local_checkpoint_every
  print(f"\nAn unannounced failure at a uniformly random step loses on average half a period, at most a whole one "
        f"(defaults: checkpoint_every={persistent_every}, local_checkpoint_every={local_every}):")
  print(f"  persistent only: {persistent_every / 2:.0f} steps on average, {persistent_every} at most")
  print(f"  with the local tier: {local_every / 2:.0f} steps on average, {local_every} at most (a host that lost its "
        "disk: the persistent figures)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=["experiments/demo.py:demo", "experiments/paper.py:ladder_124m"])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), medians of {args.repeats}")
  for config in args.configs:
    measure(config, args.repeats)
  lost_work()


if __name__ == "__main__":
  main()
