"""Growing trained models: TokenFormer by appending parameter tokens, the dense baseline by Net2Net."""
from tokenformer_jax.growth.net2net import net2net_widen, widening_factor
from tokenformer_jax.growth.provenance import OPTIMIZERS, Provenance, read_provenance, start_from_grown
from tokenformer_jax.growth.tokenformer import (INITS, check_growable, grow, grow_moments, grown_config,
                                                nonzero_padding)

__all__ = ["INITS", "OPTIMIZERS", "Provenance", "check_growable", "grow", "grow_moments", "grown_config",
           "net2net_widen", "nonzero_padding", "read_provenance", "start_from_grown", "widening_factor"]
