"""The dense baseline: the same skeleton as TokenFormer with GPT-2's linear projections and a GeLU MLP of 4d
hidden units, or a SwiGLU MLP of the same parameters (model.mlp)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax

from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model.layers import (ACTIVATION_AXES, block_norm, cached_self_attention, causal_self_attention,
                                          drop_path)


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, std: float = 0.02) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype="float32", name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class TransformerBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: dict | None = None, start: jax.Array | None = None, drop_rate=None):
    """x → (x, None); decoding (layers.cached_self_attention): x, this layer's KV cache, start → (x, cache).
    `drop_rate`: this layer's stochastic depth (layers.drop_path; training an image classifier)."""
    cfg = self.cfg
    d, hidden = cfg.d_model, cfg.mlp_hidden
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)   # GPT-2's scaled init of residual projections
    h = block_norm(cfg, "attention_norm")(x)
    q, k, v = (dense(cfg, d, ("embed", "heads"), p)(h) for p in ("query", "key", "value"))
    if cache is None:
      attended = causal_self_attention(q, k, v, cfg)
    else:
      attended, cache = cached_self_attention(q, k, v, cfg, cache, start)
    x = x + drop_path(self, dense(cfg, d, ("heads", "embed"), "output", residual_std)(attended), drop_rate)
    h = block_norm(cfg, "mlp_norm")(x)
    up = dense(cfg, hidden, ("embed", "mlp"), "mlp_in")(h)
    if cfg.mlp == "swiglu":
      h = jax.nn.silu(dense(cfg, hidden, ("embed", "mlp"), "mlp_gate")(h)) * up
    else:
      h = jax.nn.gelu(up, approximate=False)
    x = x + drop_path(self, dense(cfg, d, ("mlp", "embed"), "mlp_out", residual_std)(h), drop_rate)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), cache
