"""tokenformer_jax: TokenFormer models in JAX/Flax. Pattention is the unit; models grow by appending tokens."""
__version__ = "0.1.0"
