"""Growing trained models: TokenFormer by appending parameter tokens, the dense baseline by Net2Net."""
from tokenformer_jax.growth.tokenformer import INITS, check_growable, grow, grown_config

__all__ = ["INITS", "check_growable", "grow", "grown_config"]
