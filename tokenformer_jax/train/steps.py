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
from tokenformer_jax.model import LanguageModel, VisionModel, abstract_params, init_params, logical_axes
from tokenformer_jax.train.mixing import Mixing, mix
from tokenformer_jax.train.optimizer import with_moments


DROP_PATH_SEED = 0x5D   # the stochastic-depth key, folded with each step


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimizer steps taken
  params: Any
  opt_state: Any


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, preset: str):
  """(abstract TrainState, TrainState of NamedShardings): parameters and their optimizer moments alike."""
  param_specs = logical_axes(cfg)
  params = abstract_params(cfg)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, param_specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=abstract_opt)
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


def classification_sums(cfg: ModelConfig, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
  """An image classifier on {"images" [b, H, W, C], "labels" [b], "mask" [b]}: (Σ cross-entropy over the real
  examples, {"targets": their number, "top1", "top5": how many have their label first, among the first five}).
  With batch["targets"] [b, classes] (soft labels) the cross-entropy is against them; accuracy stays against
  "labels" (for a mixed image: the label of the image mixed in with weight λ)."""
  rngs = {} if rng is None else {"drop_path": rng}   # training with model.drop_path
  logits = VisionModel(cfg).apply({"params": params}, batch["images"], rngs=rngs)
  labels, mask = batch["labels"], batch["mask"]
  if "targets" in batch:   # soft targets of a mixed or smoothed training batch (train/mixing.py)
    losses = optax.softmax_cross_entropy(logits, batch["targets"])
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top = jax.lax.top_k(logits, min(5, cfg.vision.num_classes))[1]   # ties: the lower class first, as argmax
  hits = top == labels[:, None]
  return jnp.sum(losses * mask), {"targets": jnp.sum(mask), "top1": jnp.sum(hits[:, 0] * mask),
                                  "top5": jnp.sum(jnp.any(hits, axis=1) * mask)}


def batch_sums(cfg: ModelConfig, params, batch: dict, rng=None) -> tuple[jax.Array, dict]:
  """(Σ loss, {"targets": how many terms, and for an image classifier "top1", "top5": correct counts}) of one
  batch: next-token prediction for a language model, classification for an image classifier (`rng`: its
  stochastic depth's draws, in training)."""
  if cfg.vision is not None:
    return classification_sums(cfg, params, batch, rng)
  loss_sum, targets = loss_sums(cfg, params, batch["tokens"], batch["mask"])
  return loss_sum, {"targets": targets}


def _micro_batches(x: jax.Array, count: int) -> jax.Array:
  """[b, ...] → [count, b / count, ...], micro-batch i taking rows i, i + count, ... so that each one is
  spread over every data-parallel shard instead of living on a few devices."""
  return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(cfg: ModelConfig, tx, schedule, shardings: TrainState, mesh: Mesh, grad_accum: int = 1,
                    guarded: bool = False, mixing: Mixing | None = None):
  """jit(state, batch) → (state, metrics); gradients averaged over the real targets of all micro-batches.

  The state keeps `shardings` (the preset's); activations are laid out by `sharding.activation_sharding`,
  under which a `pattention_impl="shard_map"` model finds its mesh. `.lower(abstract_state, abstract_batch)`
  compiles it ahead of time (plan.py).

  `guarded` (the loss-spike guard, train/guard.py): jit(state, batch, threshold, lr_scale) instead. A step whose
  loss exceeds `threshold` keeps the parameters and the optimizer state (moments and schedule count) as they
  were, only the step counter moves on (metrics["skipped"] = 1); every update is multiplied by `lr_scale`, which
  for AdamW with decoupled weight decay is exactly a learning rate × lr_scale.

  `mixing` (an image classifier's mixup / cutmix / label smoothing, train/mixing.py) mixes the whole global batch
  at the step's draws before it is cut into micro-batches.
  """
  value_and_grad = jax.value_and_grad(functools.partial(batch_sums, cfg), has_aux=True)

  def step(state: TrainState, batch: dict, threshold=None, lr_scale=None):
    if mixing is not None:
      batch = mix(mixing, batch, state.step, cfg.vision.num_classes)
    # Stochastic depth's draws: of (the step, the micro-batch), so a resumed run drops what the first one did.
    drops = cfg.vision is not None and cfg.drop_path > 0
    step_key = jax.random.fold_in(jax.random.key(DROP_PATH_SEED), state.step) if drops else None
    micro_key = lambda i: None if step_key is None else jax.random.fold_in(step_key, i)

    def accumulate(carry, micro_and_index):
      grads, loss_sum, sums = carry
      micro, index = micro_and_index
      (micro_loss, micro_sums), micro_grads = value_and_grad(state.params, micro, micro_key(index))
      return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss,
              jax.tree.map(jnp.add, sums, micro_sums)), None

    if grad_accum == 1:   # no loop: the compiler's cost analysis counts a loop body once
      (loss_sum, sums), grads = value_and_grad(state.params, batch, micro_key(0))
    else:
      micro = jax.tree.map(functools.partial(_micro_batches, count=grad_accum), batch)
      zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: value_and_grad(state.params, batch)[0][1]))
      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), zero_sums)
      (grads, loss_sum, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
    count = jnp.maximum(sums["targets"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "targets": count}
    if "top1" in sums:   # an image classifier: the batch's top-1 and top-5 accuracy
      metrics.update(top1=sums["top1"] / count, top5=sums["top5"] / count)
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
  """jit(params, batch) → `batch_sums`: (Σ loss, {"targets", and for an image classifier "top1", "top5"})."""
  def eval_step(params, batch):
    with sharding.activation_sharding(mesh):
      return batch_sums(cfg, params, batch)

  return jax.jit(eval_step, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


class LossSums:
  """Σ cross-entropy and the counts beside it (Σ real targets; an image classifier's top-1 and top-5 hits) over
  batches, added up on the host in float64. `mean` is the loss per target (token-weighted; 0 without targets),
  `rates` each other count per target. The one mean loss: the loop's evaluation, cli.eval, cli.grow --verify and
  the experiments all report it."""

  def __init__(self):
    self.total, self.counts = 0.0, {"targets": 0.0}

  def add(self, sums) -> LossSums:
    """Add one batch's (Σ loss, number of targets), as `loss_sums` returns them, or (Σ loss, {"targets", ...}) as
    `batch_sums` and the eval step do."""
    loss_sum, counts = jax.device_get(sums)
    if not isinstance(counts, dict):
      counts = {"targets": counts}
    self.total += float(loss_sum)
    for key, value in counts.items():
      self.counts[key] = self.counts.get(key, 0.0) + float(value)
    return self

  @property
  def targets(self) -> float:
    return self.counts["targets"]

  @property
  def mean(self) -> float:
    return self.total / max(self.targets, 1.0)

  @property
  def rates(self) -> dict[str, float]:
    """Each count but the targets' per target: {"top1", "top5"} for an image classifier, {} for a language model."""
    return {k: v / max(self.targets, 1.0) for k, v in self.counts.items() if k != "targets"}


def mean_loss(batch_sums) -> float:
  """The loss per target over batches, from each batch's (Σ loss, number of targets)."""
  sums = LossSums()
  for each in batch_sums:
    sums.add(each)
  return sums.mean
