from vaqkd.quant.convert import calibrate, quantize, quantizers, set_grad_batch
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

__all__ = [
    "quantize", "install_fusions", "remove_fusions",
    "calibrate", "quantizers", "set_grad_batch", "QConv2d", "QLinear", "Quantizer", "LSQQuantizer",
    "EWGSQuantizer", "PACTQuantizer", "DoReFaQuantizer", "WEIGHT_QUANTIZERS", "ACT_QUANTIZERS",
]  # fmt: skip
