"""The paper's model configurations (Table 9) and the GPT-2-size Transformer baselines.

Ladder rows are the authors' JAX/TPU models: no positional encoding, tied logits divided by sqrt(d), fan-in
init. Pile rows are the authors' PyTorch models: rotary on 25% of each head's dims, NeoX init.
Token counts are the paper's; storage rounds them up to a multiple of 64 with inert rows so that the
parameter-token axis divides every power-of-two mesh up to 64 shards.
"""
from tokenformer_jax.config import ModelConfig, ParamTokens

VOCAB = 50277          # GPT-NeoX-20B tokenizer; padded to 50,304 in storage
TOKEN_MULTIPLE = 64


def _tokenformer(name, layers, d, attention_tokens, ffn_tokens, heads, **style):
  return ModelConfig(name=name, architecture="tokenformer", vocab_size=VOCAB, d_model=d, n_layers=layers,
                     n_heads=heads, param_tokens=ParamTokens.uniform(attention_tokens, ffn_tokens),
                     token_multiple=TOKEN_MULTIPLE, **style)


LADDER_STYLE = dict(positions="none", logits_divide_by_sqrt_d=True, init="fan_in")
PILE_STYLE = dict(positions="rotary", rotary_fraction=0.25, init="neox", logits_divide_by_sqrt_d=False,
                  max_seq_len=2048)

# Paper Table 9: the progressive-scaling ladder (OpenWebText, seq 1024).
ladder_124m = _tokenformer("ladder_124m", 12, 768, 576, 2304, 12, **LADDER_STYLE)
ladder_354m = _tokenformer("ladder_354m", 12, 768, 2140, 8560, 12, **LADDER_STYLE)
ladder_757m = _tokenformer("ladder_757m", 12, 768, 4850, 19400, 12, **LADDER_STYLE)
ladder_1_4b = _tokenformer("ladder_1_4b", 12, 768, 8620, 34480, 12, **LADDER_STYLE)
LADDER = (ladder_124m, ladder_354m, ladder_757m, ladder_1_4b)

# Paper Table 9: the Pile models (seq 2048).
pile_150m = _tokenformer("pile_150m", 12, 768, 768, 3072, 12, **PILE_STYLE)
pile_450m = _tokenformer("pile_450m", 24, 1024, 1024, 4096, 16, **PILE_STYLE)
pile_900m = _tokenformer("pile_900m", 32, 1280, 1280, 5120, 16, **PILE_STYLE)
pile_1_5b = _tokenformer("pile_1_5b", 40, 1536, 1536, 6144, 16, **PILE_STYLE)
PILE = (pile_150m, pile_450m, pile_900m, pile_1_5b)


def _gpt2(name, layers, d, heads):
  return ModelConfig(name=name, architecture="transformer", vocab_size=VOCAB, d_model=d, n_layers=layers,
                     n_heads=heads, positions="rotary", rotary_fraction=0.25, logits_divide_by_sqrt_d=False,
                     max_seq_len=1024)


# The Transformers trained from scratch that the ladder is compared with (paper Fig. 3; GPT-2 sizes).
transformer_124m = _gpt2("transformer_124m", 12, 768, 12)
transformer_354m = _gpt2("transformer_354m", 24, 1024, 16)
transformer_757m = _gpt2("transformer_757m", 36, 1280, 20)
transformer_1_4b = _gpt2("transformer_1_4b", 48, 1600, 25)
TRANSFORMERS = (transformer_124m, transformer_354m, transformer_757m, transformer_1_4b)

ALL = LADDER + PILE + TRANSFORMERS
