"""The image classifier around a block (a ViT, or a vision TokenFormer):

    images [batch, H, W, C] → patches [batch, N, p·p·C] → dense patch embedding → (class token) + learned
    position embeddings → the same scanned blocks as the language model, attention bidirectional → final norm →
    class token (or the mean of the patch tokens) → dense head → logits [batch, num_classes]

The blocks are lm.block_stack: a TokenFormer's (every projection a Pattention) or the dense baseline's, whichever
cfg.architecture says; nothing here is specific to one of them. The patch embedding and the head are dense in
both, as the token embedding and the tied logits of the language model are not Pattentions either: they map
between the data (pixels, classes) and the residual stream, and the paper's Pattentions replace the projections
*inside* the blocks (its Table 9 parameter counts come out only with a dense embedding and head: Base† =
2·12·768·4608 block parameters + 1.4M for the embedding, the positions and the head = 86M).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model.layers import ACTIVATION_AXES
from tokenformer_jax.model.lm import block_stack, final_norm

LOGITS_AXES = ("batch", None)


def patches(images: jax.Array, patch_size: int) -> jax.Array:
  """[batch, H, W, C] → [batch, (H/p)·(W/p), p·p·C], patches in row-major order, each flattened (row, col, channel)."""
  batch, height, width, channels = images.shape
  p = patch_size
  x = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def example_input(cfg: ModelConfig) -> jax.Array:
  """The smallest input `init` takes: one image."""
  v = cfg.vision
  return jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32)


class VisionModel(nn.Module):
  """images [batch, image_size, image_size, channels] float → logits [batch, num_classes] float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg, v = self.cfg, self.cfg.vision
    expected = (v.image_size, v.image_size, v.channels)
    if tuple(images.shape[1:]) != expected:
      raise ValueError(f"model {cfg.name} takes images of shape {expected}, got {tuple(images.shape[1:])}")
    d = cfg.d_model
    x = nn.Dense(d, dtype=cfg.dtype, param_dtype="float32", name="patch_embedding",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                     patches(images.astype(cfg.dtype), v.patch_size))
    if v.pooling == "cls":
      cls = self.param("class_token", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                       jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d)), x], axis=1)
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                           (v.sequence_length, d), jnp.float32)
    x = nn.with_logical_constraint(x + positions.astype(x.dtype), ACTIVATION_AXES)

    # Stochastic depth: layer i's rate drop_path·i/(L-1), scanned with the layers; active only with a
    # "drop_path" rng (the train step's).
    rates = jnp.linspace(0.0, cfg.drop_path, cfg.n_layers) if cfg.drop_path else None
    x, _ = block_stack(cfg)(x, None, None, rates)
    x = final_norm(cfg, x)
    pooled = x[:, 0] if v.pooling == "cls" else jnp.mean(x, axis=1)
    # A zero head (as big_vision): every class starts equally likely, the loss at ln(num_classes).
    logits = nn.Dense(v.num_classes, dtype=jnp.float32, param_dtype="float32", name="head",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(pooled)
    return nn.with_logical_constraint(logits, LOGITS_AXES)
