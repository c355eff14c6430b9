"""Data: tokenizers (SentencePiece or tokenizer.json), document sources (JSON lines, text, TFDS), and the grain pipeline.

    from tokenformer_jax.data import DataError, Tokenizer, make_eval_batches, make_train_iterator

Names other than DataError load on first use, so `python -m tokenformer_jax.data.tokenizer` stays light.
"""
import importlib

from tokenformer_jax.data.errors import DataError

_LAZY = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "make_train_iterator": "pipeline", "make_eval_batches": "pipeline", "steps_per_epoch": "pipeline",
}
__all__ = ["DataError", "Tokenizer", "make_eval_batches", "make_train_iterator", "steps_per_epoch",
           "train_tokenizer"]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"tokenformer_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
