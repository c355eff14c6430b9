"""An independent numpy (float64) implementation of the authors' GPT-NeoX TokenFormer forward pass.

Written from REFERENCE.md ("The released checkpoints") only, on the file's own tensor names and its
config.json, and in the authors' [seq, batch, hidden] layout: pre-norm blocks with parameter-free LayerNorms;
query, key and value each a Pattention (heads contiguous slices of d); NeoX rotate-half rotary on the first
int(rotary_pct · head_dim) dims of each head, base 10000, positions 0..T-1; causal softmax attention scaled by
1/sqrt(head_dim); the `proj` Pattention; the `mlp` Pattention; Θ = gelu(A / ‖A‖₂ · sqrt(live n)) with the
exact GeLU and no epsilon; final LayerNorm with weight and bias, eps 1e-5; logits = h · Eᵀ over every row.
"""
import math

import numpy as np

from numpy_reference import gelu


def layer_norm(x, weight=None, bias=None, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  if weight is not None:
    y = y * weight + bias
  return y


def pattention(x, sd, prefix):
  keys, values = sd[f"{prefix}.key_param_tokens"], sd[f"{prefix}.value_param_tokens"]
  a = x @ keys.T
  n = a.shape[-1]                                   # the live token count, as the authors' code
  return gelu(a / np.linalg.norm(a, axis=-1, keepdims=True) * math.sqrt(n)) @ values


def rotary(x, rotary_ndims, base=10000.0):
  """x: [seq, batch, heads, head_dim]; rotate-half on the first rotary_ndims dims; positions along axis 0."""
  seq = x.shape[0]
  inv_freq = 1.0 / base ** (np.arange(0, rotary_ndims, 2, dtype=np.float64) / rotary_ndims)
  freqs = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]     # [seq, rotary_ndims/2]
  emb = np.concatenate([freqs, freqs], axis=-1)                             # [seq, rotary_ndims]
  cos, sin = np.cos(emb)[:, None, None, :], np.sin(emb)[:, None, None, :]
  x_rot, x_pass = x[..., :rotary_ndims], x[..., rotary_ndims:]
  half = rotary_ndims // 2
  rotate_half = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  return np.concatenate([x_rot * cos + rotate_half * sin, x_pass], axis=-1)


def forward(sd, config, tokens):
  """tokens [batch, seq] int → logits [batch, seq, padded vocab] (float64)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  layers, d, heads = config["num_layers"], config["hidden_size"], config["num_attention_heads"]
  head_dim = d // heads
  rotary_ndims = int(head_dim * config["rotary_pct"])
  embedding = sd["sequential.0.word_embeddings.weight"]
  x = embedding[tokens].transpose(1, 0, 2)          # [seq, batch, d]
  seq, batch = x.shape[:2]
  mask = np.tril(np.ones((seq, seq), bool))
  for i in range(layers):
    p = f"sequential.{i + 2}"
    h = layer_norm(x)
    q, k, v = (pattention(h, sd, f"{p}.attention.{m}").reshape(seq, batch, heads, head_dim)
               for m in ("query", "key", "value"))
    if config["pos_emb"] == "rotary":
      q, k = rotary(q, rotary_ndims), rotary(k, rotary_ndims)
    scores = np.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(head_dim)
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bhst,tbhd->sbhd", weights, v).reshape(seq, batch, d)
    x = x + pattention(context, sd, f"{p}.attention.proj")
    x = x + pattention(layer_norm(x), sd, f"{p}.mlp")
  final = f"sequential.{layers + 3}.norm"
  x = layer_norm(x, sd[f"{final}.weight"], sd[f"{final}.bias"])
  return (x @ embedding.T).transpose(1, 0, 2)
