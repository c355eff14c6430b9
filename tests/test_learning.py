"""The TokenFormer learns: a few hundred CPU steps on real English text beat unigram entropy by far."""
import numpy as np
import pytest
import optax

import jax
from helpers import corpus_bytes, make_train_step, next_token_loss
from tokenformer_jax.config import load_config
from tokenformer_jax.model import init_params


@pytest.mark.slow
def test_tokenformer_learns_real_text(optimized_compiles):
  cfg = load_config("experiments/tiny.py:tiny_tokenformer")
  data = corpus_bytes()
  split = int(0.95 * len(data))
  train, held_out = data[:split], data[split:]
  freq = np.bincount(train, minlength=256) / len(train)
  unigram_entropy = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))   # ≈ 3.35 nats per byte

  steps, batch, length = 300, 16, 64
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-2, 30, steps, 1e-3), b1=0.9, b2=0.95,
                   weight_decay=0.1)
  params = init_params(cfg, jax.random.key(0))
  opt_state = tx.init(params)
  step = make_train_step(cfg, tx)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    starts = rng.integers(0, len(train) - length - 1, batch)
    params, opt_state, _ = step(params, opt_state, np.stack([train[s: s + length + 1] for s in starts]))
  held_out_batch = held_out[: 64 * (length + 1)].reshape(64, length + 1)
  loss = float(next_token_loss(cfg, params, held_out_batch))
  assert loss < 0.85 * unigram_entropy, (loss, unigram_entropy)   # seen: 2.57 vs 3.35
