"""Configuration as data: frozen dataclasses, and loading them from experiment files.

An experiment file is plain Python (see `experiments/`); `load_config("experiments/paper.py:ladder_124m")`
returns the object (or calls the function) named after the colon.

(Over 400 lines on purpose: this is the schema, every field a user can set with its range and its meaning, in
one file so that one place documents and checks them all.)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import typing
from typing import Any

PROJECTIONS = ("query", "key", "value", "output", "ffn")
# Θ of Eq. 4. "gelu" (no normalisation) is the "is Pattention just an FFN?" control: every projection a
# two-layer MLP without biases, gelu(X·K_Pᵀ)·V_P, with TokenFormer's shapes (the plain kernel only).
# "gelu_l1_norm" (g = gelu(A); g / Σ|g| · n_scale) is the middle row of the paper's Table 4 (the plain kernel only).
NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax", "gelu", "gelu_l1_norm")
PLAIN_ONLY_NORMALIZATIONS = ("gelu", "gelu_l1_norm")
# The LayerNorms inside a block (paper Table 5): "auto" is each architecture's own (TokenFormer: none; the dense
# baseline: scale and bias); "none" (non-parametric), "bias" (β only) or "scale_bias" (γ and β) for either.
BLOCK_NORMS = ("auto", "none", "bias", "scale_bias")
POOLINGS = ("cls", "gap")
MLPS = ("gelu", "swiglu")
REMAT = ("none", "full", "dots", "dots_no_batch", "projections", "lean")
PATTENTION_KERNELS = ("plain", "lean", "pallas")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# Up-front checks: every value a user can set, refused with one line naming the field and its range ---------
def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(where: str, value, low: int, high: int | None = None, allowed: tuple = ()) -> None:
  """`value` is an int in [low, high] (or one of `allowed`), else a ValueError naming `where` and the range."""
  if value in allowed and not isinstance(value, bool):
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
    span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    extra = "".join(f" or {a}" for a in allowed)
    raise ValueError(f"{where} must be {span}{extra}, got {value!r}")


def check_float(where: str, value, low: float, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> None:
  """`value` is a finite number in the interval, else a ValueError naming `where` and the interval."""
  ok = _is_number(value) and (value > low if low_open else value >= low)
  if high is not None:
    ok = ok and (value < high if high_open else value <= high)
  if not ok:
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    raise ValueError(f"{where} must be a finite number in {left}{low}, {'inf' if high is None else high}{right}, "
                     f"got {value!r}")


def check_choice(where: str, value, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")


def validate(cfg):
  """Check every field of a config (its `validate()`), after overrides; returns it for chaining."""
  if hasattr(cfg, "validate"):
    cfg.validate()
  return cfg


@dataclasses.dataclass(frozen=True)
class ParamTokens:
  """Number of key/value parameter tokens of each Pattention in a block (paper Eq. 7-10)."""
  query: int
  key: int
  value: int
  output: int
  ffn: int

  @classmethod
  def uniform(cls, attention: int, ffn: int) -> ParamTokens:
    return cls(attention, attention, attention, attention, ffn)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def total(self) -> int:
    return sum(self.as_dict().values())


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """What makes a model an image classifier (model/vision.py): square images cut into patch_size² patches, each
  embedded by one dense layer, learned position embeddings, the blocks with bidirectional attention, a final
  norm, then the class token (pooling="cls") or the mean of the patch tokens ("gap"), and a dense head."""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  num_classes: int = 1000
  pooling: str = "cls"

  def __post_init__(self):
    for name in ("image_size", "patch_size", "channels", "num_classes"):
      check_int(f"model.vision.{name}", getattr(self, name), 1)
    check_choice("model.vision.pooling", self.pooling, POOLINGS)
    if self.image_size % self.patch_size:
      raise ValueError(f"model.vision.patch_size={self.patch_size} does not divide "
                       f"model.vision.image_size={self.image_size}: the image must cut into whole patches; choose a "
                       f"patch size among {[p for p in range(1, self.image_size + 1) if self.image_size % p == 0]}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def sequence_length(self) -> int:
    """Tokens the blocks see per image: the patches, and the class token with pooling="cls"."""
    return self.num_patches + (self.pooling == "cls")

  @property
  def patch_features(self) -> int:
    return self.patch_size ** 2 * self.channels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A TokenFormer (architecture="tokenformer") or its dense baseline ("transformer")."""
  name: str = "model"
  architecture: str = "tokenformer"
  vocab_size: int = 50277            # the tokenizer's; storage pads it to `vocab_multiple`
  vocab_multiple: int = 128
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  # TokenFormer only ------------------------------------------------------------------------------
  param_tokens: ParamTokens | None = None
  # Storage rounds every token count up to this multiple with inert (zero) rows, so the
  # parameter-token axis divides the mesh; 1 means no padding.
  token_multiple: int = 1
  normalization: str = "l2_norm_gelu"
  # "fixed": scale = sqrt(norm_scale_tokens), a constant that growth keeps (function-preserving).
  # "live": scale = sqrt(current param_tokens), what the authors' code does.
  norm_scale: str = "fixed"
  norm_scale_tokens: ParamTokens | None = None   # None: the param_tokens of this config
  approximate_gelu: bool = False                  # False: exact erf GeLU, as in the PyTorch reference
  # "fan_in" (the authors' JAX ladder): keys N(0, 1/d_in), values N(0, 1/n), embedding N(0, 1).
  # "neox" (the authors' PyTorch): keys N(0, 0.02^2), values std 2/(L sqrt d), embedding N(0, 0.02^2).
  init: str = "fan_in"
  # Transformer only ------------------------------------------------------------------------------
  mlp_ratio: int = 4
  # "gelu": GPT-2's gelu(x·W_in)·W_out with mlp_ratio·d hidden units; "swiglu": (silu(x·W_gate) ⊙ x·W_up)·W_down
  # with round(2/3·mlp_ratio·d) hidden units, so its three matrices hold the parameters of GeLU's two.
  mlp: str = "gelu"
  # Shared ----------------------------------------------------------------------------------------
  positions: str = "none"            # "none" (JAX ladder) or "rotary" (PyTorch Pile models)
  rotary_fraction: float = 0.25
  rotary_base: float = 10000.0
  final_norm_params: bool = True     # final LayerNorm with scale and bias
  logits_divide_by_sqrt_d: bool = True   # the JAX ladder; pairs with the N(0, 1) embedding of init="fan_in"
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"             # compute dtype; parameters are always float32
  # Activation rematerialisation of each block: none | full | dots | dots_no_batch | projections | lean
  # ("projections" keeps each Pattention's output and recomputes its scores and the token-token attention;
  # "lean" also keeps the attention's output and the lean kernel's per-row statistics: nothing of width n).
  remat: str = "none"
  max_seq_len: int = 1024
  # How a Pattention is partitioned over the "tensor" mesh axis: "auto" (the compiler, from the sharding
  # table) or "shard_map" (explicit: one all-reduce for the norm, one for the output; pattention_parallel.py).
  pattention_impl: str = "auto"
  # How a Pattention computes Eq. 4: "plain" (scores [..., n] in one piece, kept for the backward pass) or
  # "lean" (a custom_vjp over blocks of `pattention_block` parameter tokens that keeps only per-row statistics;
  # pattention_lean.py). Under tensor parallelism pair "lean" with pattention_impl="shard_map". "pallas": fused
  # Pallas kernels that keep each [token block, parameter block] tile of scores in VMEM (pattention_pallas.py;
  # interpreted off TPU; always in the shard_map form, the partitioner cannot split a Pallas call).
  pattention_kernel: str = "plain"
  pattention_block: int = 2048
  # "pallas": tokens per block (0: the kernel's default, 512). On TPU both blocks are rounded up to the 128 tile and
  # halved until each pass fits v4's VMEM (pattention_pallas.fitted_blocks); elsewhere they are used as given.
  pattention_token_block: int = 0
  # Stochastic depth (an image classifier's recipe, model/layers.drop_path): each residual branch of block i is
  # dropped for a whole example with probability drop_path·i/(n_layers-1) in training (timm's linear rule), the
  # kept ones scaled by 1/(1-p); evaluation keeps every branch. 0: off.
  drop_path: float = 0.0
  # Unroll the scan over layers: slower to compile, but the compiler's cost analysis then covers every layer
  # (it counts a loop body once); the TPU plan sets it.
  unroll_layers: bool = False
  # The LayerNorms inside each block: auto | none | bias | scale_bias (BLOCK_NORMS; paper Table 5).
  block_norm: str = "auto"
  # An image classifier (model/vision.py) instead of a language model: patches in, class logits out, attention
  # bidirectional. vocab_size, max_seq_len and logits_divide_by_sqrt_d then play no part.
  vision: VisionConfig | None = None

  def __post_init__(self):
    def need(ok: bool, message: str):
      if not ok:
        raise ValueError(f"model config {self.name!r}: {message}")

    need(self.architecture in ("tokenformer", "transformer"),
         f"architecture must be 'tokenformer' or 'transformer', got {self.architecture!r}")
    for name in ("d_model", "n_layers", "n_heads", "vocab_size", "vocab_multiple", "max_seq_len", "mlp_ratio"):
      value = getattr(self, name)
      need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
           f"model.{name} must be an integer >= 1, got {value!r}")
    for name in ("rotary_fraction", "rotary_base", "layer_norm_eps"):
      value = getattr(self, name)
      need(_is_number(value) and value > 0, f"model.{name} must be a finite number > 0, got {value!r}")
    need(self.rotary_fraction <= 1, f"model.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
    need(self.d_model % self.n_heads == 0,
         f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    need(self.positions in ("none", "rotary"), f"positions must be 'none' or 'rotary', got {self.positions!r}")
    need(self.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    need(self.remat in REMAT, f"remat must be one of {'|'.join(REMAT)}, got {self.remat!r}")
    need(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path!r}")
    need(self.pattention_impl in ("auto", "shard_map"),
         f"pattention_impl must be 'auto' or 'shard_map', got {self.pattention_impl!r}")
    need(self.pattention_kernel in PATTENTION_KERNELS,
         f"pattention_kernel must be one of {'|'.join(PATTENTION_KERNELS)}, got {self.pattention_kernel!r}")
    need(self.pattention_block > 0, f"pattention_block must be positive, got {self.pattention_block}")
    need(isinstance(self.pattention_token_block, int) and self.pattention_token_block >= 0,
         "pattention_token_block must be an integer >= 0 (0: the kernel's default), got "
         f"{self.pattention_token_block!r}")
    need(self.vocab_size > 0 and self.vocab_multiple > 0, "vocab_size and vocab_multiple must be positive")
    need(self.mlp in MLPS, f"mlp must be one of {'|'.join(MLPS)}, got {self.mlp!r}")
    if self.positions == "rotary":
      need(self.rotary_dims >= 2, f"rotary_fraction={self.rotary_fraction} leaves fewer than 2 rotary dims")
    if self.architecture == "tokenformer":
      need(self.param_tokens is not None, "a tokenformer needs param_tokens")
      need(all(n > 0 for n in self.param_tokens.as_dict().values()), "every param_tokens count must be > 0")
      need(self.token_multiple > 0, "token_multiple must be positive")
      need(self.normalization in NORMALIZATIONS,
           f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
      need(self.norm_scale in ("fixed", "live"), f"norm_scale must be 'fixed' or 'live', got {self.norm_scale!r}")
      need(self.init in ("fan_in", "neox"), f"init must be 'fan_in' or 'neox', got {self.init!r}")
      need(self.normalization not in PLAIN_ONLY_NORMALIZATIONS or self.pattention_kernel == "plain",
           f"normalization={self.normalization!r} runs on pattention_kernel='plain' only")
    need(self.block_norm in BLOCK_NORMS, f"block_norm must be one of {'|'.join(BLOCK_NORMS)}, got {self.block_norm!r}")
    if self.vision is not None:
      need(isinstance(self.vision, VisionConfig), f"model.vision must be a VisionConfig, got {self.vision!r}")
      need(self.positions == "none", "an image classifier has learned position embeddings: set positions='none'")

  # Derived sizes -------------------------------------------------------------------------------------
  @property
  def padded_vocab(self) -> int:
    return round_up(self.vocab_size, self.vocab_multiple)

  @property
  def mlp_hidden(self) -> int:
    """The dense MLP's hidden units (see `mlp`)."""
    hidden = self.mlp_ratio * self.d_model
    return hidden if self.mlp == "gelu" else round(2 * hidden / 3)

  @property
  def causal(self) -> bool:
    """Token-token attention masks the future in a language model; an image classifier's sees every patch."""
    return self.vision is None

  @property
  def norm_params(self) -> str:
    """The block norms' parameters: none | bias | scale_bias (block_norm with "auto" resolved)."""
    if self.block_norm != "auto":
      return self.block_norm
    return "none" if self.architecture == "tokenformer" else "scale_bias"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def rotary_dims(self) -> int:
    """Rotary dims per head: the configured fraction, rounded down to an even number."""
    return int(self.head_dim * self.rotary_fraction) // 2 * 2

  def tokens(self, projection: str) -> int:
    """The paper's (logical) number of parameter tokens of one projection."""
    return getattr(self.param_tokens, projection)

  def storage_tokens(self, projection: str) -> int:
    """Rows actually stored: the logical count rounded up with inert rows."""
    return round_up(self.tokens(projection), self.token_multiple)

  def scale_tokens(self, projection: str) -> int:
    """The n in the sqrt(n) factor of the L2 normalisation."""
    if self.norm_scale == "fixed" and self.norm_scale_tokens is not None:
      return getattr(self.norm_scale_tokens, projection)
    return self.tokens(projection)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)


SHIPPED_CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "corpus" / "python-docs-slice.jsonl.gz"
SHIPPED_TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "corpus" / "python-docs-bpe2048.model"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes [batch, seq_len + 1] token windows."""
  train_files: tuple[str, ...] = (str(SHIPPED_CORPUS),)   # globs of .jsonl/.jsonl.gz/.txt, local or gs://
  validation_files: tuple[str, ...] = ()                   # empty: hold out `validation_fraction` of documents
  validation_fraction: float = 0.05
  text_field: str = "text"                                 # the JSON key holding a document's text
  tfds_name: str = ""                                      # a TFDS dataset instead of files ("name" or "name:version")
  tfds_data_dir: str = ""
  tfds_train_split: str = "train"
  tfds_validation_split: str = "validation"
  tokenizer: str = str(SHIPPED_TOKENIZER)                  # SentencePiece .model or tokenizer.json, local or gs://
  # A token store (python -m tokenformer_jax.data.prepare), local or gs://: read instead of the files/TFDS above.
  # Unset: those are prepared into a store under `cache_dir` (default $TOKENFORMER_JAX_CACHE or
  # ~/.cache/tokenformer_jax/stores), keyed by their names, sizes, mtimes, the splitting and the tokenizer.
  store: str = ""
  cache_dir: str = ""
  seq_len: int = 1024
  shuffle_seed: int = 0
  worker_count: int = 0                                    # grain worker processes per host (0: in-process)
  # A mixture of token stores instead of one corpus (data/mixture.py): STORE=WEIGHT strings (the source named by
  # the store directory's name) or, in a config file, (NAME, STORE, WEIGHT) triples; its weights changed from
  # given steps on by STEP=W1/W2/... entries; a source at the end of an epoch: "repeat" (its next one) or "error".
  mixture: tuple = ()
  mixture_stages: tuple[str, ...] = ()
  mixture_exhausted: str = "repeat"
  # Images instead of text (data/images.py; an image classifier's data): a source name ("digits": scikit-learn's
  # 8×8 digits, `pip install -e '.[vision]'`), with its fixed split, or "tfds:NAME" (data/tfds_images.py: a TFDS
  # image classification dataset such as tfds:imagenet2012, prepared in array_record under data.tfds_data_dir,
  # its splits data.tfds_train_split / data.tfds_validation_split); the text fields above then play no part.
  image_source: str = ""
  image_crop_padding: int = 0                              # digits: pad by this many pixels, crop back at random
  image_flip: bool = False                                 # random horizontal flips
  # tfds sources' training views: a random-resized crop, then RandAugment with this many operations per image
  # (0: none) at this magnitude (0-10) and its per-operation spread (data/augment.py).
  image_randaugment_ops: int = 0
  image_randaugment_magnitude: float = 9.0
  image_randaugment_std: float = 0.5
  # Whole-batch mixing in the train step (train/mixing.py), any image source: Beta(α, α) for mixup and for cutmix
  # (0: off; both: one or the other per batch), and label smoothing ε.
  image_mixup: float = 0.0
  image_cutmix: float = 0.0
  image_label_smoothing: float = 0.0

  def replace(self, **changes: Any) -> DataConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    check_int("data.seq_len", self.seq_len, 1)
    check_int("data.shuffle_seed", self.shuffle_seed, 0)
    check_int("data.worker_count", self.worker_count, 0)
    check_int("data.image_crop_padding", self.image_crop_padding, 0)
    check_int("data.image_randaugment_ops", self.image_randaugment_ops, 0)
    check_float("data.image_randaugment_magnitude", self.image_randaugment_magnitude, 0.0, 10.0)
    check_float("data.image_randaugment_std", self.image_randaugment_std, 0.0)
    check_float("data.image_mixup", self.image_mixup, 0.0)
    check_float("data.image_cutmix", self.image_cutmix, 0.0)
    check_float("data.image_label_smoothing", self.image_label_smoothing, 0.0, 1.0, high_open=True)
    if self.image_source:
      return   # images: the text fields below play no part
    if self.mixture or self.mixture_stages:
      from tokenformer_jax.data import mixture   # pylint: disable=g-import-not-at-top (it imports this module)
      if not self.mixture:
        raise ValueError("data.mixture_stages is set but data.mixture is empty: list the sources in data.mixture")
      mixture.parse_stages(self.mixture_stages, len(mixture.parse_sources(self.mixture)))   # DataError: a ValueError
    if self.mixture_exhausted not in ("repeat", "error"):
      raise ValueError(f"data.mixture_exhausted must be one of repeat, error; got {self.mixture_exhausted!r}")
    if self.validation_files or self.tfds_name or self.store:
      check_float("data.validation_fraction", self.validation_fraction, 0.0, 1.0, high_open=True)
    else:   # the validation set is held out of the training files
      check_float("data.validation_fraction", self.validation_fraction, 0.0, 1.0, low_open=True, high_open=True)
    if not self.tfds_name and not self.store and not any(self.train_files):
      raise ValueError("data.train_files must name at least one file or glob (or set data.store or data.tfds_name)")
    for name in ("text_field", "tokenizer"):
      if not getattr(self, name):
        raise ValueError(f"data.{name} must not be empty")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay to `min_lr_ratio` × peak (paper App. D/F defaults)."""
  learning_rate: float = 6e-4
  warmup_steps: int = 2000
  schedule: str = "cosine"        # "cosine" or "constant" (after warmup)
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0          # global-norm clip; 0 disables
  # After growth: update only the appended parameter tokens (paper §5); needs --init_from a grown checkpoint.
  train_only_new_tokens: bool = False
  # The loss-spike guard (train/guard.py), off by default: a step whose loss exceeds spike_factor × the mean of
  # the last spike_window accepted losses leaves the parameters and the optimizer state unchanged (the batch is
  # not replayed); spike_patience skipped in a row restore the last checkpoint and halve the learning rate for
  # the rest of the run. It reads each step's loss on the host (one small device-to-host copy per step).
  spike_guard: bool = False
  spike_factor: float = 2.0
  spike_window: int = 20
  spike_patience: int = 3
  # An exponential moving average of the weights (train/optimizer.py), 0 off: the trainer evaluates it beside the
  # weights (eval_ema/...); kept in the optimizer state, so in every checkpoint.
  ema_decay: float = 0.0

  def replace(self, **changes: Any) -> OptimConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    check_float("optim.learning_rate", self.learning_rate, 0.0)
    check_int("optim.warmup_steps", self.warmup_steps, 0)
    check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
    check_float("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
    check_float("optim.b1", self.b1, 0.0, 1.0, high_open=True)
    check_float("optim.b2", self.b2, 0.0, 1.0, high_open=True)
    check_float("optim.eps", self.eps, 0.0, low_open=True)
    check_float("optim.weight_decay", self.weight_decay, 0.0)
    check_float("optim.grad_clip", self.grad_clip, 0.0)   # 0 disables clipping
    check_float("optim.spike_factor", self.spike_factor, 1.0, low_open=True)
    check_int("optim.spike_window", self.spike_window, 1)
    check_int("optim.spike_patience", self.spike_patience, 1)
    check_float("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (-1: whatever is left of the devices) and the sharding preset (see sharding.py)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  preset: str = "dp"

  def replace(self, **changes: Any) -> MeshConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    for name in ("data", "fsdp", "tensor"):
      check_int(f"mesh.{name}", getattr(self, name), 1, allowed=(-1,))
    if [self.data, self.fsdp, self.tensor].count(-1) > 1:
      raise ValueError(f"at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the rest of the devices); "
                       f"got {self.data}, {self.fsdp}, {self.tensor}")


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  """Profiles and hang dumps (train/events.py; docs/reliability.md). The event log (RUN/events.jsonl) is always
  written; these are off unless set."""
  # "A:B": a jax.profiler trace of steps A to B-1 (as the log numbers them) into RUN/profile/process_<i>.
  profile_steps: str = ""
  profile_hosts: str = "0"        # the processes that trace: "all", or their indices ("0", "0,3")
  # A step longer than hang_factor × the median of the recent steps (and than hang_min_s) is a hang: every
  # thread's stack goes to the run's log (each process to its own) and a hang event to the event log; hang_exit_s
  # after that, if the step is still stuck, the process exits with code 75 so the launcher restarts the job.
  hang_factor: float = 0.0        # 0: no hang watch
  hang_min_s: float = 60.0
  hang_exit_s: float = 0.0        # 0: dump only, never exit

  def replace(self, **changes: Any) -> DiagnosticsConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    if self.profile_steps:
      first, sep, stop = self.profile_steps.partition(":")
      if not (sep and first.isdigit() and stop.isdigit() and 1 <= int(first) < int(stop)):
        raise ValueError(f"diagnostics.profile_steps must look like A:B with 1 <= A < B (steps A to B-1 are "
                         f"traced), got {self.profile_steps!r}")
    hosts = self.profile_hosts.split(",")
    if self.profile_hosts != "all" and not all(h.strip().isdigit() for h in hosts):
      raise ValueError(f"diagnostics.profile_hosts must be 'all' or process indices such as 0 or 0,3; got "
                       f"{self.profile_hosts!r}")
    check_float("diagnostics.hang_factor", self.hang_factor, 0.0)
    if self.hang_factor and self.hang_factor <= 1:
      raise ValueError(f"diagnostics.hang_factor must be 0 (off) or > 1 (× the median step), got {self.hang_factor!r}")
    check_float("diagnostics.hang_min_s", self.hang_min_s, 0.0)
    check_float("diagnostics.hang_exit_s", self.hang_exit_s, 0.0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluations during training besides the validation loss (train/evals.py; docs/training.md), their results
  in the metrics as task/<name>/<metric>."""
  # "ppl:PATH": perplexity on a corpus (.jsonl/.jsonl.gz/.txt files or a glob; all of it) or on a token store's
  # validation split (PATH a store directory), named by its file or directory name. "lm_eval:TASK": an
  # lm-evaluation-harness task from lm_eval's own definitions or `include_path`; its data must be local.
  tasks: tuple[str, ...] = ()
  every: int = 0             # steps between them (and at the last step); 0: with the validation loss (eval_every)
  include_path: str = ""     # a directory of lm_eval task .yaml files
  limit: int = 0             # lm_eval: at most this many documents per task; 0: all of them
  batches: int = 0           # perplexity: at most this many global batches per corpus; 0: eval_batches

  def replace(self, **changes: Any) -> EvalConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    for name in ("every", "limit", "batches"):
      check_int(f"eval.{name}", getattr(self, name), 0)
    names = []
    for task in self.tasks:
      kind, _, what = task.partition(":")
      if kind not in ("ppl", "lm_eval") or not what:
        raise ValueError(f"eval.tasks entry {task!r} must be ppl:PATH (a corpus or token store) or lm_eval:TASK")
      names.append(task_name(task))
    if doubled := sorted({n for n in names if names.count(n) > 1}):
      raise ValueError(f"eval.tasks names {', '.join(doubled)} twice (a task is named by its file, store or "
                       "lm_eval task name): evaluate each once")


def task_name(task: str) -> str:
  """The name an eval.tasks entry's results go under: the lm_eval task, or the corpus file's or store's name."""
  kind, _, what = task.partition(":")
  if kind == "lm_eval":
    return what
  from tokenformer_jax.data.sources import SUPPORTED_SUFFIXES   # pylint: disable=g-import-not-at-top (a cycle)
  stem = pathlib.PurePosixPath(what.rstrip("/")).name
  for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):   # .jsonl.gz before .jsonl
    stem = stem.removesuffix(suffix)
  return stem.replace("*", "all")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Where metrics go besides the console, TensorBoard and metrics.jsonl (train/logger.py)."""
  wandb: str = ""            # a Weights & Biases run: "project" or "project/entity"; "" = none
  wandb_mode: str = "online"   # "offline": written under RUN/wandb only (`wandb sync` uploads it later)

  def replace(self, **changes: Any) -> LoggingConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    check_choice("logging.wandb_mode", self.wandb_mode, ("online", "offline"))
    project, _, entity = self.wandb.partition("/")
    if self.wandb and (not project or "/" in entity):
      raise ValueError(f"logging.wandb must be PROJECT or PROJECT/ENTITY, got {self.wandb!r}")
    if self.wandb and importlib.util.find_spec("wandb") is None:
      raise ValueError(f"logging.wandb={self.wandb!r} needs the wandb package: pip install -e '.[wandb]'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run: model, data, optimiser, mesh, and the loop's cadence."""
  model: ModelConfig
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()
  eval: EvalConfig = EvalConfig()
  logging: LoggingConfig = LoggingConfig()
  steps: int = 1000
  global_batch: int = 512          # sequences per optimizer step, over all hosts
  grad_accum: int = 1              # micro-batches per step (global_batch must divide by it)
  eval_every: int = 500
  eval_batches: int = 20
  log_every: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  # The host-local fast tier (checkpoint_local.py): each host's own shards, on its own disk, between the persistent
  # checkpoints; "" = off. A directory on the host's local disk (e.g. /tmp/<run>), never gs://.
  local_checkpoint_dir: str = ""
  local_checkpoint_every: int = 100
  keep_local_checkpoints: int = 2
  seed: int = 0

  def replace(self, **changes: Any) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    """Every field in range (the model's are checked when it is built); raises ValueError naming the field."""
    for name in ("steps", "global_batch", "grad_accum", "eval_every", "eval_batches", "log_every",
                 "checkpoint_every", "keep_checkpoints", "local_checkpoint_every"):
      check_int(name, getattr(self, name), 1)
    check_int("keep_local_checkpoints", self.keep_local_checkpoints, 1, 16)   # checkpoint_local.MAX_OFFERED
    if "://" in self.local_checkpoint_dir:
      raise ValueError(f"local_checkpoint_dir={self.local_checkpoint_dir!r} must be a directory on each host's own "
                       "disk (e.g. /tmp/run-local); the persistent checkpoints go to --workdir, which may be gs://")
    check_int("seed", self.seed, 0)
    if self.global_batch % self.grad_accum:
      raise ValueError(f"global_batch={self.global_batch} must be a multiple of grad_accum={self.grad_accum}")
    self.data.validate()
    self.optim.validate()
    self.mesh.validate()
    self.diagnostics.validate()
    self.eval.validate()
    self.logging.validate()
    if self.eval.tasks and self.model.vision is not None:
      raise ValueError("eval.tasks are language-model evaluations; an image classifier reports its test accuracy "
                       "with the validation loss")
    if self.model.vision is not None and not self.data.image_source:
      raise ValueError(f"model {self.model.name!r} is an image classifier (model.vision is set) but the data is text "
                       "(data.image_source is empty): set data.image_source (e.g. digits), or train a language model")
    if self.model.vision is None and self.data.image_source:
      raise ValueError(f"data.image_source={self.data.image_source!r} gives images, but model {self.model.name!r} is a "
                       "language model (model.vision is unset): use an image classifier (experiments/vision.py) or "
                       "leave data.image_source empty for text")

  @property
  def example_tokens(self) -> int:
    """Tokens each example puts through the blocks: data.seq_len for text, the patches (+ class token) of an image."""
    return self.data.seq_len if self.model.vision is None else self.model.vision.sequence_length


def count_params(cfg: ModelConfig, *, storage: bool = True) -> dict[str, int]:
  """Analytic parameter count: {"embedding", "non_embedding", "total"}.

  `storage=True` counts the rows actually stored (with inert padding): it equals the initialised model
  exactly. `storage=False` counts the paper's logical tokens (REFERENCE.md: 2·L·d·Σn + V·d).
  """
  d, layers = cfg.d_model, cfg.n_layers
  embedding = cfg.padded_vocab * d
  final_norm = 2 * d if cfg.final_norm_params else 0
  norms = 2 * d * {"none": 0, "bias": 1, "scale_bias": 2}[cfg.norm_params]   # the block's two LayerNorms
  if cfg.architecture == "tokenformer":
    rows = cfg.storage_tokens if storage else cfg.tokens
    per_layer = sum(2 * rows(p) * d for p in PROJECTIONS) + norms
  else:
    hidden = cfg.mlp_hidden
    attention = 4 * (d * d + d)
    matrices = 2 if cfg.mlp == "gelu" else 3   # each with its bias
    mlp = (matrices - 1) * (d * hidden + hidden) + hidden * d + d
    per_layer = attention + mlp + norms
  non_embedding = layers * per_layer + final_norm
  if cfg.vision is not None:   # dense patch embedding, class token, position embeddings in; a dense head out
    v = cfg.vision
    embedding = v.patch_features * d + d + (v.pooling == "cls") * d + v.sequence_length * d
    non_embedding += d * v.num_classes + v.num_classes
  return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Training FLOPs per token (forward + backward = 3 × forward), matmuls only.

  Each stored parameter in a projection costs 2 FLOPs per token forward (a multiply and an add); token-token
  attention costs 2·2·T·d per layer forward (scores and weighted sum, counted over the full square as XLA
  computes it); the tied logits cost 2·V·d.
  """
  params = count_params(cfg)
  matmul_params = params["non_embedding"] - (2 * cfg.d_model if cfg.final_norm_params else 0) + params["embedding"]
  attention = cfg.n_layers * 2 * 2 * seq_len * cfg.d_model
  if cfg.vision is not None:   # per token: the blocks and the patch embedding; the head once per image
    v = cfg.vision
    head = cfg.d_model * v.num_classes
    matmul_params = (params["non_embedding"] - (2 * cfg.d_model if cfg.final_norm_params else 0) - head
                     - v.num_classes + v.patch_features * cfg.d_model + head / seq_len)
  return 3 * (2 * matmul_params + attention)


# Loading experiment files ------------------------------------------------------------------------------
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(spec: str) -> Any:
  """`path/to/file.py:NAME` → the object NAME in that file, called if it is a function.

  A relative path is looked up from the working directory, then from the repository root.
  """
  path_text, sep, name = spec.partition(":")
  if not sep or not name:
    raise ValueError(f"config {spec!r} must look like 'experiments/FILE.py:NAME'")
  path = pathlib.Path(path_text)
  if not path.is_absolute() and not path.exists():
    path = REPO_ROOT / path
  if not path.is_file():
    raise ValueError(f"config file {path_text!r} not found (tried it from the working directory and {REPO_ROOT})")
  module_spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, name):
    public = sorted(k for k in vars(module) if not k.startswith("_"))
    raise ValueError(f"{path_text} has no config named {name!r}; it has: {', '.join(public)}")
  value = getattr(module, name)
  return value() if callable(value) and not isinstance(value, type) else value


# Serialisation and overrides ---------------------------------------------------------------------------
def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def non_defaults(cfg) -> dict:
  """The fields of a config that differ from their defaults, nested as in `to_dict`: an identity of the config
  (for naming its run, say) that a field added later, with a default, leaves as it was."""
  diff = {}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    default = (field.default if field.default is not dataclasses.MISSING else
               field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
    if dataclasses.is_dataclass(value):
      nested = non_defaults(value)
      if nested or type(default) is not type(value):   # a block present where its default is None counts
        diff[field.name] = nested
    elif value != default:
      diff[field.name] = list(value) if isinstance(value, tuple) else value
  return diff


def from_dict(cls, values: dict):
  """Rebuild a (nested) config dataclass from `to_dict`'s output, e.g. one read back from a checkpoint."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value, kind = values[field.name], _dataclass_in(hints[field.name])
    if kind is not None and isinstance(value, dict):
      value = from_dict(kind, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(**kwargs)


def _dataclass_in(hint):
  """The dataclass type inside a hint such as `ParamTokens | None`, else None."""
  for candidate in (hint, *typing.get_args(hint)):
    if dataclasses.is_dataclass(candidate):
      return candidate
  return None


def _parse_like(text: str, current: Any, where: str) -> Any:
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{where}: expected true or false, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(current, tuple):
    return tuple(part for part in text.split(",") if part)
  for kind in (int, float):
    if isinstance(current, kind):
      try:
        return kind(text)
      except ValueError:
        raise ValueError(f"{where}: expected {kind.__name__}, got {text!r}") from None
  if isinstance(current, str):
    return text
  raise ValueError(f"{where}: cannot be set from the command line (it is {type(current).__name__})")


def apply_overrides(cfg, overrides: typing.Iterable[str]):
  """Apply `dotted.field=value` strings, typed by the field's current value: `optim.learning_rate=3e-4`; then
  check every field of the result (one ValueError naming the first field out of range)."""
  for override in overrides:
    path, sep, text = override.partition("=")
    if not sep:
      raise ValueError(f"override {override!r} must look like 'field.subfield=value'")
    cfg = _replace_path(cfg, path.strip().split("."), text.strip(), path)
  return validate(cfg)


def _replace_path(obj, parts: list[str], text: str, full: str):
  name = parts[0]
  if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
    fields = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else "none"
    raise ValueError(f"override {full!r}: no field {name!r} here (fields: {fields})")
  current = getattr(obj, name)
  value = _replace_path(current, parts[1:], text, full) if len(parts) > 1 else _parse_like(text, current, full)
  return dataclasses.replace(obj, **{name: value})
