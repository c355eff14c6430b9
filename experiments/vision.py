"""Image classifiers: the paper's visual models (Table 9) and the CPU main job on scikit-learn's digits.

  python -m tokenformer_jax.cli.train --config=experiments/vision.py:digits --workdir=runs/digits

Table 9's visual rows on ImageNet-1K shapes (224², patch 16, 1000 classes, class token), with the ViT baselines they
are matched to. Patch embedding and head are dense (model/vision.py says why). Parameter counts (count_params,
logical tokens; tests/test_vision.py checks them against the initialised models):

  tokenformer_base_matched   Base†  576 / 2304 tokens   86.5M   (paper: 86M)
  tokenformer_base           Base   768 / 3072 tokens  114.8M   (paper: 109M; the blocks alone are 113.2M)
  tokenformer_large_matched  Large† 768 / 3072 tokens  304.0M   (paper: 307M; Table 9's 768 FFN tokens give 190.8M)
  tokenformer_large          Large 1024 / 4096 tokens  404.7M   (paper: 407M)
  vit_b16                    ViT-B/16                    86.6M   (paper: 86M)
  vit_l16                    ViT-L/16                   304.3M   (paper: 307M)

docs/vision.md has the arithmetic. The CPU configs: `digits` (the main job: a TokenFormer whose attention and FFN
token counts are Base†'s ratios to d, 0.75·d and 3·d, so its blocks hold exactly the 12·L·d² weights of a ViT),
`digits_vit` (its dense twin, the same recipe), `digits_grown` (`digits` with Base's ratios, d and 4·d: the
Base† → Base step), and `digits_test` (seconds: what the tests train).
"""
import dataclasses

from tokenformer_jax.config import DataConfig, ModelConfig, OptimConfig, ParamTokens, TrainConfig, VisionConfig
from tokenformer_jax.ladder import stage

IMAGENET = VisionConfig(image_size=224, patch_size=16, channels=3, num_classes=1000, pooling="cls")
TOKEN_MULTIPLE = 64


def _tokenformer(name, layers, d, attention_tokens, ffn_tokens, heads):
  return ModelConfig(name=name, d_model=d, n_layers=layers, n_heads=heads, vision=IMAGENET,
                     param_tokens=ParamTokens.uniform(attention_tokens, ffn_tokens), token_multiple=TOKEN_MULTIPLE)


def _vit(name, layers, d, heads):
  return ModelConfig(name=name, architecture="transformer", d_model=d, n_layers=layers, n_heads=heads, vision=IMAGENET)


# Paper Table 9, "Visual Modeling" (Large† with 3072 FFN tokens, not the table's 768: see docs/vision.md).
tokenformer_base_matched = _tokenformer("tokenformer_base_matched", 12, 768, 576, 2304, 12)
tokenformer_base = _tokenformer("tokenformer_base", 12, 768, 768, 3072, 12)
tokenformer_large_matched = _tokenformer("tokenformer_large_matched", 24, 1024, 768, 3072, 16)
tokenformer_large = _tokenformer("tokenformer_large", 24, 1024, 1024, 4096, 16)
vit_b16 = _vit("vit_b16", 12, 768, 12)
vit_l16 = _vit("vit_l16", 24, 1024, 16)
TABLE_9 = (tokenformer_base_matched, tokenformer_base, tokenformer_large_matched, tokenformer_large)
VITS = (vit_b16, vit_l16)

# The CPU main job: scikit-learn's 1,797 8×8 digits (stratified 80/20 split, seed 0), 4×4 patches (4 + a class token).
DIGITS = VisionConfig(image_size=8, patch_size=4, channels=1, num_classes=10, pooling="cls")
_D = 64
digits = TrainConfig(
    model=ModelConfig(name="digits", d_model=_D, n_layers=3, n_heads=4, vision=DIGITS,
                      param_tokens=ParamTokens.uniform(3 * _D // 4, 3 * _D)),
    data=DataConfig(image_source="digits", image_crop_padding=1),
    optim=OptimConfig(learning_rate=2e-3, warmup_steps=100, min_lr_ratio=0.01, weight_decay=0.05, b2=0.99),
    steps=1500, global_batch=64, eval_every=100, eval_batches=6, log_every=50, checkpoint_every=500,
    keep_checkpoints=2)

# The dense ViT at the same width and depth and the same recipe: 12·d² weights per block, as digits' Pattentions.
digits_vit = digits.replace(model=ModelConfig(name="digits_vit", architecture="transformer", d_model=_D, n_layers=3,
                                              n_heads=4, vision=DIGITS))

# digits with more parameter tokens (Base's ratios): cli.grow grows a digits run into it.
digits_grown = digits.replace(model=digits.model.replace(name="digits_grown",
                                                         param_tokens=ParamTokens.uniform(_D, 4 * _D)))

# Seconds, not minutes: what tests/test_vision.py trains (and grows into digits_test_grown).
digits_test = digits.replace(
    model=digits.model.replace(name="digits_test", d_model=16, n_layers=1, n_heads=2,
                               param_tokens=ParamTokens(12, 10, 14, 8, 40), token_multiple=8),
    optim=digits.optim.replace(warmup_steps=2, learning_rate=3e-3),
    steps=8, global_batch=32, eval_every=4, eval_batches=12, log_every=2, checkpoint_every=4)
digits_test_grown = digits_test.replace(
    model=digits_test.model.replace(name="digits_test_grown", param_tokens=ParamTokens(20, 13, 17, 9, 61)))

# ImageNet-1K with the recipe of the paper's Table 2, He et al. (2022)'s supervised training from scratch (MAE
# Table 11, as we read it): AdamW β = (0.9, 0.95), weight decay 0.3, batch 4096 at lr = 1e-4 × 4096 / 256,
# 20 warm-up epochs then cosine decay to 0, 300 epochs for Base and 200 for Large, RandAugment (9, 0.5), label
# smoothing 0.1, mixup 0.8, cutmix 1.0, drop path 0.1 (Base) / 0.2 (Large), EMA of the weights 0.9999
# (evaluated beside them), no gradient clipping. The data:
# tfds:imagenet2012 prepared in array_record under data.tfds_data_dir (data/tfds_images.py), e.g.
#   --set data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_BATCH = 4096
STEPS_PER_EPOCH = -(-IMAGENET_TRAIN_IMAGES // IMAGENET_BATCH)   # 313 (the last batch of an epoch is padded)
IMAGENET_DATA = DataConfig(image_source="tfds:imagenet2012", image_flip=True, image_randaugment_ops=2,
                           image_randaugment_magnitude=9.0, image_randaugment_std=0.5, image_mixup=0.8,
                           image_cutmix=1.0, image_label_smoothing=0.1, worker_count=16)


def _imagenet(model: ModelConfig, epochs: int, drop_path: float) -> TrainConfig:
  return TrainConfig(
      model=model.replace(dtype="bfloat16", remat="full", drop_path=drop_path), data=IMAGENET_DATA,
      optim=OptimConfig(learning_rate=1e-4 * IMAGENET_BATCH / 256, warmup_steps=20 * STEPS_PER_EPOCH,
                        min_lr_ratio=0.0, weight_decay=0.3, b1=0.9, b2=0.95, grad_clip=0.0, ema_decay=0.9999),
      steps=epochs * STEPS_PER_EPOCH, global_batch=IMAGENET_BATCH, eval_every=10 * STEPS_PER_EPOCH,
      eval_batches=13, log_every=50, checkpoint_every=STEPS_PER_EPOCH, keep_checkpoints=3)


imagenet_base = _imagenet(tokenformer_base, 300, 0.1)
imagenet_base_matched = _imagenet(tokenformer_base_matched, 300, 0.1)
imagenet_large = _imagenet(tokenformer_large, 200, 0.2)
imagenet_large_matched = _imagenet(tokenformer_large_matched, 200, 0.2)
imagenet_vit_b16 = _imagenet(vit_b16, 300, 0.1)
imagenet_vit_l16 = _imagenet(vit_l16, 200, 0.2)

# Base shrunk to seconds, the same pipeline and recipe (tests/test_imagenet.py, under tfds.testing.mock_data):
# 32² images in 16² patches, d 32, two layers (the second with drop path), ImageNet's 1000 classes.
imagenet_test = imagenet_base.replace(
    model=tokenformer_base.replace(name="imagenet_test", d_model=32, n_layers=2, n_heads=2, drop_path=0.2,
                                   vision=dataclasses.replace(IMAGENET, image_size=32),
                                   param_tokens=ParamTokens.uniform(24, 48), token_multiple=8),
    data=IMAGENET_DATA.replace(worker_count=0),
    optim=imagenet_base.optim.replace(warmup_steps=1, ema_decay=0.5),   # an EMA that moves in 4 steps
    steps=4, global_batch=8, eval_every=2, eval_batches=2, log_every=1, checkpoint_every=2, keep_checkpoints=3)

# A vision ladder (launch.ladder --ladder=experiments/vision.py:VISION_LADDER): Base† trained from scratch with the
# recipe, then grown into Base (576 → 768 attention tokens, 2304 → 3072 FFN tokens, zero keys) and trained 100
# epochs more, both on a v4-32; the grown stage keeps Base†'s norm scale, so growth keeps its function.
def _epochs(epochs: int) -> int:
  return epochs * STEPS_PER_EPOCH * IMAGENET_BATCH * IMAGENET.sequence_length   # tokens through the blocks


VISION_LADDER = (
    stage("vision_base_matched", imagenet_base_matched, imagenet_base_matched.model,
          first=imagenet_base_matched.model, tokens=_epochs(300), accelerator="v4-32", init="scratch"),
    stage("vision_base", imagenet_base, imagenet_base.model, first=imagenet_base_matched.model,
          tokens=_epochs(100), accelerator="v4-32", init="zero_keys"),
)
vision_base_matched, vision_base = (s.config for s in VISION_LADDER)
