"""Pattention against an independent numpy Eq. 4, its padding, its scale, and its numerics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from tokenformer_jax.model.pattention import Pattention, pattention

NORMALIZATIONS = ["l2_norm_gelu", "gelu_l2_norm", "softmax", "gelu_l1_norm"]


def random_problem(seed=0, batch=3, length=5, d_in=24, d_out=16, n=40):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, d_in)).astype(np.float32)
  keys = (rng.normal(size=(n, d_in)) / np.sqrt(d_in)).astype(np.float32)
  values = (rng.normal(size=(n, d_out)) / np.sqrt(n)).astype(np.float32)   # the model's value init
  return x, keys, values


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("approximate", [False, True])
def test_matches_numpy_eq4(normalization, approximate):
  x, keys, values = random_problem()
  got = pattention(x, keys, values, normalization=normalization, approximate_gelu=approximate)
  want = ref.pattention(x, keys, values, normalization, approximate=approximate)
  assert np.max(np.abs(np.asarray(got) - want)) <= 1e-5


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_fixed_scale_vs_live_scale(normalization):
  # A fixed n_scale is the paper's App. B; n_scale=None reproduces the authors' code (sqrt of the live n).
  x, keys, values = random_problem(seed=1)
  fixed = pattention(x, keys, values, normalization=normalization, n_scale=17)
  live = pattention(x, keys, values, normalization=normalization)
  np.testing.assert_allclose(fixed, ref.pattention(x, keys, values, normalization, n=17), atol=1e-5)
  np.testing.assert_allclose(live, ref.pattention(x, keys, values, normalization, n=40), atol=1e-5)
  assert np.max(np.abs(np.asarray(fixed) - np.asarray(live))) > 0.1


@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm", "gelu_l1_norm"])
def test_zero_keys_preserve_output_with_fixed_scale_only(normalization):
  x, keys, values = random_problem(seed=2)
  rng = np.random.default_rng(3)
  grown_keys = np.concatenate([keys, np.zeros((25, keys.shape[1]), np.float32)])
  grown_values = np.concatenate([values, rng.normal(size=(25, values.shape[1])).astype(np.float32)])
  old = pattention(x, keys, values, normalization=normalization)
  fixed = pattention(x, grown_keys, grown_values, normalization=normalization, n_scale=40)
  live = pattention(x, grown_keys, grown_values, normalization=normalization)
  assert np.max(np.abs(np.asarray(fixed) - np.asarray(old))) <= 1e-6
  assert np.max(np.abs(np.asarray(live) - np.asarray(old))) > 0.1   # sqrt(65/40) rescales every score


def test_softmax_is_stable_for_large_scores():
  x, keys, values = random_problem(seed=4)
  x = x * 1000.0   # exp of unshifted scores would overflow float32
  got = np.asarray(pattention(x, keys, values, normalization="softmax"))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref.pattention(x, keys, values, "softmax"), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_all_zero_scores_give_zero_output_and_finite_gradients(normalization):
  _, keys, values = random_problem(seed=5)
  x = np.zeros((2, 3, keys.shape[1]), np.float32)
  loss = lambda x, k, v: jnp.sum(pattention(x, k, v, normalization=normalization) ** 2)
  out = pattention(x, keys, values, normalization=normalization)
  if normalization != "softmax":   # softmax of equal scores is uniform, not zero
    assert np.all(np.asarray(out) == 0)
  grads = jax.grad(loss, argnums=(0, 1, 2))(x, keys, values)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_bfloat16_compute_normalises_in_float32():
  # bf16 inputs: the result is a bf16 rounding of the float32 computation, not a bf16 norm gone wrong.
  x, keys, values = random_problem(seed=6, n=512)
  got = pattention(jnp.asarray(x, jnp.bfloat16), keys, values)
  assert got.dtype == jnp.bfloat16
  want = ref.pattention(x, keys, values)
  rel = np.linalg.norm(np.asarray(got, np.float32) - want) / np.linalg.norm(want)
  assert rel < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_module_padding_rows_are_inert(normalization):
  x = np.random.default_rng(7).normal(size=(2, 6, 32)).astype(np.float32)
  padded = Pattention(n_tokens=37, n_storage=48, d_out=32, normalization=normalization)
  params = padded.init(jax.random.key(0), x)["params"]
  keys, values = params["key_param_tokens"].value, params["value_param_tokens"].value
  assert keys.shape == (48, 32) and values.shape == (48, 32)
  assert np.all(np.asarray(keys[37:]) == 0) and np.all(np.asarray(values[37:]) == 0)
  assert np.all(np.asarray(keys[:37]) != 0)
  out = padded.apply({"params": params}, x)
  np.testing.assert_allclose(out, ref.pattention(x, keys[:37], values[:37], normalization), atol=1e-5)

  def loss(p):
    return jnp.sum(jnp.sin(padded.apply({"params": p}, x)))
  grads = jax.grad(loss)(params)
  for name in ("key_param_tokens", "value_param_tokens"):
    g = np.asarray(grads[name].value)
    assert np.all(g[37:] == 0), f"{name}: padded rows got gradient"
    assert np.any(g[:37] != 0)


@pytest.mark.slow
def test_module_logical_axes_and_init_statistics():
  module = Pattention(n_tokens=4096, d_out=64)
  variables = module.init(jax.random.key(1), jnp.zeros((1, 256)))
  keys = variables["params"]["key_param_tokens"]
  values = variables["params"]["value_param_tokens"]
  assert keys.names == ("param_tokens", "embed") and values.names == ("param_tokens", "embed")
  # Fan-in init of the authors' JAX code: keys std 1/sqrt(d_in), values std 1/sqrt(n).
  assert abs(float(jnp.std(keys.value)) - 1 / 16) < 0.002
  assert abs(float(jnp.std(values.value)) - 1 / 64) < 0.0005
