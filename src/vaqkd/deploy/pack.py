"""Dense bit packing of integer codes: any width 1-8, value i in bits [i·b, (i+1)·b) of a little-endian bit
stream. For b = 2 this is ONNX's int2 layout: four codes per byte, the first in the lowest two bits.

>>> packed = pack_codes(torch.tensor([0, 1, 2, 3, 3, 2]), bits=2)
>>> packed.tolist()  # 0b11100100, then 0b1011
[228, 11]
>>> unpack_codes(packed, bits=2, count=6).tolist()
[0, 1, 2, 3, 3, 2]
>>> unpack_codes(pack_codes(torch.tensor([5, 0, 7, 1]), bits=3), bits=3, count=4).tolist()
[5, 0, 7, 1]
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (any integer dtype, values in [0, 2^bits)) -> uint8 (packed_size(n, bits),)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_codes: bits must be in [1, 8], got {bits}")
    c = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"pack_codes: codes must lie in [0, {(1 << bits) - 1}], got [{c.min()}, {c.max()}]")
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    bit_matrix = (c[:, None] >> np.arange(bits)) & 1  # (n, bits), least significant bit first
    return torch.from_numpy(np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 packed bytes -> int64 (count,) codes; the inverse of `pack_codes`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_codes: bits must be in [1, 8], got {bits}")
    p = packed.detach().reshape(-1).cpu().numpy().astype(np.uint8)
    if p.size != packed_size(count, bits):
        raise ValueError(f"unpack_codes: {p.size} bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return torch.from_numpy(p.astype(np.int64))
    stream = np.unpackbits(p, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((stream << np.arange(bits)).sum(1))
