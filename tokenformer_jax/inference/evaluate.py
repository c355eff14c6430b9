"""Evaluate a model on a corpus: loss, perplexity and bits per byte, over a whole split or its first N tokens.

A corpus becomes the same token stream and [seq_len + 1] windows as in training (`data.pipeline`): an eos before
every document, each corpus token a target exactly once, context restarting at every window. The windows are
evaluated in order with the trainer's own jitted eval step (`train.steps.make_eval_step`), sharded over the mesh
like training, so evaluating a run's validation split reproduces the trainer's evaluation loss.

Bits per byte = total nats / (ln 2 × UTF-8 bytes of the evaluated text): comparable across tokenizers. The bytes
are counted from the evaluated target tokens themselves (each piece's UTF-8 length; eos and other special ids
count 0; SentencePiece's dummy "▁" before a document's first piece is not text), so the count also works for a
pre-tokenized corpus whose text is not at hand. Over a whole split it equals the documents' UTF-8 length.
"""
from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from tokenformer_jax import sharding
from tokenformer_jax.config import DataConfig
from tokenformer_jax.data import pipeline
from tokenformer_jax.data.errors import DataError
from tokenformer_jax.data.tokenizer import JsonTokenizer
from tokenformer_jax.train import steps

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_CHUNK = 1 << 20   # tokens per numpy pass when counting bytes


def eval_data(data: DataConfig, *, split: str = "validation", files: Sequence[str] = (), tfds_name: str = "",
              tfds_split: str = "validation", tfds_data_dir: str = "", store: str = "") -> tuple[DataConfig, str]:
  """(the data config, the split of its store) that hold the corpus to evaluate (see `eval_stream`): files and
  TFDS splits become the whole "train" split of a store of their own; a store keeps its splits."""
  if split not in ("train", "validation"):
    raise DataError(f"split must be 'train' or 'validation', got {split!r}")
  whole = dict(validation_files=(), validation_fraction=0.0, store="", mixture=(), mixture_stages=())
  if files:
    return data.replace(train_files=tuple(files), tfds_name="", **whole), "train"
  if tfds_name:
    return data.replace(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, tfds_train_split=tfds_split,
                        tfds_validation_split="", **whole), "train"
  if store:
    return data.replace(store=store, mixture=(), mixture_stages=()), split
  return data, split


def eval_stream(model, *, split: str = "validation", files: Sequence[str] = (), tfds_name: str = "",
                tfds_split: str = "validation", tfds_data_dir: str = "", store: str = "") -> pipeline.TokenStream:
  """The corpus to evaluate, as one token stream, read like every corpus through a token store (data.store):
  `files` (globs of .jsonl/.jsonl.gz/.txt, all of them), else one split of a TFDS dataset, else `split`
  ("train" or "validation") of the token store `store`, else that split of the run's own data config. Files and
  TFDS splits are prepared into the store cache once (data.prepare.cached_store), then read from there."""
  import jax
  tokenizer = model.tokenizer
  data, pick = eval_data(model.config.data, split=split, files=files, tfds_name=tfds_name, tfds_split=tfds_split,
                         tfds_data_dir=tfds_data_dir, store=store)
  train, validation = pipeline.load_token_streams(data, tokenizer, process_index=jax.process_index(),
                                                  process_count=jax.process_count())
  stream = train if pick == "train" else validation
  if stream.num_targets == 0:
    raise DataError(f"the {pick} split to evaluate is empty; evaluate other data with --files, --tfds_name "
                    "or --store")
  return stream


@functools.lru_cache(maxsize=4)
def _piece_bytes(tokenizer) -> tuple[np.ndarray, np.ndarray, bool]:
  """(UTF-8 bytes of each id, whether its piece starts with "▁", whether encoding adds a dummy "▁").

  SentencePiece: "▁" is a space, <0xNN> one byte, special ids none. A tokenizer.json with a byte-level BPE
  (GPT-NeoX's): each character of a vocabulary piece stands for one byte; added tokens count their text's bytes,
  special ones none.
  """
  special = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id}
  lengths = np.zeros(tokenizer.vocab_size, np.int64)
  leading_space = np.zeros(tokenizer.vocab_size, bool)
  if isinstance(tokenizer, JsonTokenizer):
    spec = json.loads(tokenizer.serialized_model())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
      raise DataError(f"bits per byte: {tokenizer.path} is not a byte-level BPE tokenizer.json, whose pieces' "
                      "bytes are known; use a SentencePiece model or a byte-level tokenizer.json")
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    for i in range(tokenizer.vocab_size):
      if i in added:
        lengths[i] = 0 if added[i].get("special") else len(added[i]["content"].encode("utf-8"))
      elif i not in special:
        lengths[i] = len(tokenizer.id_to_piece(i))
    return lengths, leading_space, False
  for i in range(tokenizer.vocab_size):
    piece = tokenizer.id_to_piece(i)
    if i in special:
      continue
    if _BYTE_PIECE.match(piece):
      lengths[i] = 1
    else:
      lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
      leading_space[i] = piece.startswith("\u2581")
  first = tokenizer.encode("a")
  dummy_prefix = bool(first) and tokenizer.id_to_piece(first[0]).startswith("\u2581")
  return lengths, leading_space, dummy_prefix


def count_bytes(stream: pipeline.TokenStream, num_targets: int, tokenizer) -> int:
  """UTF-8 bytes of the text behind the first `num_targets` targets of `stream` (stream[1 : num_targets + 1])."""
  lengths, leading_space, dummy_prefix = _piece_bytes(tokenizer)
  total = 0
  for start in range(0, num_targets, _CHUNK):
    stop = min(start + _CHUNK, num_targets)
    ids = np.asarray(stream.ids[start:stop + 1], np.int64)
    inputs, targets = ids[:-1], ids[1:]
    counted = lengths[targets]
    if dummy_prefix:
      counted = counted - ((inputs == tokenizer.eos_id) & leading_space[targets])
    total += int(counted.sum())
  return total


def evaluate(model, stream: pipeline.TokenStream, *, batch_size: int | None = None, max_tokens: int | None = None,
             progress: Callable[[dict], None] | None = None) -> dict:
  """Loss (nats per token), perplexity and bits per byte of `model` over `stream`'s windows in order: all of
  them, or the first ceil(max_tokens / seq_len). `batch_size` (default the run's global batch) is rounded up
  to a multiple of the data-parallel devices. `progress(partial result)` is called after every batch."""
  import jax
  cfg, mesh, tokenizer = model.config, model.mesh, model.tokenizer
  seq_len = cfg.data.seq_len
  windows = pipeline.Windows(stream, seq_len, tokenizer.pad_id)
  count = windows.num_real
  if max_tokens is not None:
    if max_tokens < 1:
      raise DataError(f"max_tokens must be positive, got {max_tokens}")
    count = min(count, -(-max_tokens // seq_len))
  if count == 0:
    raise DataError("nothing to evaluate: the corpus is empty")
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  multiple = math.lcm(data_parallel, jax.process_count())
  batch = -(-(batch_size or cfg.global_batch) // multiple) * multiple
  hosts, host = jax.process_count(), jax.process_index()
  eval_step = steps.make_eval_step(cfg.model, steps.TrainState(step=None, params=model.param_shardings,
                                                                 opt_state=None), mesh)
  num_batches = -(-count // batch)
  padding = {"tokens": np.full(seq_len + 1, tokenizer.pad_id, np.int32), "mask": np.zeros(seq_len, np.float32)}
  sums, started = steps.LossSums(), time.perf_counter()
  result = {}
  for b in range(num_batches):
    indices = [b * batch + r * hosts + host for r in range(batch // hosts)]
    rows = [windows[i] if i < count else padding for i in indices]
    host_batch = {k: np.stack([row[k] for row in rows]) for k in ("tokens", "mask")}
    sums.add(eval_step(model.params, sharding.to_global(host_batch, mesh)))
    result = _metrics(sums, None, time.perf_counter() - started, b + 1, num_batches)
    if progress is not None:
      progress(result)
  num_bytes = count_bytes(stream, int(round(sums.targets)), tokenizer)
  result = _metrics(sums, num_bytes, time.perf_counter() - started, num_batches, num_batches)
  result.update(windows=count, split_tokens=stream.num_targets, documents=stream.num_documents)
  return result


def evaluate_images(model, *, split: str = "test", batch_size: int | None = None) -> dict:
  """An image classifier on one split of its images ("test": the held-out 20%, or "train"), unaugmented, with the
  trainer's eval step: {"loss", "top1", "top5", "examples", "split", "seconds"}."""
  import jax
  from tokenformer_jax.data import images   # pylint: disable=g-import-not-at-top (the optional vision extra)
  cfg, mesh = model.config, model.mesh
  multiple = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
  batch = -(-(batch_size or cfg.global_batch) // multiple) * multiple
  batches = images.eval_batches(cfg.data, cfg.model.vision, global_batch=batch, split=split,
                                model_name=cfg.model.name, process_index=jax.process_index(),
                                process_count=jax.process_count())
  eval_step = steps.make_eval_step(cfg.model, steps.TrainState(step=None, params=model.param_shardings,
                                                                 opt_state=None), mesh)
  sums, started = steps.LossSums(), time.perf_counter()
  for host_batch in batches:
    sums.add(eval_step(model.params, sharding.to_global(host_batch, mesh)))
  return {"loss": sums.mean, **sums.rates, "examples": int(round(sums.targets)), "split": split,
          "seconds": time.perf_counter() - started}


def _metrics(sums: steps.LossSums, num_bytes: int | None, seconds: float, batches: int, num_batches: int) -> dict:
  total, targets, loss = sums.total, sums.targets, sums.mean
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "nats": total, "tokens": int(round(targets)),
         "seconds": seconds, "tokens_per_second": targets / max(seconds, 1e-9), "batches": batches,
         "num_batches": num_batches}
  if num_bytes is not None:
    out.update(bytes=num_bytes, bits_per_byte=total / (math.log(2) * num_bytes) if num_bytes else float("nan"))
  return out
