"""The progressive-scaling ladders: each stage is a TrainConfig plus where it runs and how it grows.

  python -m launch.ladder --ladder=paper --backend=tpu --workdir=gs://BUCKET/ladder --project=P --zone=Z
  python -m launch.ladder --ladder=tiny --backend=local --workdir=runs/tiny_ladder

Every stage's TrainConfig is also a top-level name here, so one stage trains on its own with
`python -m tokenformer_jax.cli.train --config=experiments/ladder.py:paper_354m --workdir=...`.

A grown stage keeps the first stage's norm scale (`norm_scale_tokens`): with the scale fixed, zero-key growth
leaves the model's function unchanged (paper App. B), and the same sqrt(n) holds for the whole ladder.
"""

import dataclasses
import math
import pathlib

from tokenformer_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig, load_config

_HERE = pathlib.Path(__file__).resolve().parent
INITS = ("scratch", "zero_keys", "random")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One rung: train `config` for `tokens` tokens on `accelerator`, growing from the previous rung by `init`."""
  name: str               # unique; also the config's name in this file and the stage's directory
  config: TrainConfig
  accelerator: str        # a TPU type ("v4-64") for the tpu backend; "cpu" for the local one
  tokens: int             # the token budget; config.steps = ceil(tokens / (global_batch × seq_len))
  init: str = "scratch"   # "scratch" (the first stage), or the growth init of new parameter tokens

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"stage {self.name}: init must be one of {INITS}, got {self.init!r}")
    if self.config.steps != steps_for(self.tokens, self.config):
      raise ValueError(f"stage {self.name}: {self.tokens} tokens need {steps_for(self.tokens, self.config)} steps "
                       f"of {self.tokens_per_step} tokens, but config.steps={self.config.steps}")

  @property
  def tokens_per_step(self) -> int:
    return self.config.global_batch * self.config.data.seq_len

  @property
  def steps(self) -> int:
    return self.config.steps


def steps_for(tokens: int, cfg: TrainConfig) -> int:
  return math.ceil(tokens / (cfg.global_batch * cfg.data.seq_len))


def _stage(name, base: TrainConfig, model: ModelConfig, first: ModelConfig, tokens: int, accelerator: str,
           init: str, mesh: MeshConfig = MeshConfig()) -> Stage:
  model = model.replace(name=name, norm_scale_tokens=first.param_tokens)
  config = base.replace(model=model, mesh=mesh)
  return Stage(name, config.replace(steps=steps_for(tokens, config)), accelerator, tokens, init)


# The paper's ladder (§4.1, App. D): OpenWebText, seq 1024, batch 512, AdamW 6e-4, 2000 warmup steps then
# cosine to zero, weight decay 0.1. 124M from scratch on ~300B tokens, then 30B tokens per grown stage.
# The data are a token store of OpenWebText prepared once (README, "Data at scale"):
#   python -m tokenformer_jax.data.prepare --tfds_name=openwebtext --tfds_data_dir=gs://BUCKET/tensorflow_datasets \
#       --tokenizer=gs://BUCKET/tokenizer.model --store=gs://BUCKET/stores/openwebtext
# and the command line names it and the tokenizer (a model of 50,277 pieces): `--set data.store=gs://...`
# `--set data.tokenizer=gs://...`. Every host then reads its own windows from the store (no tokenizing at start).
# Without a store, `--set data.tfds_data_dir=gs://...` still works: process 0 prepares the store once into
# gs://.../tensorflow_datasets/tokenformer_stores/KEY (the other hosts wait) and every later run reuses it.
_PAPER_MODELS = load_config(f"{_HERE / 'paper.py'}:LADDER")
_PAPER_BASE = TrainConfig(
    model=_PAPER_MODELS[0],
    data=DataConfig(tfds_name="openwebtext", store="", seq_len=1024),
    optim=OptimConfig(learning_rate=6e-4, warmup_steps=2000, schedule="cosine", min_lr_ratio=0.0,
                      weight_decay=0.1),
    global_batch=512, eval_every=2000, eval_batches=20, log_every=100, checkpoint_every=2000, keep_checkpoints=3)
_FSDP = MeshConfig(data=1, fsdp=-1, preset="fsdp")   # the larger stages shard parameters and optimizer state
# Slices are a first guess (16 sequences per chip on v4-64); revise them with the plan tool.
PAPER = (
    _stage("paper_124m", _PAPER_BASE, _PAPER_MODELS[0], _PAPER_MODELS[0], 300 * 10**9, "v4-64", "scratch"),
    _stage("paper_354m", _PAPER_BASE, _PAPER_MODELS[1], _PAPER_MODELS[0], 30 * 10**9, "v4-64", "zero_keys"),
    _stage("paper_757m", _PAPER_BASE, _PAPER_MODELS[2], _PAPER_MODELS[0], 30 * 10**9, "v4-128", "zero_keys", _FSDP),
    _stage("paper_1_4b", _PAPER_BASE, _PAPER_MODELS[3], _PAPER_MODELS[0], 30 * 10**9, "v4-128", "zero_keys", _FSDP),
)
paper_124m, paper_354m, paper_757m, paper_1_4b = (stage.config for stage in PAPER)

# The same flow on CPU in about a minute: the tiny ladder's models on the shipped corpus and its 2048-piece
# tokenizer, a few dozen steps each, checkpoints every 5 steps so an interrupted stage resumes mid-way.
_TINY_MODELS = [m.replace(vocab_size=2048, max_seq_len=64) for m in load_config(f"{_HERE / 'tiny.py'}:tiny_ladder")]
_TINY_BASE = TrainConfig(
    model=_TINY_MODELS[0], data=DataConfig(seq_len=64),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, min_lr_ratio=0.1),
    global_batch=8, eval_every=1000, eval_batches=2, log_every=5, checkpoint_every=5, keep_checkpoints=2)
TINY = tuple(
    _stage(f"tiny_{i}", _TINY_BASE, model, _TINY_MODELS[0], tokens, "cpu", "scratch" if i == 0 else "zero_keys")
    for i, (model, tokens) in enumerate(zip(_TINY_MODELS, [30 * 512, 20 * 512, 20 * 512], strict=True)))
tiny_0, tiny_1, tiny_2 = (stage.config for stage in TINY)

LADDERS = {"paper": PAPER, "tiny": TINY}
