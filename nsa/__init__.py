"""nsa: Native Sparse Attention for decoder-only Transformers."""

from nsa.config import ConfigError, NSAConfig
from nsa.ops import NSAAux, compress_mean, nsa_attention

__all__ = ["ConfigError", "NSAAux", "NSAConfig", "compress_mean", "nsa_attention"]
__version__ = "0.1.0"
