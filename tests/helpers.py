"""Shared test fixtures: the shipped corpus as bytes, and a tiny AdamW training step."""
import functools
import gzip
import json
import pathlib

import jax
import numpy as np
import optax

from tokenformer_jax.model import LanguageModel

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "tokenformer_jax/data/corpus/python-docs-slice.jsonl.gz"


@functools.cache
def corpus_bytes() -> np.ndarray:
  """The shipped corpus as byte tokens (vocabulary 256): real English text without a tokenizer."""
  with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
    text = "".join(json.loads(line)["text"] for line in f)
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def text_batch(batch: int, length: int, offset: int = 0) -> np.ndarray:
  data = corpus_bytes()
  return np.stack([data[offset + i * length: offset + (i + 1) * length] for i in range(batch)])


def next_token_loss(cfg, params, tokens):
  logits = LanguageModel(cfg).apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(cfg, tx):
  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(functools.partial(next_token_loss, cfg))(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step
