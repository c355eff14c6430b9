"""AdamW with global-norm clipping, linear warmup and cosine decay to a floor (paper App. D/F)."""
from __future__ import annotations

import jax
import optax

from tokenformer_jax.config import OptimConfig

# Norm scales and biases are not decayed (GPT-NeoX's choice); parameter tokens, kernels and embedding are.
NO_DECAY = ("scale", "bias")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, total_steps)
  if cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)), optax.constant_schedule(cfg.learning_rate)],
        [warmup])
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)
  raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'cosine' or 'constant'")


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in NO_DECAY, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
