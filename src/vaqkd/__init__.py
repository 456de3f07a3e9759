"""vaqkd: W2A2 quantization-aware knowledge distillation with virtual anchors."""

__version__ = "0.1.0"
