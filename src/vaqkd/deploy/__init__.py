"""Deployable 2-bit models: dense code packing and the packed artifact (`vaqkd export`)."""

from vaqkd.deploy.artifact import ExportError, export_packed, load, pack_model, read_header, save_artifact
from vaqkd.deploy.pack import pack_codes, packed_size, unpack_codes

__all__ = [
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
