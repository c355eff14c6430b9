"""The authors' GPT-NeoX TokenFormer checkpoints ↔ this model: config keys, tensor names, and the strict mapping.

Their `pytorch_model.bin` (REFERENCE.md, "The released checkpoints") is a flattened pipeline of L layers:

    sequential.0.word_embeddings.weight                                  [V_padded, d]  (logits tied to it)
    sequential.{i+2}.attention.{query,key,value,proj}.{key,value}_param_tokens    [n_attn, d]   i = 0..L-1
    sequential.{i+2}.mlp.{key,value}_param_tokens                                 [n_ffn, d]
    sequential.{L+3}.norm.{weight,bias}                                  [d]

Here the layers are one scanned block, so each Pattention leaf stacks the L per-layer tensors on a leading
axis. The mapping is strict: every tensor of the file is used exactly once, and a missing, extra or misshapen
one is an error naming it. Their Θ scales by the live sqrt(n); the imported config stores that n as the fixed
`norm_scale_tokens`, so the function is identical and stays so after growth.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

from tokenformer_jax.config import ModelConfig, ParamTokens
from tokenformer_jax.interop.torch_format import LazyArray, TensorRef

# Our projection → the authors' module inside a layer.
MODULES = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
           "output": "attention.proj", "ffn": "mlp"}
LEAVES = ("key_param_tokens", "value_param_tokens")   # the same names on both sides
EMBEDDING = "sequential.0.word_embeddings.weight"
VOCAB_MULTIPLE = 128   # 50,277 → 50,304, as NeoX pads
# Keys a config.json must have: without them the model's shape or function is unknown.
REQUIRED_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "qkv_slot_num", "proj_slot_num",
                 "ffn_slot_num", "pos_emb")
# Keys that, when present, must hold the value this model implements.
EXPECTED = {"norm": "layernorm_nonparam", "final_norm": "layernorm", "no_weight_tying": False,
            "gpt_j_residual": False, "rotary_interleaved": False, "use_bias_in_norms": True,
            "use_bias_in_attn_linear": False}
# NeoX layer kinds in attention_config ([[[kind, ...], layers], ...]) whose attention is this model's causal
# global attention: "tokenformer" (what the released TokenFormers say) and NeoX's "global".
ATTENTION_KINDS = ("tokenformer", "global")
# norm_activation_type values of the authors' code that this model computes (Θ of Eq. 4).
NEOX_NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
# What an exported config.json says beyond the model's shape (the authors' keys and values).
# Every key of the released models' hub config.json is here (tests/test_neox.py checks it).
EXPORT_DEFAULTS = {"architectures": ["TokenFormerForCausalLM"], "norm": "layernorm_nonparam",
                   "final_norm": "layernorm", "no_weight_tying": False, "gpt_j_residual": False,
                   "rotary_interleaved": False, "output_layer_parallelism": "column",
                   "use_bias_in_attn_linear": False, "scaled_upper_triang_masked_softmax_fusion": False,
                   "bias_gelu_fusion": False, "rope_fusion": False, "layernorm_fusion": False,
                   "init_method": "normal", "output_layer_init_method": "wang_init", "use_cache": True,
                   "attention_dropout": 0.0, "hidden_dropout": 0.0, "precision": "float32",
                   "torch_dtype": "float32", "transformers_version": "4.36.0"}


class NeoXError(ValueError):
  """A checkpoint or config that does not map onto this model (or a model that has no NeoX equivalent)."""


# Configs -------------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise NeoXError(f"{path} not found; the directory must hold the config.json that came with the "
                    "checkpoint") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise NeoXError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise NeoXError(f"{path} holds a {type(config).__name__}, not a JSON object of NeoX settings")
  return config


def _storage_multiple(counts) -> int:
  """The largest power of two ≤ 64 dividing every count: storage then equals the logical counts."""
  return next(m for m in (64, 32, 16, 8, 4, 2, 1) if all(n % m == 0 for n in counts))


def model_config(neox: Mapping, *, embedding_rows: int, vocab_size: int | None = None,
                 name: str = "neox") -> ModelConfig:
  """A NeoX config.json (as a dict) → ModelConfig computing the same function.

  `embedding_rows`: rows of the file's embedding (the padded vocabulary); `vocab_size`: the tokenizer's
  (None: every row is a real token).
  """
  missing = [k for k in REQUIRED_KEYS if k not in neox]
  if neox.get("pos_emb") == "rotary" and "rotary_pct" not in neox:
    missing.append("rotary_pct")
  if missing:
    raise NeoXError(f"config.json has no {', '.join(missing)}; it is not a TokenFormer NeoX config (or it was "
                    "cut short)")
  for key, value in EXPECTED.items():
    if key in neox and neox[key] != value:
      raise NeoXError(f"config.json sets {key}={neox[key]!r}; this model implements only {key}={value!r}")
  activation = neox.get("norm_activation_type", "l2_norm_gelu")
  if activation not in NEOX_NORMALIZATIONS:
    raise NeoXError(f"config.json sets norm_activation_type={activation!r}; supported: "
                    f"{', '.join(NEOX_NORMALIZATIONS)}")
  if neox["pos_emb"] not in ("rotary", "none"):
    raise NeoXError(f"config.json sets pos_emb={neox['pos_emb']!r}; this model implements 'rotary' and 'none'")
  try:
    layers, d, heads = int(neox["num_layers"]), int(neox["hidden_size"]), int(neox["num_attention_heads"])
    qkv, proj, ffn = int(neox["qkv_slot_num"]), int(neox["proj_slot_num"]), int(neox["ffn_slot_num"])
    rotary_pct = float(neox.get("rotary_pct", 0.25))
  except (TypeError, ValueError) as e:
    raise NeoXError(f"config.json: a size is not a number ({e})") from None
  _check_attention_config(neox.get("attention_config"), layers)
  if heads <= 0 or d % heads:
    raise NeoXError(f"config.json: hidden_size={d} is not divisible by num_attention_heads={heads}")
  if neox["pos_emb"] == "rotary" and int(d // heads * rotary_pct) % 2:
    raise NeoXError(f"config.json: rotary_pct={rotary_pct} gives an odd number of rotary dims "
                    f"({int(d // heads * rotary_pct)}) per head, which rotate-half cannot split")
  vocab_size = embedding_rows if vocab_size is None else vocab_size
  if vocab_size > embedding_rows:
    raise NeoXError(f"the tokenizer has {vocab_size} tokens but the embedding only {embedding_rows} rows; give "
                    "the model's own tokenizer")
  multiple = VOCAB_MULTIPLE if -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE == embedding_rows else embedding_rows
  tokens = ParamTokens(qkv, qkv, qkv, proj, ffn)
  return ModelConfig(
      name=name, architecture="tokenformer", vocab_size=vocab_size, vocab_multiple=multiple, d_model=d,
      n_layers=layers, n_heads=heads, param_tokens=tokens, token_multiple=_storage_multiple(tokens.as_dict().values()),
      normalization=activation, norm_scale="fixed", norm_scale_tokens=tokens, approximate_gelu=False,
      init="neox", positions=neox["pos_emb"], rotary_fraction=rotary_pct,
      rotary_base=float(neox.get("rotary_emb_base", 10000.0)), final_norm_params=True,
      logits_divide_by_sqrt_d=False, layer_norm_eps=float(neox.get("layernorm_epsilon", 1e-5)),
      max_seq_len=int(neox.get("seq_length", 2048)))


def _layer_kinds(attention_config, num_layers: int) -> list:
  """NeoX's expansion of attention_config: [[[kind, ...], repeat or "all"], ...], or one kind per layer already."""
  if isinstance(attention_config, list) and all(isinstance(kind, str) for kind in attention_config):
    return list(attention_config)
  kinds = []
  for group, repeat in attention_config:
    group = [group] if isinstance(group, str) else list(group)
    kinds += group * (num_layers // len(group) if repeat == "all" else int(repeat))
  return kinds


def _check_attention_config(attention_config, num_layers: int) -> None:
  """Every layer's kind one of ATTENTION_KINDS, and one kind per layer."""
  if not attention_config:
    return
  try:
    kinds = _layer_kinds(attention_config, num_layers)
  except (TypeError, ValueError, ZeroDivisionError):
    raise NeoXError(f"config.json: attention_config={attention_config!r} is not NeoX's [[[kind, ...], layers], "
                    "...]; fix it to list one kind per layer") from None
  unsupported = sorted({str(kind) for kind in kinds} - set(ATTENTION_KINDS))
  if unsupported:
    raise NeoXError(f"config.json: attention_config={attention_config!r} has layers of kind "
                    f"{', '.join(unsupported)}, which this model does not implement; supported: "
                    f"{', '.join(ATTENTION_KINDS)}")
  if len(kinds) != num_layers:
    raise NeoXError(f"config.json: attention_config={attention_config!r} names {len(kinds)} layers but "
                    f"num_layers={num_layers}; make them agree")


def check_exportable(cfg: ModelConfig, *, live_scale: bool = False) -> None:
  """Refuse a model the authors' code would compute differently (it has no setting for the difference)."""
  def need(ok: bool, message: str):
    if not ok:
      raise NeoXError(f"model {cfg.name!r} cannot be written in the authors' format: {message}")

  need(cfg.architecture == "tokenformer", "it is a dense Transformer, not a TokenFormer")
  need(not cfg.logits_divide_by_sqrt_d, "its logits are divided by sqrt(d) (a ladder model); NeoX's are not")
  need(cfg.final_norm_params, "its final LayerNorm has no scale and bias; NeoX's has")
  need(not cfg.approximate_gelu, "it uses the tanh GeLU; NeoX uses the exact one")
  need(cfg.normalization in NEOX_NORMALIZATIONS, f"its normalization {cfg.normalization!r} is none of the "
       f"authors' ({', '.join(NEOX_NORMALIZATIONS)})")
  pt = cfg.param_tokens
  need(pt.query == pt.key == pt.value, f"its query/key/value token counts differ ({pt.query}, {pt.key}, "
       f"{pt.value}); NeoX has one qkv_slot_num")
  if cfg.positions == "rotary":
    need(int(cfg.head_dim * cfg.rotary_fraction) == cfg.rotary_dims,
         f"rotary_fraction={cfg.rotary_fraction} gives {cfg.rotary_dims} dims here but "
         f"{int(cfg.head_dim * cfg.rotary_fraction)} in NeoX")
  if cfg.normalization != "softmax":
    scaled = {p: cfg.scale_tokens(p) for p in pt.as_dict()}
    need(live_scale or scaled == pt.as_dict(),
         f"its norm scale is sqrt of {scaled}, not of its token counts {pt.as_dict()} (it was grown with the "
         "scale kept); NeoX always uses the live count. Pass --live_scale to export anyway (the function then "
         "changes), or grow with --scale=follow")


def neox_config(cfg: ModelConfig, base: Mapping | None = None, *, tokenizer_type: str = "HFTokenizer") -> dict:
  """config.json for `cfg`: EXPORT_DEFAULTS, then `base` (e.g. the imported model's own), then the shape keys
  from `cfg` and `tokenizer_type` (NeoX's name of the tokenizer's kind: HFTokenizer or SPMTokenizer)."""
  out = {**EXPORT_DEFAULTS, **(base or {})}
  pt = cfg.param_tokens
  out.update({
      "num_layers": cfg.n_layers, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
      "qkv_slot_num": pt.query, "proj_slot_num": pt.output, "ffn_slot_num": pt.ffn,
      "seq_length": cfg.max_seq_len, "max_position_embeddings": cfg.max_seq_len,
      "pos_emb": cfg.positions, "rotary_pct": cfg.rotary_fraction, "rotary_emb_base": cfg.rotary_base,
      "norm_activation_type": cfg.normalization, "layernorm_epsilon": cfg.layer_norm_eps,
      "make_vocab_size_divisible_by": cfg.vocab_multiple,
      "attention_config": [[["tokenformer"], cfg.n_layers]], "tokenizer_type": tokenizer_type,
  })
  return out


# Tensor names --------------------------------------------------------------------------------------------
def tensor_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """NeoX name → (path of our leaf, layer index or None), in the order the authors' file holds them."""
  layout = {EMBEDDING: (("embedding",), None)}
  for i in range(cfg.n_layers):
    for projection, module in MODULES.items():
      for leaf in LEAVES:
        layout[f"sequential.{i + 2}.{module}.{leaf}"] = (("layers", projection, leaf), i)
  layout[f"sequential.{cfg.n_layers + 3}.norm.weight"] = (("final_norm", "scale"), None)
  layout[f"sequential.{cfg.n_layers + 3}.norm.bias"] = (("final_norm", "bias"), None)
  return layout


def expected_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
  """The shape of one NeoX tensor (per layer, logical rows) behind our leaf `path`."""
  if path == ("embedding",):
    return (cfg.padded_vocab, cfg.d_model)
  if path[0] == "final_norm":
    return (cfg.d_model,)
  return (cfg.tokens(path[1]), cfg.d_model)


def rotary_inv_freq(cfg: ModelConfig) -> np.ndarray:
  dims = cfg.rotary_dims
  return (1.0 / cfg.rotary_base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)).astype(np.float32)


def check_tensors(tensors: Mapping[str, TensorRef], cfg: ModelConfig, where: str) -> None:
  """Every expected tensor present, float, and of its shape; nothing else (rotary buffers are checked)."""
  layout = tensor_layout(cfg)
  for name, (path, _) in layout.items():
    if name not in tensors:
      raise NeoXError(f"{where} has no tensor {name}; it is not a complete {cfg.n_layers}-layer TokenFormer")
    ref, shape = tensors[name], expected_shape(cfg, path)
    if tuple(ref.shape) != shape:
      raise NeoXError(f"{where}: {name} has shape {list(ref.shape)}, expected {list(shape)} from config.json")
    if ref.dtype.kind != "f" and ref.dtype.name != "bfloat16":
      raise NeoXError(f"{where}: {name} holds {ref.dtype}, not floats")
  for name, ref in tensors.items():
    if name in layout:
      continue
    if name.endswith(".attention.rotary_emb.inv_freq") and cfg.positions == "rotary":
      if ref.shape == (cfg.rotary_dims // 2,) and np.allclose(ref.read(), rotary_inv_freq(cfg), rtol=1e-5):
        continue   # a buffer NeoX can store: checked against the config, nothing to load
      raise NeoXError(f"{where}: {name} does not hold the rotary frequencies of rotary_pct={cfg.rotary_fraction}, "
                      f"base {cfg.rotary_base}")
    raise NeoXError(f"{where} has a tensor {name} that this {cfg.n_layers}-layer TokenFormer has no place for")


# Import: file → device arrays, one leaf at a time ---------------------------------------------------------
def _fill(out: np.ndarray, ref: TensorRef, rows: slice) -> None:
  """Copy `rows` of `ref` into the float32 block `out` (a 1-d tensor whole); rows past `ref`'s stay zero
  (storage padding of a Pattention)."""
  if len(ref.shape) == 1:
    out[...] = ref.read().astype(np.float32, copy=False)
    return
  start, stop, _ = rows.indices(ref.shape[0])
  target = out[:max(stop - start, 0)]
  if ref.dtype == np.float32:
    ref.read(out=target, rows=slice(start, stop))
  else:
    target[...] = ref.read(rows=slice(start, stop)).astype(np.float32)


def _pieces(n: int, devices: int) -> int:
  """The most pieces (≤ devices) that split n rows evenly."""
  return max(k for k in range(1, min(n, devices) + 1) if n % k == 0)


def load_params(tensors: Mapping[str, TensorRef], cfg: ModelConfig, *, devices=None, progress=None) -> dict:
  """The parameter tree of `cfg` (float32 jax arrays), read from `tensors` one device piece at a time.

  Call `check_tensors` first. The stacked layer leaves (along layers) and the embedding (along rows) are split
  over up to all of `devices` (default: this host's), the final norm replicated, so that only one piece is on
  the host in transit and a checkpoint writer holds pieces, not whole leaves, in flight. Every leaf lives on
  the same devices; restoring onto any other mesh later works as usual.
  """
  from tokenformer_jax.model import abstract_params   # pylint: disable=g-import-not-at-top
  devices = list(devices or jax.local_devices())
  by_leaf: dict[tuple[str, ...], dict[int | None, TensorRef]] = {}
  for name, (path, layer) in tensor_layout(cfg).items():
    by_leaf.setdefault(path, {})[layer] = tensors[name]
  pieces = _pieces(math.gcd(cfg.n_layers, cfg.padded_vocab), len(devices))
  mesh = jax.sharding.Mesh(np.array(devices[:pieces]), ("pieces",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pieces"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
  leaves = []
  for index, (key_path, spec) in enumerate(flat):
    path = tuple(k.key for k in key_path)
    refs = by_leaf[path]
    sharding = split if len(spec.shape) > 1 else replicated

    def piece(block, refs=refs, shape=spec.shape):
      first = block[0]
      start, stop, _ = first.indices(shape[0])
      host = np.zeros((stop - start, *shape[1:]), np.float32)
      if None in refs:                          # one tensor: rows [start, stop) of it
        _fill(host, refs[None], slice(start, stop))
      else:                                      # stacked layers [start, stop)
        for i, layer in enumerate(range(start, stop)):
          _fill(host[i], refs[layer], slice(None))
      return host

    leaves.append(jax.make_array_from_callback(spec.shape, sharding, piece))
    if progress:
      progress(index + 1, len(flat), "/".join(path))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# Export: device arrays → file, one tensor at a time -------------------------------------------------------
def export_tensors(params: Mapping, cfg: ModelConfig) -> dict[str, LazyArray]:
  """NeoX name → LazyArray of the tensor (logical rows only), produced from `params` when written."""
  out = {}
  for name, (path, layer) in tensor_layout(cfg).items():
    shape = expected_shape(cfg, path)

    def produce(path=path, layer=layer, shape=shape):
      leaf = params
      for key in path:
        leaf = leaf[key]
      piece = leaf if layer is None else leaf[layer]
      if len(shape) == 2:
        piece = piece[:shape[0]]
      return np.asarray(jax.device_get(piece), np.float32)

    out[name] = LazyArray(shape, np.float32, produce)
  return out


def padding_is_zero(params: Mapping, cfg: ModelConfig) -> list[str]:
  """Pattention leaves whose storage rows past the logical count are not zero (they would be dropped)."""
  bad = []
  for projection in MODULES:
    n = cfg.tokens(projection)
    for leaf in LEAVES:
      array = params["layers"][projection][leaf]
      if array.shape[1] > n and bool(jax.numpy.any(array[:, n:] != 0)):
        bad.append(f"layers/{projection}/{leaf}")
  return bad


def count_bytes(tensors: Mapping[str, TensorRef]) -> int:
  return sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors.values())
