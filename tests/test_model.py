"""The TokenFormer LM and the dense baseline: growth invariance, causality, inert padding, sizes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import forward, initial_params, jit_next_token_loss, make_train_step, next_token_loss, text_batch
from tokenformer_jax.config import PROJECTIONS, ModelConfig, ParamTokens, count_params, load_config
from tokenformer_jax.model import abstract_params

TINY = load_config("experiments/tiny.py:tiny_tokenformer")
TINY_TRANSFORMER = load_config("experiments/tiny.py:tiny_transformer")
PAPER = load_config("experiments/paper.py:ALL")


def trained_looking(cfg, seed=0):
  """Initial params plus noise on every leaf, so nothing is at its init value (final norm included).
  Padding rows stay zero, as training keeps them (test_padding_rows_stay_zero_and_never_change_the_loss).
  The noise is numpy's: nothing to compile (the init is compiled once per parameter layout, helpers.py)."""
  leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, initial_params(cfg, seed)))
  rng = np.random.default_rng(seed + 1)
  noisy = jax.tree.unflatten(tree, [(x + 0.3 * np.std(x + 1e-3) * rng.standard_normal(x.shape)).astype(np.float32)
                                    for x in leaves])
  if cfg.architecture == "tokenformer":
    for p in PROJECTIONS:
      for v in noisy["layers"][p].values():
        v[:, cfg.tokens(p):] = 0
  return jax.tree.map(jnp.asarray, noisy)


def append_tokens(params, extra, seed):
  """Append `extra[p]` tokens to every Pattention p: zero keys, random values (paper §3.3)."""
  grown = jax.tree.map(lambda x: x, params)
  rng = np.random.default_rng(seed)
  for p in PROJECTIONS:
    layer = params["layers"][p]
    layers, _, d = layer["key_param_tokens"].shape
    new_values = rng.standard_normal((layers, extra[p], d)).astype(np.float32)
    grown["layers"][p] = {
        "key_param_tokens": jnp.concatenate([layer["key_param_tokens"], jnp.zeros((layers, extra[p], d))], 1),
        "value_param_tokens": jnp.concatenate([layer["value_param_tokens"], new_values], 1)}
  return grown


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["none", "rotary"])
def test_zero_key_growth_preserves_logits_only_with_fixed_scale(positions):
  cfg = TINY.replace(positions=positions)
  extra = {"query": 13, "key": 7, "value": 21, "output": 9, "ffn": 50}
  bigger = ParamTokens(**{p: cfg.tokens(p) + extra[p] for p in PROJECTIONS})
  params = trained_looking(cfg)
  grown = append_tokens(params, extra, seed=42)
  tokens = text_batch(4, 48, offset=1000)   # the shape test_causal uses: forward(cfg) compiles once for both

  logits = forward(cfg)({"params": params}, tokens)
  fixed_cfg = cfg.replace(param_tokens=bigger, norm_scale_tokens=cfg.param_tokens)
  fixed = forward(fixed_cfg)({"params": grown}, tokens)
  assert float(jnp.max(jnp.abs(fixed - logits))) <= 1e-5

  live_cfg = cfg.replace(param_tokens=bigger, norm_scale="live", norm_scale_tokens=cfg.param_tokens)
  live = forward(live_cfg)({"params": grown}, tokens)
  assert float(jnp.max(jnp.abs(live - logits))) > 0.05   # the authors' sqrt(live n) changes the function


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [TINY, TINY.replace(positions="rotary"), TINY_TRANSFORMER],
                         ids=["tokenformer", "tokenformer_rotary", "transformer"])
def test_causal(cfg):
  params = trained_looking(cfg)
  tokens = text_batch(4, 48, offset=5000)   # test_zero_key_growth's shape: the same compiled forward
  changed = tokens.copy()
  t = 17
  changed[:, t + 1] = (changed[:, t + 1] + 1) % 256
  a = forward(cfg)({"params": params}, tokens)   # one compilation, two calls
  b = forward(cfg)({"params": params}, changed)
  assert float(jnp.max(jnp.abs(a[:, : t + 1] - b[:, : t + 1]))) == 0.0
  assert float(jnp.max(jnp.abs(a[:, t + 1:] - b[:, t + 1:]))) > 1e-3


def unpad(params, cfg):
  """The same model stored without padding rows."""
  out = jax.tree.map(lambda x: x, params)
  for p in PROJECTIONS:
    out["layers"][p] = {k: v[:, : cfg.tokens(p)] for k, v in params["layers"][p].items()}
  return out


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_padding_rows_stay_zero_and_never_change_the_loss(normalization):
  padded_cfg = TINY.replace(param_tokens=ParamTokens(37, 30, 29, 33, 141), token_multiple=16,
                            normalization=normalization)
  plain_cfg = padded_cfg.replace(token_multiple=1)
  padded = initial_params(padded_cfg, seed=3)   # the normalisation draws nothing: one init for the three
  plain = unpad(padded, padded_cfg)
  assert padded["layers"]["query"]["key_param_tokens"].shape[1] == 48
  tx = optax.adamw(3e-3, weight_decay=0.1)
  padded_step, plain_step = make_train_step(padded_cfg, tx), make_train_step(plain_cfg, tx)
  padded_opt, plain_opt = jax.jit(tx.init)(padded), jax.jit(tx.init)(plain)
  for i in range(6):
    tokens = text_batch(4, 33, offset=20000 + 200 * i)
    padded, padded_opt, padded_loss = padded_step(padded, padded_opt, tokens)
    plain, plain_opt, plain_loss = plain_step(plain, plain_opt, tokens)
    np.testing.assert_allclose(padded_loss, plain_loss, rtol=1e-6)
  for p in PROJECTIONS:
    n = padded_cfg.tokens(p)
    for name, leaf in padded["layers"][p].items():
      assert np.all(np.asarray(leaf[:, n:]) == 0), f"{p}/{name}: padding rows moved"
      # Adam divides by sqrt(v): last-bit gradient differences (another matmul shape) grow to ~1e-5 here.
      np.testing.assert_allclose(leaf[:, :n], plain["layers"][p][name], rtol=1e-4, atol=5e-5)


# Non-embedding + V·d with V = 50,304, from REFERENCE.md (itself from the paper's formula).
REFERENCE_COUNTS = {"ladder_124m": 123.5e6, "ladder_354m": 354.2e6, "ladder_757m": 753.8e6,
                    "ladder_1_4b": 1.31e9, "pile_150m": 151.9e6, "pile_450m": 454e6, "pile_900m": 903e6,
                    "pile_1_5b": 1.59e9}


@pytest.mark.parametrize("cfg", [c for c in PAPER if c.name in REFERENCE_COUNTS], ids=lambda c: c.name)
def test_paper_parameter_counts(cfg):
  assert cfg.padded_vocab == 50304
  logical = count_params(cfg, storage=False)["total"]
  assert abs(logical / REFERENCE_COUNTS[cfg.name] - 1) < 0.01


@pytest.mark.parametrize("cfg", PAPER + (TINY, TINY_TRANSFORMER), ids=lambda c: c.name)
def test_analytic_count_equals_initialised_model(cfg):
  shapes = abstract_params(cfg)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count_params(cfg)["total"]


def test_transformer_baselines_match_gpt2_sizes():
  # GPT-2 small/medium/large/xl: 124M, 355M, 774M, 1.56B with their 50,257 vocabulary; ours pads 50,304.
  sizes = {c.name: count_params(c)["total"] for c in PAPER if c.architecture == "transformer"}
  for name, gpt2 in {"transformer_124m": 124.4e6, "transformer_354m": 354.8e6,
                     "transformer_757m": 774.0e6, "transformer_1_4b": 1557.6e6}.items():
    assert abs(sizes[name] / gpt2 - 1) < 0.01, (name, sizes[name])
  # The Ladder-124M TokenFormer and the GPT-2-124M Transformer have the same non-embedding size (±0.2%).
  tokenformer, transformer = (count_params(load_config(f"experiments/paper.py:{n}"))["non_embedding"]
                              for n in ("ladder_124m", "transformer_124m"))
  assert abs(tokenformer / transformer - 1) < 0.002


@functools.cache   # the remat="none" gradients: computed once for the three remat policies
def gradients(cfg):
  grad = jax.jit(jax.grad(next_token_loss, argnums=1), static_argnums=0)
  return grad(cfg, trained_looking(TINY), text_batch(2, 33, offset=300))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_math(remat):
  base, rematted = gradients(TINY), gradients(TINY.replace(remat=remat))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
  params = trained_looking(TINY)
  tokens = text_batch(2, 65, offset=700)
  full = jit_next_token_loss(TINY, params, tokens)
  half = jit_next_token_loss(TINY.replace(dtype="bfloat16"), params, tokens)
  assert params["embedding"].dtype == jnp.float32
  assert abs(float(half) / float(full) - 1) < 0.02


def test_config_errors_are_sentences():
  with pytest.raises(ValueError, match="not divisible by n_heads"):
    ModelConfig(d_model=100, n_heads=12, param_tokens=ParamTokens.uniform(8, 8))
  with pytest.raises(ValueError, match="normalization must be one of"):
    TINY.replace(normalization="relu")
  with pytest.raises(ValueError, match="needs param_tokens"):
    ModelConfig(name="x")
  with pytest.raises(ValueError, match="has no config named 'nope'"):
    load_config("experiments/tiny.py:nope")


@pytest.mark.slow
def test_padded_vocabulary_ids_get_no_probability():
  cfg = load_config("experiments/tiny.py:tiny_tokenformer").replace(vocab_size=250)   # padded to 256
  params = trained_looking(cfg)
  probabilities = jax.nn.softmax(forward(cfg)({"params": params}, text_batch(2, 16) % 250), axis=-1)
  assert float(jnp.max(probabilities[..., 250:])) == 0.0
  np.testing.assert_allclose(jnp.sum(probabilities[..., :250], axis=-1), 1.0, rtol=1e-5)
