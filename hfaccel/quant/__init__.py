"""Weight-only quantization: INT8 / INT4 layers and the algorithms that fill them."""

from .formats import CheckpointError, load_quantized, save_quantized
from .layers import Int4Linear, Int8Linear, QuantLinear

__all__ = ["CheckpointError", "Int4Linear", "Int8Linear", "QuantLinear", "load_quantized", "save_quantized"]
