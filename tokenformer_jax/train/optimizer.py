"""AdamW with global-norm clipping, linear warmup and cosine decay to a floor (paper App. D/F)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


def only_rows(rows: dict[str, tuple[int, int]]) -> optax.GradientTransformation:
  """Zero every update except rows [start, stop) of each Pattention named in `rows` (layers/<name>/...).

  Applied after AdamW, so frozen parameters are untouched by weight decay too.
  """
  def keep(path, update):
    names = [p.key for p in path]
    if names[0] == "layers" and names[1] in rows:
      start, stop = rows[names[1]]
      row = jnp.arange(update.shape[1])[None, :, None]
      return jnp.where((row >= start) & (row < stop), update, 0)
    return jnp.zeros_like(update)

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree_util.tree_map_with_path(keep, updates), state))


class EmaState(NamedTuple):
  ema: Any   # the running average of the parameters, shaped (and sharded) like them


def ema_of_params(decay: float) -> optax.GradientTransformation:
  """The last link of the chain: keeps ema ← decay·ema + (1 - decay)·(params + updates), the parameters this step
  produces (optim.ema_decay; timm's ModelEmaV2, no warm-up). It lives in the optimizer state, so checkpoints, the
  sharding table and a resume carry it like AdamW's moments; it starts as the initial parameters."""
  def update(updates, state, params):
    ema = jax.tree.map(lambda e, p, u: decay * e + (1 - decay) * (p + u), state.ema, params, updates)
    return updates, EmaState(ema)

  return optax.GradientTransformation(lambda params: EmaState(params), update)


def ema_params(opt_state):
  """The EMA of the parameters in `opt_state` (optim.ema_decay > 0), None without one."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(s)]
  return found[0].ema if found else None


def _is_ema(x) -> bool:
  return isinstance(x, EmaState)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   trainable_rows: dict[str, tuple[int, int]] | None = None) -> optax.GradientTransformation:
  """AdamW (+ clipping); with `trainable_rows`, only those parameter-token rows are updated."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  if trainable_rows is not None:
    parts.append(only_rows(trainable_rows))
  if cfg.ema_decay:
    parts.append(ema_of_params(cfg.ema_decay))
  return optax.chain(*parts)


# AdamW's moments, out of and into a state of make_optimizer's chain (cli.grow --optimizer=carry) ----------------
def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def adam_moments(opt_state) -> dict:
  """{"count", "mu", "nu"} of the one ScaleByAdamState in `opt_state` (arrays or their ShapeDtypeStructs);
  count is Adam's own step count, the one its bias correction 1 / (1 - b^count) uses (the schedule has another)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
  if len(found) != 1:
    raise ValueError(f"the optimizer state holds {len(found)} AdamW moment sets, not one")
  return {"count": found[0].count, "mu": found[0].mu, "nu": found[0].nu}


def with_moments(opt_state, moments: dict):
  """`opt_state` with its AdamW count, mu and nu replaced by `moments`; everything else (the schedule's count
  included) as it was."""
  return jax.tree.map(lambda s: s._replace(**moments) if _is_adam(s) else s, opt_state, is_leaf=_is_adam)
