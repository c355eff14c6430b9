"""Grow a TokenFormer by appending key/value parameter tokens to every Pattention (paper §3.3, Eq. 11).

Pure functions of (params, old config, new config): jit them with the target shardings and the grown model
is built where it will live, never gathered on one host.

    rows [0, n_old)        the old tokens, copied (optionally with a little noise: the authors' advice)
    rows [n_old, n_new)    new tokens: zero keys + random values ("zero_keys", paper App. B: exactly
                           function-preserving with the norm scale kept), or both random ("random", the
                           authors' code)
    rows [n_new, storage)  inert padding: zero keys and zero values
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokenformer_jax.config import PROJECTIONS, ModelConfig, ParamTokens
from tokenformer_jax.model.tokenformer import init_stds

INITS = ("zero_keys", "random")

# Fields that must be equal for the old parameters to mean the same thing in the new model.
_SAME_FIELDS = ("architecture", "vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads",
                "normalization", "positions", "rotary_fraction", "rotary_base", "final_norm_params",
                "logits_divide_by_sqrt_d", "layer_norm_eps", "approximate_gelu", "block_norm", "vision")


def check_growable(old: ModelConfig, new: ModelConfig) -> None:
  """Raise ValueError naming the first reason `new` cannot be grown from `old`."""
  for field in _SAME_FIELDS:
    if getattr(old, field) != getattr(new, field):
      raise ValueError(f"cannot grow {old.name} into {new.name}: {field} is {getattr(old, field)!r} in the old "
                       f"model and {getattr(new, field)!r} in the new one; growth only adds parameter tokens")
  if old.architecture != "tokenformer":
    raise ValueError(f"cannot grow {old.name} by tokens: it is a {old.architecture} (use Net2Net for those)")
  for p in PROJECTIONS:
    if new.tokens(p) < old.tokens(p):
      raise ValueError(f"cannot grow {old.name} into {new.name}: {p} would shrink from {old.tokens(p)} to "
                       f"{new.tokens(p)} parameter tokens")


def nonzero_padding(params: dict, cfg: ModelConfig) -> list[str]:
  """Pattention leaves whose padding rows (past the logical token count) are not zero. Training keeps them
  zero; a checkpoint where they are not does not hold the model its config describes."""
  return [f"layers/{p}/{name}" for p in PROJECTIONS for name, leaf in params["layers"][p].items()
          if bool(jnp.any(leaf[:, cfg.tokens(p):] != 0))]


def grown_config(old: ModelConfig, target: ModelConfig, *, keep_scale: bool = True) -> ModelConfig:
  """The target config with the norm scale settled.

  keep_scale=True stores the old model's scale (sqrt of its token counts) so the grown model computes the
  same function; False lets the scale follow the new token counts, as the authors' code does.
  """
  if not keep_scale:
    return dataclasses.replace(target, norm_scale="fixed", norm_scale_tokens=None)
  scale = ParamTokens(**{p: old.scale_tokens(p) for p in PROJECTIONS})
  return dataclasses.replace(target, norm_scale="fixed", norm_scale_tokens=scale)


def _grow_rows(old: jax.Array, n_old: int, n_new: int, storage: int, new_rows: jax.Array | None,
               noise: jax.Array | None) -> jax.Array:
  """[layers, old_storage, d] → [layers, storage, d]: old rows, new rows (None: zeros), zero padding."""
  layers, _, d = old.shape
  kept = old[:, :n_old] if noise is None else old[:, :n_old] + noise
  added = jnp.zeros((layers, n_new - n_old, d), old.dtype) if new_rows is None else new_rows
  return jnp.concatenate([kept, added, jnp.zeros((layers, storage - n_new, d), old.dtype)], axis=1)


def grow(params: dict, old: ModelConfig, new: ModelConfig, *, init: str = "zero_keys", rng: jax.Array,
         old_noise: float = 0.0) -> dict:
  """The grown parameters. `old_noise`: std of Gaussian noise added to the old tokens, as a fraction of the
  init std of that tensor (0: copied exactly). Every other leaf (embedding, norms, a classifier's patch embedding,
  positions and head) is copied."""
  check_growable(old, new)
  if init not in INITS:
    raise ValueError(f"unknown growth init {init!r}; choose one of {INITS}")
  grown = {k: v for k, v in params.items() if k != "layers"}
  grown["layers"] = {k: v for k, v in params["layers"].items() if k not in PROJECTIONS}   # block norms, if any
  for index, p in enumerate(PROJECTIONS):
    leaves = params["layers"][p]
    n_old, n_new, storage = old.tokens(p), new.tokens(p), new.storage_tokens(p)
    layers, stored_old, d = leaves["key_param_tokens"].shape
    if stored_old != old.storage_tokens(p):
      raise ValueError(f"layers/{p}/key_param_tokens has {stored_old} rows but the old config stores "
                       f"{old.storage_tokens(p)}; the parameters do not belong to config {old.name}")
    key_std, value_std = init_stds(new, p)
    old_key_std, old_value_std = init_stds(old, p)
    k_new, v_new, k_noise, v_noise = jax.random.split(jax.random.fold_in(rng, index), 4)
    shape_new, shape_old = (layers, n_new - n_old, d), (layers, n_old, d)
    new_keys = None if init == "zero_keys" else key_std * jax.random.normal(k_new, shape_new)
    new_values = value_std * jax.random.normal(v_new, shape_new)

    def noise(key, std):
      return old_noise * std * jax.random.normal(key, shape_old) if old_noise else None

    grown["layers"][p] = {
        "key_param_tokens": _grow_rows(leaves["key_param_tokens"], n_old, n_new, storage, new_keys,
                                       noise(k_noise, old_key_std)),
        "value_param_tokens": _grow_rows(leaves["value_param_tokens"], n_old, n_new, storage, new_values,
                                         noise(v_noise, old_value_std)),
    }
  return grown


def grow_moments(moments: dict, old: ModelConfig, new: ModelConfig) -> dict:
  """An AdamW moment tree (mu or nu, shaped like the parameters) grown as `grow` grows the parameters, but with
  zeros in every new row whatever the parameters' init (a new token has no gradient history) and in the padding;
  the old rows and every other leaf copied exactly."""
  check_growable(old, new)
  grown = {k: v for k, v in moments.items() if k != "layers"}
  grown["layers"] = {k: v for k, v in moments["layers"].items() if k not in PROJECTIONS}
  grown["layers"] |= {p: {name: _grow_rows(leaf, old.tokens(p), new.tokens(p), new.storage_tokens(p), None, None)
                         for name, leaf in moments["layers"][p].items()} for p in PROJECTIONS}
  return grown
