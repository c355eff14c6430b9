"""The main job: a small TokenFormer trained on the shipped Python-docs corpus, on CPU, in a few minutes.

  python -m tokenformer_jax.cli.train --config=experiments/demo.py:demo --workdir=runs/demo

Point it at your own data with --set data.train_files=PATH_OR_GLOB (jsonl/jsonl.gz/txt, local or gs://), or
--set data.tfds_name=NAME --set data.tfds_data_dir=DIR; a new corpus wants its own tokenizer
(python -m tokenformer_jax.data.tokenizer) and --set data.tokenizer=... --set model.vocab_size=...
"""
from tokenformer_jax.config import DataConfig, ModelConfig, OptimConfig, ParamTokens, TrainConfig

demo = TrainConfig(
    model=ModelConfig(name="demo", vocab_size=2048, d_model=128, n_layers=4, n_heads=4,
                      param_tokens=ParamTokens.uniform(128, 512), positions="none", max_seq_len=128),
    # The shipped corpus and its 2048-piece BPE tokenizer; 10% of its 60 documents held out (5% would be one).
    data=DataConfig(seq_len=128, validation_fraction=0.1),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=40, min_lr_ratio=0.1),
    steps=400, global_batch=16, eval_every=100, eval_batches=8, log_every=20, checkpoint_every=100,
    keep_checkpoints=2)

# Seconds, not minutes: what the trainer's tests run.
test_run = demo.replace(
    model=demo.model.replace(name="test_run", d_model=32, n_layers=2, n_heads=2,
                             param_tokens=ParamTokens(24, 20, 28, 16, 72), token_multiple=8, max_seq_len=32),
    data=demo.data.replace(seq_len=32),
    optim=demo.optim.replace(warmup_steps=4),
    steps=12, global_batch=8, eval_every=6, eval_batches=2, log_every=2, checkpoint_every=4)

# test_run grown: every token count larger (and not a multiple of 8, so the padding moves).
test_run_grown = test_run.replace(
    model=test_run.model.replace(name="test_run_grown", param_tokens=ParamTokens(50, 37, 61, 29, 150)))
