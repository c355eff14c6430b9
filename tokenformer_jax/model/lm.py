"""The language model around a block: embedding → scanned blocks → final norm → logits tied to the embedding.

`block_stack` and `final_norm` are the parts the image classifier (vision.py) shares with it."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model.layers import ACTIVATION_AXES, ATTENTION_NAME, LayerNorm, layer_norm
from tokenformer_jax.model.pattention import OUTPUT_NAME
from tokenformer_jax.model.pattention_lean import STATS_NAME
from tokenformer_jax.model.tokenformer import TokenFormerBlock
from tokenformer_jax.model.transformer import TransformerBlock

BLOCKS = {"tokenformer": TokenFormerBlock, "transformer": TransformerBlock}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep every Pattention's output [batch, length, d]; recompute its scores and Θ, and the attention.
    "projections": jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME),
    # Keep every Pattention's output and the attention's output, [batch, length, d] each: nothing of width n
    # and nothing [T, T]; recompute the layer norms, and the attention from q, k, v. With the lean kernel also
    # keep its per-row statistics (and M, [d, d]): its backward then needs no rerun of its forward loop.
    "lean": jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME, ATTENTION_NAME, STATS_NAME),
}
LOGITS_AXES = ("batch", "length", "vocab")


def block_stack(cfg: ModelConfig) -> nn.Module:
  """The cfg.n_layers blocks as one `nn.scan` over the architecture's block (with cfg.remat), named "layers": the
  one block implementation of every model here. Call it inside a compact module: x [batch, length, d] → (x, None)."""
  block = BLOCKS[cfg.architecture]
  if cfg.remat != "none":
    # Inside a scan the loop keeps XLA from merging the recomputation back into the forward pass; unrolled,
    # prevent_cse must.
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=cfg.unroll_layers)
  layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "drop_path": True},
                   length=cfg.n_layers,
                   unroll=cfg.n_layers if cfg.unroll_layers else 1, metadata_params={nn.PARTITION_NAME: "layers"})
  return layers(cfg, name="layers")


def final_norm(cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """The LayerNorm after the last block (with scale and bias when cfg.final_norm_params)."""
  if cfg.final_norm_params:
    return LayerNorm(cfg.layer_norm_eps, name="final_norm")(x)
  return layer_norm(x, cfg.layer_norm_eps)


def embedding_std(cfg: ModelConfig) -> float:
  return 1.0 if cfg.architecture == "tokenformer" and cfg.init == "fan_in" else 0.02


class LanguageModel(nn.Module):
  """tokens [batch, length] int → logits [batch, length, padded_vocab] float32.

  The layers are one `nn.scan` over a block, so parameters carry a leading "layers" axis and a 40-layer
  model compiles for training as fast as a 1-layer one (decoding unrolls the layers: `decode_layers`).

  Decoding: `apply(variables, tokens, cache, start)` runs `tokens` at positions start[b], start[b] + 1, ...
  against a KV cache, one {"k", "v"}: [batch, heads, cache_length, head_dim] per layer
  (`inference.decode.init_cache`), and returns (logits, updated cache); see `decode_layers` and
  `layers.cached_self_attention`.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: dict | None = None, start: jax.Array | None = None):
    cfg = self.cfg
    embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(embedding_std(cfg)), ("vocab", "embed")),
        (cfg.padded_vocab, cfg.d_model), jnp.float32)
    x = nn.with_logical_constraint(jnp.take(embedding, tokens, axis=0).astype(cfg.dtype), ACTIVATION_AXES)

    if cache is None:
      x, _ = block_stack(cfg)(x)
    else:
      x, cache = self.decode_layers(x, cache, start)

    x = final_norm(cfg, x)
    logits = jnp.einsum("bld,vd->blv", x, embedding.astype(cfg.dtype), preferred_element_type=jnp.float32)
    if cfg.logits_divide_by_sqrt_d:
      logits = logits / jnp.sqrt(cfg.d_model)
    if cfg.padded_vocab > cfg.vocab_size:   # ids past the tokenizer's never occur: keep them out of the softmax
      logits = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, logits, jnp.finfo(jnp.float32).min)
    logits = nn.with_logical_constraint(logits, LOGITS_AXES)
    return logits if cache is None else (logits, cache)

  def decode_layers(self, x: jax.Array, cache: list[dict], start: jax.Array) -> tuple[jax.Array, list[dict]]:
    """The same block as training's scan, applied layer by layer (unrolled) to layer i's slice of the scanned
    parameters and to cache[i], that layer's own buffers. Why not the scan: a scanned cache comes back as a new
    stacked array (the whole cache written again on every token), and a cache carried through the scan must be
    sliced to a layer, which XLA copies before attending over it. Separate buffers are updated in place (the
    step donates them) and read in place; each step reads every layer's cache once. Needs the parameters of an
    initialised model (`init` never decodes)."""
    block = BLOCKS[self.cfg.architecture](self.cfg, parent=None)
    stacked = nn.meta.unbox(self.variables["params"]["layers"])
    updated = []
    for i, layer_cache in enumerate(cache):
      x, layer_cache = block.apply({"params": jax.tree.map(lambda p: p[i], stacked)}, x, layer_cache, start)
      updated.append(layer_cache)
    return x, updated


def example_input(cfg: ModelConfig) -> jax.Array:
  """The smallest input `init` takes: two tokens."""
  return jnp.zeros((1, 2), jnp.int32)
