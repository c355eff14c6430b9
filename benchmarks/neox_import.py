"""Import time and peak memory of `cli.import_neox` on synthetic checkpoints of the released models' sizes.

  python benchmarks/neox_import.py --sizes=150m,1_5b --workdir=/tmp/neox_bench

For each size: writes a float32 `pytorch_model.bin` in the authors' exact layout (random weights, written one
tensor at a time with tokenformer_jax.interop.torch_format) and its config.json, then runs
`python -m tokenformer_jax.cli.import_neox` in a child process and reads the child's peak resident set size
from getrusage(RUSAGE_CHILDREN). A second child that only imports the same modules gives the baseline (Python,
jax, orbax) to subtract. Everything written is deleted afterwards unless --keep.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from tokenformer_jax.interop import neox
from tokenformer_jax.interop.torch_format import LazyArray, save_state_dict

SIZES = {   # layers, d, heads, attention tokens, ffn tokens (REFERENCE.md table)
    "150m": (12, 768, 12, 768, 3072), "450m": (24, 1024, 16, 1024, 4096),
    "900m": (32, 1280, 16, 1280, 5120), "1_5b": (40, 1536, 16, 1536, 6144),
}
VOCAB_ROWS, VOCAB = 50304, 50277

SIZES_FLAG = flags.DEFINE_list("sizes", ["150m", "1_5b"], f"Which of {', '.join(SIZES)}.")
WORKDIR = flags.DEFINE_string("workdir", "/tmp/neox_import_bench", "Scratch directory (needs 2.1 × the file size).")
KEEP = flags.DEFINE_bool("keep", False, "Keep the written checkpoints and runs.")


def write_synthetic(directory: str, size: str) -> int:
  layers, d, heads, attention, ffn = SIZES[size]
  config = {"num_layers": layers, "hidden_size": d, "num_attention_heads": heads, "qkv_slot_num": attention,
            "proj_slot_num": attention, "ffn_slot_num": ffn, "seq_length": 2048, "pos_emb": "rotary",
            "rotary_pct": 0.25, "norm": "layernorm_nonparam", "final_norm": "layernorm", "no_weight_tying": False,
            "gpt_j_residual": False, "norm_activation_type": "l2_norm_gelu", "precision": "float16"}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  cfg = neox.model_config(config, embedding_rows=VOCAB_ROWS, vocab_size=VOCAB)
  rng = np.random.default_rng(0)
  tensors = {name: LazyArray(neox.expected_shape(cfg, path), np.float32,
                             lambda shape=neox.expected_shape(cfg, path): rng.standard_normal(shape, np.float32) * 0.02)
             for name, (path, _) in neox.tensor_layout(cfg).items()}
  path = os.path.join(directory, "pytorch_model.bin")
  save_state_dict(path, tensors)
  return os.path.getsize(path)


def child_peak_rss(command: list[str]) -> tuple[float, int]:
  """(seconds, peak RSS in bytes) of a child process (run alone: RUSAGE_CHILDREN keeps the max so far)."""
  runner = ("import resource, subprocess, sys, time; t = time.time(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")
  out = subprocess.run([sys.executable, "-c", runner, *command], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  seconds, rss, code = out.stdout.split()[-3:]
  if code != "0":
    raise SystemExit(f"error: {' '.join(command)} failed:\n{out.stderr[-2000:]}")
  return float(seconds), int(rss)


def main(argv):
  del argv
  baseline_code = ("import jax, orbax.checkpoint, tokenformer_jax.interop.convert; "
                   "jax.device_put(1.0).block_until_ready()")
  _, baseline = child_peak_rss([sys.executable, "-c", baseline_code])
  print(f"baseline (python + jax + orbax imported): peak RSS {baseline / 2**30:.2f} GiB")
  for size in SIZES_FLAG.value:
    src, dst = os.path.join(WORKDIR.value, f"src-{size}"), os.path.join(WORKDIR.value, f"run-{size}")
    shutil.rmtree(dst, ignore_errors=True)
    started = time.time()
    file_size = write_synthetic(src, size)
    print(f"{size}: wrote {file_size / 1e9:.2f} GB in {time.time() - started:.0f}s")
    seconds, rss = child_peak_rss([sys.executable, "-m", "tokenformer_jax.cli.import_neox", f"--src={src}",
                                   f"--dst={dst}"])
    print(f"{size}: import {seconds:.1f}s, peak RSS {rss / 2**30:.2f} GiB = {rss / file_size:.2f} × the file "
          f"({(rss - baseline) / file_size:.2f} × above the baseline)")
    if not KEEP.value:
      shutil.rmtree(src, ignore_errors=True)
      shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
