"""Integrity of a packed artifact: a sha256 of every tensor (in the header) and of the header (beside it in the
file's metadata), and a check of every header field, so that a damaged or tampered file is refused by name
before a model is built from it.

    metadata = {"vaqkd": header as JSON text, "vaqkd_sha256": sha256 of that text}
    header["sha256"] = {"codes": sha256 of its bytes, "params": ...}

A flipped byte anywhere in the file then fails one of the two hashes (or the safetensors parser); a header that
is consistent but nonsensical (an unknown activation, `w_bits` 0, a normalisation that is not the dataset's)
fails the field checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import torch

from vaqkd.errors import RunFileError

FORMAT, VERSION = "vaqkd-packed", 2  # version 1 (before content hashes) is refused with a re-export hint
HEADER_KEY, HASH_KEY = "vaqkd", "vaqkd_sha256"
TENSORS = {"codes": torch.uint8, "params": torch.float32}  # the only tensors an artifact holds
DATASETS = ("cifar100", "cifar10", "folder")
QUANT_KEYS = ("w_bits", "a_bits", "weight", "act", "per_channel", "first_last")
LATER_QUANT_KEYS = ("residual", "residual_bits")  # optional: an artifact without them has a float residual


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in C order (little-endian, as safetensors stores them)."""
    return sha256(t.detach().contiguous().cpu().reshape(-1).numpy().tobytes())


def seal(tensors: dict[str, torch.Tensor], header: dict) -> dict[str, str]:
    """The metadata of an artifact: its header with the tensors' hashes, and the header's own hash."""
    text = json.dumps({**header, "sha256": {k: tensor_sha256(v) for k, v in sorted(tensors.items())}})
    return {HEADER_KEY: text, HASH_KEY: sha256(text)}


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _hex(v, n: int) -> bool:
    return isinstance(v, str) and re.fullmatch(f"[0-9a-f]{{{n}}}", v) is not None


def _check_quant(q) -> str | None:
    from vaqkd.config import QuantConfig
    from vaqkd.errors import ConfigError

    if not isinstance(q, dict) or not set(QUANT_KEYS) <= set(q) <= {*QUANT_KEYS, *LATER_QUANT_KEYS}:
        got = sorted(q) if isinstance(q, dict) else type(q).__name__
        return f"must be an object with keys {list(QUANT_KEYS)} (and {list(LATER_QUANT_KEYS)}), got {got}"
    kinds = {"w_bits": int, "a_bits": int, "weight": str, "act": str, "per_channel": bool, "first_last": str,
             "residual": str, "residual_bits": int}
    for k, kind in kinds.items():
        if k not in q:
            continue
        if not isinstance(q[k], kind) or (kind is int and isinstance(q[k], bool)):
            return f"{k}: expected {kind.__name__}, got {q[k]!r}"
    if q["weight"] != "lsq":
        return f"weight: {q['weight']!r} weights are never packed (LSQ only)"
    try:
        QuantConfig(enabled=True, **q).validate("quant")
    except ConfigError as e:
        return str(e).removeprefix("quant.")
    return None


def _check_norm(header: dict, key: str) -> str | None:
    from vaqkd.data.cifar import SPECS

    v = header[key]
    lo = 0.0 if key == "mean" else 1e-3  # images are in [0, 1]: a std is at most 0.5 and never ~0
    if not (isinstance(v, list) and len(v) == 3 and all(_num(x) and lo <= x <= 1 for x in v)):
        return f"must be 3 numbers in [{lo:g}, 1] (per RGB channel, images in [0, 1]), got {v!r}"
    spec = SPECS.get(header["dataset"])
    want = getattr(spec, key, None)
    if want is not None and max(abs(a - b) for a, b in zip(v, want)) > 1e-5:
        return f"{v} is not {header['dataset']}'s normalisation {list(want)}"
    return None


def check_header(header: dict) -> str | None:
    """The first header field that is missing, unknown, of the wrong type or out of range, as 'field: what'."""
    from vaqkd.models import MODELS

    simple = {
        "arch": lambda v: v in MODELS or f"unknown model {v!r}; registered: {sorted(MODELS)}",
        "num_classes": lambda v: _int(v, 2, 1_000_000) or f"must be an integer in [2, 1000000], got {v!r}",
        "dataset": lambda v: v in DATASETS or f"must be cifar100, cifar10 or folder, got {v!r}",
        "image_size": lambda v: _int(v, 8, 4096) or f"must be an integer in [8, 4096], got {v!r}",
        "packed_layers": lambda v: _int(v, 1, 10_000) or f"must be an integer in [1, 10000], got {v!r}",
        "codes_bytes": lambda v: _int(v, 1, 2**40) or f"must be a positive integer, got {v!r}",
        "param_count": lambda v: _int(v, 1, 2**40) or f"must be a positive integer, got {v!r}",
        "layout_sha1": lambda v: _hex(v, 16) or f"must be 16 hex digits, got {v!r}",
        "source_run": lambda v: isinstance(v, str) or f"must be a string, got {v!r}",
        "git_sha": lambda v: v is None or isinstance(v, str) or f"must be a string or null, got {v!r}",
        "top1_last": lambda v: v is None or (_num(v) and 0 <= v <= 100) or f"must be a percentage or null, got {v!r}",
        "sha256": lambda v: (isinstance(v, dict) and sorted(v) == sorted(TENSORS)
                             and all(_hex(h, 64) for h in v.values()))
        or f"must map {sorted(TENSORS)} to sha256 hex digests, got {v!r}",
    }  # fmt: skip
    known = {"format", "version", "mean", "std", "quant", *simple}
    missing = sorted(known - set(header))
    if missing:
        return f"{missing[0]}: missing"
    unknown = sorted(set(header) - known)
    if unknown:
        return f"{unknown[0]}: unknown field"
    for key, ok in simple.items():
        res = ok(header[key])
        if res is not True:
            return f"{key}: {res}"
    for key, problem in (("quant", _check_quant(header["quant"])), ("mean", _check_norm(header, "mean")),
                         ("std", _check_norm(header, "std"))):  # fmt: skip
        if problem:
            return f"{key}: {problem}"
    return None


def verify(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    """The header of an artifact after every check: header hash, fields, tensor names, dtypes and hashes.
    Anything wrong is a RunFileError naming the file and what is damaged."""
    text = meta.get(HEADER_KEY)
    if text is None:
        raise RunFileError(f"{path}: not a vaqkd packed artifact (no vaqkd header)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        raise RunFileError(f"{path}: header damaged (not JSON)") from None
    if not isinstance(header, dict):
        raise RunFileError(f"{path}: header damaged (a JSON {type(header).__name__}, expected an object)")
    if header.get("format") != FORMAT:
        raise RunFileError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") == 1:
        raise RunFileError(f"{path}: format version 1 carries no content hashes; re-export it (vaqkd export RUN_DIR)")
    if header.get("version") != VERSION:
        raise RunFileError(f"{path}: format version {header.get('version')!r} is not supported (this vaqkd reads "
                           f"{VERSION})")  # fmt: skip
    if meta.get(HASH_KEY) != sha256(text):
        raise RunFileError(f"{path}: header damaged (its sha256 does not match the one stored beside it)")
    problem = check_header(header)
    if problem:
        raise RunFileError(f"{path}: header field {problem}")
    unknown, missing = sorted(set(tensors) - set(TENSORS)), sorted(set(TENSORS) - set(tensors))
    if unknown or missing:
        what = f"unknown tensor(s) {unknown}" if unknown else f"tensor(s) {missing} missing"
        raise RunFileError(f"{path}: {what}")
    for name, dtype in TENSORS.items():
        t = tensors[name]
        if t.dtype != dtype or t.dim() != 1:
            raise RunFileError(f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, expected 1-D {dtype}")
        if tensor_sha256(t) != header["sha256"][name]:
            raise RunFileError(f"{path}: tensor {name!r} damaged (its sha256 does not match the header's)")
    if tensors["codes"].numel() != header["codes_bytes"] or tensors["params"].numel() != header["param_count"]:
        raise RunFileError(f"{path}: tensor sizes differ from the header's codes_bytes / param_count")
    return header
