"""Wire layout shared by the quantizers: bit packing and buckets.

Bit packing: n codes of b bits each (1 <= b <= 8) in ceil(n * b / 8) bytes.

Convention (the same on every device and rank): code i occupies bits i*b .. i*b + b - 1 of the
packed stream, least significant bit first, and bit j of the stream is bit (j % 8) of byte j // 8.
The tail of the last byte is zero. Everything is vectorised tensor code (no loop over values).

Legend: n = number of codes, b = bits per code.
"""

from __future__ import annotations

import torch

__all__ = ["bucketize", "check_bits", "pack_bits", "packed_nbytes", "per_value", "unpack_bits"]


def check_bits(bits: int, low: int = 1, high: int = 8, who: str = "bits") -> int:
    """Return `bits` if it is an int in [low, high]; raise ValueError naming it otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{who} must be an integer in [{low}, {high}], got {bits!r}")
    return bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `pack_bits` produces for n codes of `bits` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of integer codes in [0, 2^bits) into a uint8 tensor of packed_nbytes bytes."""
    check_bits(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if 8 % bits == 0:  # fast path: 8/b whole codes per byte
        per = 8 // bits
        grid = torch.cat([codes, codes.new_zeros(-n % per)]).view(-1, per)
        packed = grid[:, 0].clone()
        for j in range(1, per):  # at most 8 columns, each a vectorised op over all bytes
            packed |= grid[:, j] << (j * bits)
        return packed
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)  # [n * b] bits, LSB of each code first
    pad = packed_nbytes(n, bits) * 8 - stream.numel()
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)  # [bytes, 8]
    weights = torch.tensor([1 << j for j in range(8)], device=codes.device, dtype=torch.uint8)
    return (stream * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n codes (uint8) stored in `packed`."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, got {packed.numel()}")
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits].view(n, bits)
    weights = torch.tensor([1 << j for j in range(bits)], device=packed.device, dtype=torch.uint8)
    return (stream * weights).sum(1, dtype=torch.uint8)


def bucketize(values: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """A flat tensor of n values as [ceil(n / bucket_size), bucket_size], zero-padded at the end."""
    n = values.numel()
    buckets = -(-n // bucket_size)
    padded = values.new_zeros(buckets * bucket_size)
    padded[:n] = values.reshape(-1)
    return padded.view(buckets, bucket_size)


def per_value(scales: torch.Tensor, bucket_size: int, n: int) -> torch.Tensor:
    """Each of n values' bucket scale (the inverse layout of `bucketize`)."""
    return scales.repeat_interleave(bucket_size)[:n]
