"""Weight-only quantization: INT8 / INT4 layers and the algorithms that fill them."""

from .layers import Int4Linear, Int8Linear, QuantLinear

__all__ = ["Int4Linear", "Int8Linear", "QuantLinear"]
