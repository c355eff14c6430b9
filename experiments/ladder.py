"""The progressive-scaling ladders: each stage is a TrainConfig plus where it runs and how it grows.

  python -m launch.ladder --ladder=paper --backend=tpu --workdir=gs://BUCKET/ladder --project=P --zone=Z
  python -m launch.ladder --ladder=tiny --backend=local --workdir=runs/tiny_ladder

Every stage's TrainConfig is also a top-level name here, so one stage trains on its own with
`python -m tokenformer_jax.cli.train --config=experiments/ladder.py:paper_354m --workdir=...`.

A grown stage keeps the first stage's norm scale (`norm_scale_tokens`): with the scale fixed, zero-key growth
leaves the model's function unchanged (paper App. B), and the same sqrt(n) holds for the whole ladder.
"""

import pathlib

from tokenformer_jax.config import DataConfig, MeshConfig, OptimConfig, TrainConfig, load_config
from tokenformer_jax.ladder import stage

_HERE = pathlib.Path(__file__).resolve().parent


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
# The recipe, from the plan (`python -m tokenformer_jax.cli.plan --ladder=paper`; README "Run the ladder on TPU
# v4"): bfloat16 compute (parameters and Adam moments stay float32), FSDP over all chips (parameters and
# optimizer state split along the parameter-token axis), the least rematerialisation that fits, and the tanh
# GeLU: the exact (erf) GeLU over every [tokens, n] score matrix is vector-unit work that the TPU v4 cost model
# puts at a fifth of ladder_1_4b's step (MFU 45.4% → 56.4% on a v4-32; README "Pattention kernels and MFU").
# The plain kernel with remat="projections" beat the lean kernel at every stage (1.4B compared on a v4-32;
# `cli.plan --ladder=paper --compare --kernels=plain,lean`). (The authors' ladder code is Flax, whose nn.gelu
# defaults to the tanh form; their PyTorch models use the exact one, as imports must.)
_FSDP = MeshConfig(data=1, fsdp=-1, tensor=1, preset="fsdp")
_RECIPE = dict(dtype="bfloat16", approximate_gelu=True)
_P = dict(first=_PAPER_MODELS[0], mesh=_FSDP)
PAPER = (
    stage("paper_124m", _PAPER_BASE, _PAPER_MODELS[0], tokens=300 * 10**9, accelerator="v4-64", init="scratch",
          model_changes=dict(_RECIPE, remat="projections"), **_P),
    stage("paper_354m", _PAPER_BASE, _PAPER_MODELS[1], tokens=30 * 10**9, accelerator="v4-64", init="zero_keys",
          model_changes=dict(_RECIPE, remat="projections"), **_P),
    stage("paper_757m", _PAPER_BASE, _PAPER_MODELS[2], tokens=30 * 10**9, accelerator="v4-128", init="zero_keys",
          model_changes=dict(_RECIPE, remat="projections"), **_P),
    stage("paper_1_4b", _PAPER_BASE, _PAPER_MODELS[3], tokens=30 * 10**9, accelerator="v4-128", init="zero_keys",
          model_changes=dict(_RECIPE, remat="projections"), **_P),
)
paper_124m, paper_354m, paper_757m, paper_1_4b = (s.config for s in PAPER)

# The same flow on CPU in about a minute: the tiny ladder's models on the shipped corpus and its 2048-piece
# tokenizer, a few dozen steps each, checkpoints every 5 steps so an interrupted stage resumes mid-way.
_TINY_MODELS = [m.replace(vocab_size=2048, max_seq_len=64) for m in load_config(f"{_HERE / 'tiny.py'}:tiny_ladder")]
_TINY_BASE = TrainConfig(
    model=_TINY_MODELS[0], data=DataConfig(seq_len=64),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, min_lr_ratio=0.1),
    global_batch=8, eval_every=1000, eval_batches=2, log_every=5, checkpoint_every=5, keep_checkpoints=2)
TINY = tuple(
    stage(f"tiny_{i}", _TINY_BASE, model, first=_TINY_MODELS[0], tokens=tokens, accelerator="cpu",
          init="scratch" if i == 0 else "zero_keys")
    for i, (model, tokens) in enumerate(zip(_TINY_MODELS, [30 * 512, 20 * 512, 20 * 512], strict=True)))
tiny_0, tiny_1, tiny_2 = (s.config for s in TINY)

LADDERS = {"paper": PAPER, "tiny": TINY}
