from vaqkd.quant import intconv
from vaqkd.quant.convert import calibrate, quantize, quantize_student, quantizers, set_grad_batch
from vaqkd.quant.fusion import install_fusions, remove_fusions
from vaqkd.quant.layers import QConv2d, QLinear
from vaqkd.quant.quantizers import (
    ACT_QUANTIZERS,
    WEIGHT_QUANTIZERS,
    DoReFaQuantizer,
    EWGSQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    Quantizer,
)
from vaqkd.quant.residual import IntResidualBlock, install_int_residual, residual_mode

__all__ = [
    "quantize", "quantize_student", "install_int_residual", "IntResidualBlock", "residual_mode", "install_fusions",
    "remove_fusions",
    "calibrate", "intconv", "quantizers", "set_grad_batch", "QConv2d", "QLinear", "Quantizer", "LSQQuantizer",
    "EWGSQuantizer", "PACTQuantizer", "DoReFaQuantizer", "WEIGHT_QUANTIZERS", "ACT_QUANTIZERS",
]  # fmt: skip
