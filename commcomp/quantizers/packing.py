"""Wire layout shared by the quantizers: bit packing and buckets.

Bit packing: n codes of b bits each (1 <= b <= 8) in ceil(n * b / 8) bytes.

Convention (the same on every device and rank): code i occupies bits i*b .. i*b + b - 1 of the
packed stream, least significant bit first, and bit j of the stream is bit (j % 8) of byte j // 8.
The tail of the last byte is zero. Everything is vectorised tensor code (no loop over values).

Legend: n = number of codes, b = bits per code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from commcomp.quantizers.checks import check_bits

__all__ = [
    "bucket_error",
    "bucketize",
    "check_bits",
    "chunks",
    "code_sum",
    "max_abs",
    "pack_bits",
    "packed_nbytes",
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
        if bits in (1, 2, 4) and codes.storage_offset() % 8 == 0 and codes.numel() % 8 == 0 and codes.is_contiguous():
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
    """`pack_bits` for 1-, 2- and 4-bit codes, a machine word at a time (codes one per byte, their
    count a multiple of 8, 8-byte aligned). 1 bit: eight 0/1 bytes b_j of an int64 x become
    sum_j b_j 2^j = the top byte of x * 0x0102040810204080 (the product puts b_j at bit 56 + j, and
    no two terms share a bit, so nothing carries). 2 bits: y = x | x >> 6 puts c1 next to c0 (and c3
    next to c2), y | y >> 12 brings c2, c3 down: the low byte is c0 + 4 c1 + 16 c2 + 64 c3.
    4 bits: two codes c0 + 256 c1 of an int16 x become c0 + 16 c1 = (x | x >> 4) & 0xFF."""
    if bits == 1:
        words = codes.view(torch.int64)
        return torch.bitwise_right_shift(words * 0x0102040810204080, 56).bitwise_and_(0xFF).to(torch.uint8)
    if bits == 2:  # c0 + 2^8 c1 + 2^16 c2 + 2^24 c3: fold c1 down by 6 bits, then the upper pair by 12
        quads = codes.view(torch.int32)
        folded = torch.bitwise_or(quads, quads >> 6)
        return folded.bitwise_or_(folded >> 12).to(torch.uint8)
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
    if bits == 8:
        return packed[..., :n]
    if bits in (1, 2, 4):
        return _unpack_words(packed, bits)[..., :n]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)[..., : n * bits].reshape(*lead, n, bits)
    weights = torch.tensor([1 << j for j in range(bits)], device=packed.device, dtype=torch.uint8)
    return (stream * weights).sum(-1, dtype=torch.uint8)


def _unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`unpack_bits` of 1-, 2- and 4-bit codes, a machine word at a time: each byte, widened to a
    word of 8/b bytes (a contiguous, aligned copy), has its codes moved one per byte, and the words
    are viewed as bytes again ([..., bytes] -> [..., bytes * 8/b]; little-endian, like `_pack_words`).
    4 bits: x = c0 + 16 c1 in an int16 becomes c0 + 256 c1 = (x | x << 4) & 0x0F0F. 2 bits: the
    pairs (c0, c1) and (c2, c3) move 16 bits apart ((x | x << 12) & 0x000F000F), then each code of a
    pair 8 bits apart ((y | y << 6) & 0x03030303). 1 bit: x * 0x0101010101010101 copies the byte into
    all eight bytes of an int64 (no carries), & 0x8040201008040201 keeps bit k in byte k, and adding
    0x80 - 2^k to byte k sets its top bit exactly when bit k was set (no carry leaves a byte): that
    bit, shifted down by 7 and masked, is the code."""
    if bits == 4:
        x = packed.to(torch.int16)
        return torch.bitwise_left_shift(x, 4).bitwise_or_(x).bitwise_and_(0x0F0F).view(torch.uint8)
    if bits == 2:
        x = packed.to(torch.int32)
        y = torch.bitwise_left_shift(x, 12).bitwise_or_(x).bitwise_and_(0x000F000F)
        return torch.bitwise_left_shift(y, 6).bitwise_or_(y).bitwise_and_(0x03030303).view(torch.uint8)
    x = packed.to(torch.int64).mul_(0x0101010101010101).bitwise_and_(_BIT_PER_BYTE)
    return x.add_(0x00406070787C7E7F).bitwise_right_shift_(7).bitwise_and_(0x0101010101010101).view(torch.uint8)


_BIT_PER_BYTE = 0x8040201008040201 - (1 << 64)  # as a signed int64: bit k of byte k


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


def max_abs(buckets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """max |v| of each row of `buckets` [b, B], written into `out` [b], without a temporary |v|: the
    larger of max v and -min v (two reads, no writes; NaN propagates), + 0.0 so that a row of zeros
    gives +0.0 as abs().amax() does."""
    torch.amax(buckets, 1, out=out)
    return torch.maximum(out, buckets.amin(1).neg_(), out=out).add_(0.0)


CHUNK_VALUES = 1 << 19  # values worked on at once by chunked encoders and decoders: about 2 MB of float32


def chunks(buckets: int, bucket_size: int, ranks: int = 1) -> list[tuple[int, int]]:
    """[b0, b1) ranges of whole buckets covering `buckets`, each about CHUNK_VALUES values over all
    `ranks`, and a multiple of 8 buckets (so every chunk starts on a byte of any bit packing)."""
    per = max(8, CHUNK_VALUES // max(ranks, 1) // bucket_size // 8 * 8)
    return [(b0, min(b0 + per, buckets)) for b0 in range(0, buckets, per)]


def bucket_error(
    tensor: torch.Tensor,
    bucket_size: int,
    decoded: Callable[[torch.Tensor, int, int], torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """tensor - its decoded values, worked out bucket by bucket (a chunk at a time, in cache) into
    `out` (or a new tensor of the tensor's shape): `decoded(part, b0, b1)` gives the decoded values
    of buckets [b0, b1), whose values are `part` [b1 - b0, B], in part's dtype. For quantizers that
    know their error without a dense decode (sign, the sign vote)."""
    x = tensor.detach().reshape(-1)
    result = torch.empty_like(tensor, memory_format=torch.contiguous_format) if out is None else out
    flat = result.view(-1)
    buckets, errors = bucketize(x, bucket_size), bucketize(flat, bucket_size)
    for b0, b1 in chunks(buckets.shape[0], bucket_size):
        part = buckets[b0:b1]
        torch.sub(part, decoded(part, b0, b1), out=errors[b0:b1])
    if errors.data_ptr() != flat.data_ptr():  # the last bucket was partial: bucketize padded a copy
        flat.copy_(errors.view(-1)[: x.numel()])
    return result


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
    through the values in chunks of whole buckets that stay in cache, all ranks' codes of a chunk
    unpacked at once, then one multiply-add per rank into `out`: never N dense tensors in memory.
    """
    ranks, B = packed.shape[0], bucket_size
    for b0, b1 in chunks(weights.shape[1], B, ranks):
        v0, v1 = b0 * B, min(b1 * B, n)
        codes = unpack_bits(packed[:, v0 * bits // 8 : packed_nbytes(v1, bits)], bits, v1 - v0)
        if v1 - v0 < (b1 - b0) * B:  # the last, partial bucket: pad its codes (their weight is moot)
            codes = torch.nn.functional.pad(codes, (0, (b1 - b0) * B - (v1 - v0)))
        # float32 first: a multiplication that promotes uint8 on the fly is about 2x slower on a CPU
        codes = codes.float().reshape(ranks, b1 - b0, B)
        whole = v1 - v0 == (b1 - b0) * B
        into = out[v0:v1].view(b1 - b0, B) if whole else torch.empty_like(codes[0])
        # offsets + w_0 c_0, then + w_r c_r rank by rank: one pass per rank, no [N, ...] product
        torch.addcmul(offsets[b0:b1, None], codes[0], weights[0, b0:b1, None], out=into)
        for r in range(1, ranks):
            into.addcmul_(codes[r], weights[r, b0:b1, None])
        if not whole:  # the last, partial bucket
            out[v0:v1] = into.view(-1)[: v1 - v0]
    return out
