"""tokenformer_jax: TokenFormer models in JAX/Flax for TPU v4 pods."""
from setuptools import find_packages, setup

setup(
    name="tokenformer_jax",
    version="0.1.0",
    description="TokenFormer (Pattention) language models in JAX/Flax: train, grow by appending parameter "
                "tokens, and launch the 124M → 1.4B ladder on TPU v4.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tokenformer_jax", "tokenformer_jax.*"]),
    package_data={"tokenformer_jax": ["data/corpus/*"]},
    # Lower bounds are the versions this project is tested with on Python 3.11; TPU users run newer.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "sentencepiece>=0.2.3",
        "tokenizers>=0.15",    # tokenizer.json files (GPT-NeoX-20B's BPE, the released TokenFormer models' tokenizer)
        "absl-py>=2.1",
        "tensorboard>=2.16",   # its TF-free event writer for training logs, and the viewer for them
        "numpy>=1.26",
        "fsspec>=2024.1",      # token stores on gs:// (with gcsfs, the 'tpu' extra) or memory:// are read through it
        "matplotlib>=3.8",   # cli/report.py and experiments/: loss-against-FLOPs plots (PNG, Agg backend)
    ],
    extras_require={
        # libtpu for tests/test_plan.py, which compiles a step for a TPU v4 topology on CPU; lm_eval for
        # tests/test_inference.py, which runs the lm-evaluation-harness adapter and a local task through lm_eval;
        # scikit-learn (the "vision" extra) for tests/test_vision.py; wandb for the tracker's offline files read
        # back in tests/test_inference.py; pytest-xdist runs the full suite on 2 workers.
        # lm_eval's own requirements have no torch (torch comes only with its "hf"/"vllm"/... extras, never here).
        "test": ["pytest>=8", "pytest-xdist>=3.8", "jax[tpu]>=0.10.2", "lm_eval>=0.4.13", "scikit-learn>=1.9.1",
                 "wandb>=0.31"],
        # Weights & Biases as a metrics sink (logging.wandb=PROJECT[/ENTITY]; train/logger.py); offline in tests.
        "wandb": ["wandb>=0.31"],
        # Image classifiers on scikit-learn's digits (data.image_source="digits", experiments/vision.py): the 1,797
        # images ship inside the scikit-learn wheel; tests/test_vision.py needs it too (hence also in "test").
        "vision": ["scikit-learn>=1.9.1"],
        # lm-evaluation-harness (the paper's zero-shot tasks): python -m tokenformer_jax.cli.lm_eval, without torch.
        "eval": ["lm_eval>=0.4.13"],
        # The TPU compiler, to plan a TPU run from any machine (cli/plan.py): jax[tpu] pins the libtpu its jax
        # was built with (libtpu==0.0.42.* for jax 0.10.2). Where no TPU is attached the tools set JAX_PLATFORMS=cpu.
        "plan": ["jax[tpu]>=0.10.2"],
        # gcsfs: gs:// paths for data, tokenizers and checkpoints without TensorFlow (through fsspec).
        "tpu": ["jax[tpu]>=0.10.2", "gcsfs"],
    },
    # lm_eval with the "tokenformer_jax" model registered (lm_eval has no plugin entry points for models).
    entry_points={"console_scripts": ["tokenformer-lm-eval=tokenformer_jax.cli.lm_eval:main"]},
)
