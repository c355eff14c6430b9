"""Shared test helpers: the shipped corpus as bytes, a tiny training step, and running the CLIs."""
import functools
import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax

from tokenformer_jax.model import LanguageModel

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "tokenformer_jax/data/corpus/python-docs-slice.jsonl.gz"


@functools.cache
def corpus_bytes() -> np.ndarray:
  """The shipped corpus as byte tokens (vocabulary 256): real English text without a tokenizer."""
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    text = "".join(json.loads(line)["text"] for line in f)
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def text_batch(batch: int, length: int, offset: int = 0) -> np.ndarray:
  data = corpus_bytes()
  return np.stack([data[offset + i * length: offset + (i + 1) * length] for i in range(batch)])


def next_token_loss(cfg, params, tokens):
  logits = LanguageModel(cfg).apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(cfg, tx):
  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(functools.partial(next_token_loss, cfg))(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


REPO = pathlib.Path(__file__).resolve().parent.parent
TEST_RUN = "--config=experiments/demo.py:test_run"


def run_cli(module: str, *args: str, devices: int = 1, script: tuple[str, ...] | None = None):
  """Run `python -m module args` (or `python script... args`) from the repository root, as a user would."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
  command = [sys.executable, *(script or ("-m", module)), *args]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(workdir, key: str = "train/loss") -> dict[int, float]:
  """step → value from metrics.jsonl, the last occurrence winning (steps re-run after a kill repeat)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if key in record:
      out[record["step"]] = record[key]
  return out


def assert_fails_with_one_line(result, *phrases):
  """Exit code 1 and exactly one 'error: ...' line on stderr, containing every phrase."""
  assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr[-2000:]
  for phrase in phrases:
    assert phrase in error_lines[0], error_lines[0]
