"""CPU-sized analogs of the paper's models, for tests, demos and the local ladder."""
from tokenformer_jax.config import ModelConfig, ParamTokens

# A byte-level vocabulary (256) keeps tests free of a tokenizer.
_TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)

tiny_tokenformer = ModelConfig(name="tiny_tokenformer", param_tokens=ParamTokens.uniform(64, 256), **_TINY)
tiny_transformer = ModelConfig(name="tiny_transformer", architecture="transformer", logits_divide_by_sqrt_d=False,
                               **_TINY)

# A three-stage ladder with the paper's shape: same d and layers, only the token counts grow (×~3.7, ×2.3, ×1.8
# as in 576 → 2140 → 4850 → 8620). Counts are deliberately not multiples of 8: storage pads them.
tiny_ladder = tuple(
    ModelConfig(name=f"tiny_ladder_{i}", param_tokens=ParamTokens.uniform(a, f), token_multiple=8,
                positions="none", logits_divide_by_sqrt_d=True, **_TINY)
    for i, (a, f) in enumerate([(36, 144), (134, 535), (303, 1212)]))
