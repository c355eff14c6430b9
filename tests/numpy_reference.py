"""An independent numpy implementation of the paper's Eq. 4, written from the paper and REFERENCE.md only."""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x, approximate=False):
  if approximate:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def pattention(x, keys, values, normalization="l2_norm_gelu", n=None, approximate=False):
  """Θ(X·K_Pᵀ)·V_P in float64; n defaults to the live row count, as in the authors' code."""
  x, keys, values = (np.asarray(a, np.float64) for a in (x, keys, values))
  n = keys.shape[0] if n is None else n
  a = x @ keys.T
  if normalization == "l2_norm_gelu":
    theta = gelu(a / np.linalg.norm(a, axis=-1, keepdims=True) * math.sqrt(n), approximate)
  elif normalization == "gelu_l2_norm":
    g = gelu(a, approximate)
    theta = g / np.linalg.norm(g, axis=-1, keepdims=True) * math.sqrt(n)
  elif normalization == "gelu_l1_norm":
    g = gelu(a, approximate)
    theta = g / np.abs(g).sum(axis=-1, keepdims=True) * n
  elif normalization == "softmax":
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    theta = e / e.sum(axis=-1, keepdims=True) * n
  else:
    raise ValueError(normalization)
  return theta @ values
