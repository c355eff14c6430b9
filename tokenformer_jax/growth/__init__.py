"""Growing trained models: TokenFormer by appending parameter tokens, the dense baseline by Net2Net."""
from tokenformer_jax.growth.net2net import net2net_widen, widening_factor
from tokenformer_jax.growth.tokenformer import INITS, check_growable, grow, grown_config, nonzero_padding

__all__ = ["INITS", "check_growable", "grow", "grown_config", "nonzero_padding", "net2net_widen", "widening_factor"]
