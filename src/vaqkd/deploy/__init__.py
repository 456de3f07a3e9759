"""Deployable 2-bit models: dense code packing and the packed artifact (`vaqkd export`)."""

from vaqkd.deploy.artifact import ExportError, export_packed, load, pack_model, read_header, save_artifact
from vaqkd.deploy.pack import pack_codes, packed_size, unpack_codes

# what `vaqkd export --format` writes and `vaqkd eval --backend` runs (ONNX needs the deploy extra)
EXPORT_FORMATS = {"packed": "2-bit codes and the header in one safetensors file (export_packed)",
                  "onnx": "a QDQ graph (uint8 input) whose convolutions run as integer kernels (onnx_export)"}
EVAL_BACKENDS = {"torch": "a run directory or a packed artifact, in PyTorch",
                 "onnxruntime": "an ONNX graph (or a run/artifact exported in memory), in ONNX Runtime",
                 "openvino": "an ONNX graph (or a run/artifact exported in memory), in OpenVINO, f32",
                 "torch-int8": "an integer-residual run or artifact as oneDNN int8 convs (torch_int8)"}  # fmt: skip


def backend_for(path: str) -> str:
    """The eval backend a file needs: onnxruntime for an .onnx graph, torch for a run or a packed artifact."""
    return "onnxruntime" if str(path).endswith(".onnx") else "torch"

__all__ = [
    "EXPORT_FORMATS",
    "EVAL_BACKENDS",
    "backend_for",
    "pack_codes",
    "unpack_codes",
    "packed_size",
    "export_packed",
    "load",
    "read_header",
    "ExportError",
    "pack_model",
    "save_artifact",
]
