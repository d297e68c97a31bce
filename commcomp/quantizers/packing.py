"""Wire layout shared by the quantizers: bit packing and buckets.

Bit packing: n codes of b bits each (1 <= b <= 8) in ceil(n * b / 8) bytes.

Convention (the same on every device and rank): code i occupies bits i*b .. i*b + b - 1 of the
packed stream, least significant bit first, and bit j of the stream is bit (j % 8) of byte j // 8.
The tail of the last byte is zero. Everything is vectorised tensor code (no loop over values).

Legend: n = number of codes, b = bits per code.
"""

from __future__ import annotations

import torch

from commcomp.quantizers.checks import check_bits

__all__ = [
    "bucketize",
    "check_bits",
    "chunks",
    "code_sum",
    "pack_bits",
    "packed_nbytes",
    "per_value",
    "unpack_bits",
]


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
        if n % per:
            codes = torch.cat([codes, codes.new_zeros(-n % per)])
        if bits in (1, 4) and codes.storage_offset() % 8 == 0 and codes.numel() % 8 == 0 and codes.is_contiguous():
            return _pack_words(codes, bits)
        grid = codes.view(-1, per)
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


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_bits` for 1- and 4-bit codes, a machine word at a time (codes one per byte, their count
    a multiple of 8, 8-byte aligned). 1 bit: eight 0/1 bytes b_j of an int64 x become sum_j b_j 2^j
    = the top byte of x * 0x0102040810204080 (the product puts b_j at bit 56 + j, and no two terms
    share a bit, so nothing carries). 4 bits: two codes c0 + 256 c1 of an int16 x become
    c0 + 16 c1 = (x | x >> 4) & 0xFF."""
    if bits == 1:
        words = codes.view(torch.int64)
        return torch.bitwise_right_shift(words * 0x0102040810204080, 56).bitwise_and_(0xFF).to(torch.uint8)
    pairs = codes.view(torch.int16)
    return torch.bitwise_or(pairs, pairs >> 4).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n codes (uint8) stored in `packed`.

    `packed` may have leading dimensions (e.g. one row per rank): [..., bytes] -> [..., n].
    """
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() < 1:
        raise TypeError(f"packed codes must be a uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[-1] != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        if per == 1:
            return packed[..., :n]
        out = torch.empty(*packed.shape, per, dtype=torch.uint8, device=packed.device)
        torch.bitwise_and(packed, mask, out=out[..., 0])  # code 0: the low bits
        for j in range(1, per):  # code j: shifted down, masked unless it is the top one
            torch.bitwise_right_shift(packed, j * bits, out=out[..., j])
            if j < per - 1:
                out[..., j] &= mask
        return out.view(*lead, -1)[..., :n]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)[..., : n * bits].reshape(*lead, n, bits)
    weights = torch.tensor([1 << j for j in range(bits)], device=packed.device, dtype=torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def bucketize(values: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """A flat tensor of n values as [ceil(n / bucket_size), bucket_size], zero-padded at the end
    (a view, without copying, when bucket_size divides n)."""
    n = values.numel()
    buckets = -(-n // bucket_size)
    if n == buckets * bucket_size:
        return values.reshape(buckets, bucket_size)
    padded = values.new_zeros(buckets * bucket_size)
    padded[:n] = values.reshape(-1)
    return padded.view(buckets, bucket_size)


def per_value(scales: torch.Tensor, bucket_size: int, n: int) -> torch.Tensor:
    """Each of n values' bucket scale (the inverse layout of `bucketize`)."""
    return scales.repeat_interleave(bucket_size)[:n]


CHUNK_VALUES = 1 << 19  # values worked on at once by chunked encoders and decoders: about 2 MB of float32
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """[256, 8/b] float32: the codes stored in each possible byte (decoding 1- and 2-bit codes by one
    table lookup per byte is cheaper than 8/b shifts)."""
    table = _TABLES.get((bits, device))
    if table is None:
        per, mask = 8 // bits, (1 << bits) - 1
        rows = [[(byte >> (j * bits)) & mask for j in range(per)] for byte in range(256)]
        table = _TABLES[(bits, device)] = torch.tensor(rows, dtype=torch.float32, device=device)
    return table


def decodable_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes of `packed` ([..., bytes] -> [..., n]) in the cheapest form to multiply:
    float32 from a byte table for 1- and 2-bit codes (one lookup per byte instead of 8/b shifts),
    uint8 otherwise."""
    if bits <= 2:
        lead = packed.shape[:-1]
        codes = _byte_table(bits, packed.device).index_select(0, packed.reshape(-1).int())
        return codes.view(*lead, -1)[..., :n]
    return unpack_bits(packed, bits, n)


def chunks(buckets: int, bucket_size: int, ranks: int = 1) -> list[tuple[int, int]]:
    """[b0, b1) ranges of whole buckets covering `buckets`, each about CHUNK_VALUES values over all
    `ranks`, and a multiple of 8 buckets (so every chunk starts on a byte of any bit packing)."""
    per = max(8, CHUNK_VALUES // max(ranks, 1) // bucket_size // 8 * 8)
    return [(b0, min(b0 + per, buckets)) for b0 in range(0, buckets, per)]


def code_sum(
    packed: torch.Tensor,
    bits: int,
    n: int,
    weights: torch.Tensor,
    offsets: torch.Tensor,
    bucket_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[i] = offsets[b] + sum_r weights[r, b] * code_r[i], b = i // bucket_size: the sum over N
    ranks of affine-decoded b-bit codes, written into the flat float32 tensor `out` (n values).

    packed: [N, packed_nbytes(n, bits)] uint8, one row per rank; weights: [N, buckets]; offsets:
    [buckets]. QSGD (v = S/s * (c - s)) and sign (v = m * (1 - 2c)) both decode this way. Works
    through the values in chunks of whole buckets that stay in cache, every rank at once: no loop
    over ranks and never N dense tensors in memory.
    """
    ranks, B = packed.shape[0], bucket_size
    for b0, b1 in chunks(weights.shape[1], B, ranks):
        v0, v1 = b0 * B, min(b1 * B, n)
        codes = decodable_codes(packed[:, v0 * bits // 8 : packed_nbytes(v1, bits)], bits, v1 - v0)
        if v1 - v0 < (b1 - b0) * B:  # the last, partial bucket: pad its codes (their weight is moot)
            codes = torch.nn.functional.pad(codes, (0, (b1 - b0) * B - (v1 - v0)))
        # float32 first: a multiplication that promotes uint8 on the fly is about 2x slower on a CPU
        weighted = codes.float().reshape(ranks, b1 - b0, B).mul_(weights[:, b0:b1, None])
        if v1 - v0 < (b1 - b0) * B:
            out[v0:v1] = weighted.sum(0).add_(offsets[b0:b1, None]).view(-1)[: v1 - v0]
        else:  # whole buckets: sum straight into `out`
            into = out[v0:v1].view(b1 - b0, B)
            torch.sum(weighted, 0, out=into).add_(offsets[b0:b1, None])
    return out
