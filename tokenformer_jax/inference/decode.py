"""Sampling with a KV cache: prefill a batch of prompts in one forward pass, then one token per step.

Prompts of different lengths are RIGHT-padded to a bucket (a power of two, at least MIN_BUCKET, at most the
model's max_seq_len) and prefilled together; row b's real length is lengths[b] and its first new token is
sampled from the logits at lengths[b] - 1. Each decode step feeds every row's last token at that row's own
position (lengths[b] + t) into the cache, so rows of different lengths advance together; a query at position p
sees cache slots 0..p only (`layers.cached_self_attention`), which hold that row's real tokens.

Compilation: the prefill compiles once per (batch, bucket, cache length) and the step once per (batch, cache
length); the cache length is a power-of-two bucket of bucket + max_new_tokens, capped at max_seq_len.
Temperature, top-k, top-p and the seed are traced values: changing them recompiles nothing.

The cache is one {"k", "v"}: [batch, heads, cache_length, head_dim] per layer, separate buffers that the step
(which donates them) updates and reads in place, so a step's cost grows with the cache only by reading it once
(`LanguageModel.decode_layers`). Each carries the logical axes ("batch", "heads", "length", None) and is laid out
by the sharding table's activation rules: the batch over the data-parallel mesh axes, the heads over "tensor".
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from tokenformer_jax import sharding
from tokenformer_jax.config import ModelConfig
from tokenformer_jax.model import LanguageModel
from tokenformer_jax.model.layers import CACHE_AXES

MIN_BUCKET = 16
CACHE_SPEC = P(*CACHE_AXES)   # each layer's buffer


def bucket_length(n: int, minimum: int = MIN_BUCKET, maximum: int | None = None) -> int:
  """The smallest power of two ≥ max(n, minimum), capped at `maximum`."""
  length = max(minimum, 1 << max(n - 1, 0).bit_length())
  return min(length, maximum) if maximum else length


def cache_sharding(mesh: Mesh):
  """The sharding of each layer's cache buffer on `mesh`."""
  return nn.logical_to_mesh_sharding(CACHE_SPEC, mesh, sharding.ACTIVATION_RULES)


def init_cache(cfg: ModelConfig, batch: int, length: int, mesh: Mesh | None = None) -> list[dict]:
  """An empty KV cache for `batch` rows of up to `length` positions: a list of one {"k", "v"} per layer, placed by
  the sharding table on `mesh`."""
  shape = (batch, cfg.n_heads, length, cfg.head_dim)
  make = lambda: [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.n_layers)]
  if mesh is None:
    return make()
  placed = cache_sharding(mesh)
  return jax.jit(make, out_shardings=[{"k": placed, "v": placed}] * cfg.n_layers)()


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """One token per row of logits [batch, vocab]: argmax when temperature is 0, else a draw from the softmax of
  logits / temperature restricted to the top_k largest (0: all) and to the smallest set whose probability
  reaches top_p (1: all)."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  vocab = logits.shape[-1]
  ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p   # the first always stays
  threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  drawn = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def decode_functions(cfg: ModelConfig, mesh: Mesh | None = None):
  """(prefill, step), jitted; each returns (sampled token [batch], its logits [batch, vocab], cache)."""
  model = LanguageModel(cfg)

  def on_mesh(fn):
    if mesh is None:
      return fn
    def wrapped(*args):
      with sharding.activation_sharding(mesh):
        return fn(*args)
    return wrapped

  def prefill(params, cache, tokens, lengths, key, temperature, top_k, top_p):
    logits, cache = model.apply({"params": params}, tokens, cache, jnp.zeros_like(lengths))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample(last, key, temperature, top_k, top_p), last, cache

  def step(params, cache, token, position, key, temperature, top_k, top_p):
    logits, cache = model.apply({"params": params}, token[:, None], cache, position)
    return sample(logits[:, 0], key, temperature, top_k, top_p), logits[:, 0], cache

  return jax.jit(on_mesh(prefill), donate_argnums=1), jax.jit(on_mesh(step), donate_argnums=1)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]          # the new tokens of each prompt (without the eos it stopped at)
  finish: list[str]                # "eos", "length" (max_new_tokens), "max_seq_len" or "stop"
  logits: list[np.ndarray] | None  # [new tokens, padded_vocab] per prompt, float32, with return_logits
  prefill_seconds: float
  decode_seconds: float
  texts: list[str] | None = None


def _check(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  if not prompts:
    raise ValueError("no prompts given")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f"prompt {i + 1} is empty")
    if len(prompt) > cfg.max_seq_len:
      raise ValueError(f"prompt {i + 1} has {len(prompt)} tokens but the model's max_seq_len is {cfg.max_seq_len}; "
                       "shorten it")


def prompt_batch(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 mesh: Mesh | None) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens [batch, bucket], lengths [batch], cache length): the prompts padded to a bucket's length, the batch
  rounded up to the data-parallel size (the extra rows repeat prompt 1 and are dropped), the cache long enough for
  the longest prompt and `max_new_tokens` (both bucketed, so that few lengths compile)."""
  rows = len(prompts)
  data_parallel = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  batch = -(-rows // data_parallel) * data_parallel
  lengths = np.array([len(p) for p in prompts] + [len(prompts[0])] * (batch - rows), np.int32)
  bucket = bucket_length(int(lengths.max()), maximum=cfg.max_seq_len)
  cache_length = max(bucket, bucket_length(bucket + max_new_tokens - 1, maximum=cfg.max_seq_len))
  tokens = np.zeros((batch, bucket), np.int32)
  for i in range(batch):
    tokens[i, :lengths[i]] = prompts[i if i < rows else 0]
  return tokens, lengths, cache_length


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             mesh: Mesh | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, return_logits: bool = False,
             on_step: Callable[[int, list[list[int]]], Sequence[int] | None] | None = None) -> Generation:
  """Continue each prompt (a sequence of token ids) by up to `max_new_tokens` tokens, stopping a row at
  `eos_id` or at the model's max_seq_len. Greedy unless temperature > 0.

  `on_step(t, new_tokens)` is called after every step with each row's new tokens so far (for streaming); it
  may return rows to stop (finish "stop"), e.g. at a stop string.
  """
  _check(cfg, prompts, max_new_tokens)
  rows = len(prompts)
  tokens, lengths, cache_length = prompt_batch(cfg, prompts, max_new_tokens, mesh)
  batch = len(tokens)
  prefill, step = decode_functions(cfg, mesh)
  sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  key = jax.random.key(seed)
  start = time.perf_counter()
  cache = init_cache(cfg, batch, cache_length, mesh)
  token, logits, cache = prefill(params, cache, tokens, lengths, jax.random.fold_in(key, 0), *sampling)
  token_host = np.asarray(token)
  prefill_seconds = time.perf_counter() - start

  new = [[] for _ in range(rows)]
  kept_logits = [[] for _ in range(rows)] if return_logits else None
  finish = ["length"] * rows
  active = np.ones(rows, bool)
  position = lengths.copy()   # where each row's newest token sits
  start = time.perf_counter()
  for t in range(max_new_tokens):
    if return_logits:
      logits_host = np.asarray(logits)
    for i in np.flatnonzero(active):
      if eos_id is not None and token_host[i] == eos_id:
        active[i], finish[i] = False, "eos"
        continue
      new[i].append(int(token_host[i]))
      if return_logits:
        kept_logits[i].append(logits_host[i])
    if on_step is not None:
      for i in on_step(t, new) or ():
        if active[i]:
          active[i], finish[i] = False, "stop"
    room = position[:rows] < cache_length
    for i in np.flatnonzero(active & ~room):
      active[i], finish[i] = False, "max_seq_len"
    if t == max_new_tokens - 1 or not active.any():
      break
    token, logits, cache = step(params, cache, token, position, jax.random.fold_in(key, t + 1), *sampling)
    token_host = np.asarray(token)
    position = np.minimum(position + 1, cache_length)
  decode_seconds = time.perf_counter() - start
  if return_logits:
    kept_logits = [np.stack(rows_logits) if rows_logits else np.zeros((0, cfg.padded_vocab), np.float32)
                   for rows_logits in kept_logits]
  return Generation(new, finish, kept_logits, prefill_seconds, decode_seconds)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """A prompt as the model saw documents in training: eos (the separator before every document), then text."""
  return [tokenizer.eos_id] + tokenizer.encode(text)


def generate_text(model, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                  on_text: Callable[[int, str], None] | None = None, max_prompt_tokens: int | None = None,
                  **sampling) -> Generation:
  """`generate` for text prompts with a LoadedModel: each completion stops at eos, max_new_tokens, or the
  first of the `stop` strings (cut before it). `on_text(row, new_text)` streams each row's text as it grows.
  `max_prompt_tokens`: keep only the last this many tokens of a longer prompt (default: refuse it)."""
  tokenizer = model.tokenizer
  ids = [encode_prompt(tokenizer, text) for text in prompts]
  if max_prompt_tokens:
    ids = [prompt[-max_prompt_tokens:] for prompt in ids]
  shown = [""] * len(prompts)
  prompt_texts = [tokenizer.decode(prompt) for prompt in ids]

  def completion(i: int, tokens: list[int]) -> str:
    # Decoded after its prompt: SentencePiece drops the leading space of a text's first piece.
    whole = tokenizer.decode(ids[i] + tokens)
    return whole[len(prompt_texts[i]):] if whole.startswith(prompt_texts[i]) else tokenizer.decode(tokens)

  def on_step(t, new):
    stopped = []
    for i, tokens in enumerate(new):
      full = completion(i, tokens)
      text = _cut(full, stop)
      if len(text) < len(full):
        stopped.append(i)
      elif text.endswith("\ufffd"):   # a character split over byte pieces: wait for the rest
        text = text[:-1]
      if on_text is not None and len(text) > len(shown[i]) and text.startswith(shown[i]):
        on_text(i, text[len(shown[i]):])
        shown[i] = text
    return stopped

  result = generate(model.model, model.params, ids, max_new_tokens=max_new_tokens, mesh=model.mesh,
                    eos_id=tokenizer.eos_id, on_step=on_step if on_text is not None or stop else None, **sampling)
  result.texts = [_cut(completion(i, tokens), stop) for i, tokens in enumerate(result.tokens)]
  return result


def _cut(text: str, stop: Sequence[str]) -> str:
  cuts = [text.find(s) for s in stop if s and s in text]
  return text[:min(cuts)] if cuts else text
