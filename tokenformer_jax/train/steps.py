"""The train state, its shardings, and the jitted train and eval steps."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from tokenformer_jax import sharding
from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model import LanguageModel, init_params, logical_axes
from tokenformer_jax.train.optimizer import with_moments


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimizer steps taken
  params: Any
  opt_state: Any


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, preset: str):
  """(abstract TrainState, TrainState of NamedShardings): parameters and their optimizer moments alike."""
  param_specs = logical_axes(cfg)
  abstract_params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, param_specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
  return sharding.place_tree(abstract, specs, mesh, preset, cfg)


def init_state(cfg: ModelConfig, tx, shardings: TrainState, seed: int, params=None, moments=None) -> TrainState:
  """A fresh state, created directly with its shardings; `params` (already placed) skips their init; `moments`
  (already placed: {"count", "mu", "nu"}, cli.grow --optimizer=carry) replace AdamW's fresh ones (zeros)."""
  def make(params, moments=None):
    if params is None:
      params = init_params(cfg, jax.random.key(seed))
    opt_state = tx.init(params) if moments is None else with_moments(tx.init(params), moments)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
  if params is None:
    return jax.jit(lambda: make(None), out_shardings=shardings)()
  if moments is not None:
    return jax.jit(make, out_shardings=shardings)(params, moments)
  return jax.jit(make, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def loss_sums(cfg: ModelConfig, params, tokens: jax.Array, mask: jax.Array):
  """(Σ cross-entropy over real targets, number of real targets) for tokens [b, T+1], mask [b, T]."""
  logits = LanguageModel(cfg).apply({"params": params}, tokens[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  return jnp.sum(losses * mask), jnp.sum(mask)


def _micro_batches(x: jax.Array, count: int) -> jax.Array:
  """[b, ...] → [count, b / count, ...], micro-batch i taking rows i, i + count, ... so that each one is
  spread over every data-parallel shard instead of living on a few devices."""
  return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(cfg: ModelConfig, tx, schedule, shardings: TrainState, mesh: Mesh, grad_accum: int = 1,
                    guarded: bool = False):
  """jit(state, batch) → (state, metrics); gradients averaged over the real targets of all micro-batches.

  The state keeps `shardings` (the preset's); activations are laid out by `sharding.activation_sharding`,
  under which a `pattention_impl="shard_map"` model finds its mesh. `.lower(abstract_state, abstract_batch)`
  compiles it ahead of time (plan.py).

  `guarded` (the loss-spike guard, train/guard.py): jit(state, batch, threshold, lr_scale) instead. A step whose
  loss exceeds `threshold` keeps the parameters and the optimizer state (moments and schedule count) as they
  were, only the step counter moves on (metrics["skipped"] = 1); every update is multiplied by `lr_scale`, which
  for AdamW with decoupled weight decay is exactly a learning rate × lr_scale.
  """
  value_and_grad = jax.value_and_grad(functools.partial(loss_sums, cfg), has_aux=True)

  def step(state: TrainState, batch: dict, threshold=None, lr_scale=None):
    def accumulate(carry, micro):
      grads, loss_sum, count = carry
      (micro_loss, micro_count), micro_grads = value_and_grad(state.params, micro["tokens"], micro["mask"])
      return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, count + micro_count), None

    if grad_accum == 1:   # no loop: the compiler's cost analysis counts a loop body once
      (loss_sum, count), grads = value_and_grad(state.params, batch["tokens"], batch["mask"])
    else:
      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
      micro = jax.tree.map(functools.partial(_micro_batches, count=grad_accum), batch)
      (grads, loss_sum, count), _ = jax.lax.scan(accumulate, zeros, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "targets": count}
    if guarded:
      updates = jax.tree.map(lambda u: u * lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    if guarded:
      skip = metrics["loss"] > threshold
      keep = lambda old, new: jax.tree.map(lambda a, b: jnp.where(skip, a, b), old, new)
      params, opt_state = keep(state.params, params), keep(state.opt_state, opt_state)
      metrics.update(skipped=skip.astype(jnp.float32), learning_rate=metrics["learning_rate"] * lr_scale)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def step_on_mesh(state: TrainState, batch: dict, *guard):
    with sharding.activation_sharding(mesh):
      return step(state, batch, *guard)

  batch_sharding = sharding.batch_sharding(mesh)
  scalars = (sharding.replicated(mesh),) * 2 if guarded else ()
  return jax.jit(step_on_mesh, in_shardings=(shardings, batch_sharding, *scalars),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(cfg: ModelConfig, shardings: TrainState, mesh: Mesh):
  """jit(params, batch) → (Σ loss, number of targets)."""
  def eval_step(params, batch):
    with sharding.activation_sharding(mesh):
      return loss_sums(cfg, params, batch["tokens"], batch["mask"])

  return jax.jit(eval_step, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
