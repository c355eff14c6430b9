"""An lm-evaluation-harness model: `lm_eval --model tokenformer_jax --model_args checkpoint=RUN[/STEP],...`.

Importing this module registers the model "tokenformer_jax" in lm_eval's registry (lm_eval finds models only
through that registry, filled on import; it has no plugin entry points), which is what
`python -m tokenformer_jax.cli.lm_eval` does before handing over to lm_eval's own command line.

model_args: checkpoint (required), step, batch_size (requests scored per forward pass; default 8),
max_length (tokens of context; default the model's max_seq_len), tokenizer (another path; must match).

Text is tokenized as in training: an eos before the context (the separator the model saw before every document).
A (context, continuation) pair is encoded together and split after the context's tokens, so the continuation is
tokenized as it would be in running text; a context's trailing spaces move to the continuation. Contexts longer
than max_length lose their oldest tokens. loglikelihood_rolling scores a text in max_length windows of the
evaluation pipeline's kind (context restarts at each window). Requests are sorted by length and batched into
power-of-two length buckets, so a task compiles a handful of shapes. In a job of several processes every process
runs the same requests in lockstep (each batch is split over the mesh like a training batch; the scores come back
replicated), as the trainer's in-training lm_eval tasks do (train/evals.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (lm_eval loads its built-in models only into an empty registry: load them first)
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from tokenformer_jax import sharding
from tokenformer_jax.inference.decode import bucket_length, generate_text
from tokenformer_jax.inference.loading import LoadedModel, load_model
from tokenformer_jax.model import LanguageModel


@functools.lru_cache(maxsize=4)
def _scorer(cfg, mesh):
  """jit(params, tokens [batch, T + 1]) → (log p(tokens[:, t + 1] | tokens[:, :t + 1]), whether it is the argmax),
  both [batch, T], replicated: every process of a multi-host job gets them (each passes the same whole batch)."""
  model = LanguageModel(cfg)

  def score(params, tokens):
    with sharding.activation_sharding(mesh):
      logits = model.apply({"params": params}, tokens[:, :-1])
    targets = tokens[:, 1:]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets

  return jax.jit(score, out_shardings=sharding.replicated(mesh))


@register_model("tokenformer_jax")
class TokenFormerLM(LM):
  """lm_eval's LM API over a tokenformer_jax checkpoint (or an already loaded model: `TokenFormerLM(model=...)`)."""

  def __init__(self, checkpoint: str | None = None, step: int | str | None = None, batch_size: int | str = 8,
               max_length: int | str | None = None, tokenizer: str | None = None, model: LoadedModel | None = None,
               **unused):   # lm_eval also passes device, max_batch_size, ...: meaningless here
    super().__init__()
    if model is None:
      if not checkpoint:
        raise ValueError("model_args needs checkpoint=RUN or checkpoint=RUN/STEP")
      model = load_model(checkpoint, step=int(step) if step not in (None, "") else None, tokenizer=tokenizer)
    self.model = model
    self.tokenizer = model.tokenizer
    self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
    self.max_length = min(int(max_length or model.model.max_seq_len), model.model.max_seq_len)
    data_parallel = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    self.batch_size = -(-self.batch_size // data_parallel) * data_parallel

  # Scoring ----------------------------------------------------------------------------------------------
  def score(self, sequences: list[tuple[list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(Σ log p of the last n tokens given the ones before, whether each was the greedy choice) for each
    (tokens, n), tokens including their context (left-truncated to max_length + 1)."""
    cfg, pad = self.model.model, self.tokenizer.pad_id
    scorer = _scorer(cfg, self.model.mesh)
    sequences = [(ids[-(self.max_length + 1):], min(n, len(ids[-(self.max_length + 1):]) - 1)) for ids, n in sequences]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(sequences)
    batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    for batch in tqdm(batches, desc="tokenformer_jax", disable=disable_tqdm):
      width = bucket_length(max(len(sequences[i][0]) for i in batch) - 1, maximum=self.max_length) + 1
      tokens = np.full((self.batch_size, width), pad, np.int32)
      for row, i in enumerate(batch):
        ids = sequences[i][0]
        tokens[row, :len(ids)] = ids
      rows = jax.make_array_from_callback(tokens.shape, sharding.batch_sharding(self.model.mesh),
                                          lambda index, tokens=tokens: tokens[index])   # split like a train batch
      chosen, greedy = jax.device_get(scorer(self.model.params, rows))
      for row, i in enumerate(batch):
        ids, n = sequences[i]
        span = slice(len(ids) - 1 - n, len(ids) - 1)
        results[i] = (float(np.sum(chosen[row, span], dtype=np.float64)), bool(np.all(greedy[row, span])))
    return results

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
    """(eos + tokens of context + continuation, number of continuation tokens)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = self.tokenizer.encode(context) if context else []
    whole = self.tokenizer.encode(context + continuation)
    if whole[:len(context_ids)] != context_ids:   # merged across the boundary: score the continuation alone
      whole = context_ids + self.tokenizer.encode(continuation)
    return [self.tokenizer.eos_id] + whole, len(whole) - len(context_ids)

  # lm_eval's API ----------------------------------------------------------------------------------------
  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*request.args) for request in requests]
    return self.score(pairs, disable_tqdm=disable_tqdm)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      ids = [self.tokenizer.eos_id] + self.tokenizer.encode(text)
      for start in range(0, len(ids) - 1, self.max_length):
        window = ids[start:start + self.max_length + 1]
        windows.append((window, len(window) - 1))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (log_prob, _) in zip(owners, self.score(windows, disable_tqdm=disable_tqdm)):
      totals[owner] += log_prob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items(), key=str)), []).append(index)
    out = [""] * len(requests)
    bar = tqdm(total=len(requests), desc="tokenformer_jax generate", disable=disable_tqdm)
    for indices in groups.values():
      kwargs = dict(requests[indices[0]].args[1])
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        result = generate_text(self.model, [requests[i].args[0] for i in chunk], max_new_tokens=max_new,
                               stop=until, temperature=temperature,
                               max_prompt_tokens=max(self.model.model.max_seq_len - max_new, 1))
        for i, text in zip(chunk, result.texts):
          out[i] = text
        bar.update(len(chunk))
    bar.close()
    return out

