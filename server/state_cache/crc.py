"""The payload crc32: a fast implementation, and a crc32 of a concatenation from its parts.

`crc32` is ISA-L's (the `isal` package: carry-less multiply, ~10x zlib's speed, the same CRC-32
as `zlib.crc32`, and it also releases the GIL) where installed, else zlib's. Why: zlib's crc32 of a
48 MiB snapshot is 17 ms of CPU on the H200 host and ~40 ms on the 2-core CI box, spent in the
reader threads that also receive the bytes; ISA-L's is a tenth of that here. `GLA_CRC32=zlib` forces
zlib's (to compare them); the two agree bit for bit, so snapshots written by either read with the other.

`crc32_combine` (zlib exposes none): one running crc32 over the payload, computed serially as
chunks arrive over parallel sockets, would end after the last byte; computed per chunk in the
reader threads and combined here in order, only the last chunk's share is left on the critical path.

The math, for the reflected CRC-32 polynomial of zlib: appending `n` bytes `B` to a message `A`
gives crc(AB) = crc(A) * x^(8n) mod P  xor  crc(B) (the pre/post inversions cancel), so combining
is one multiplication by a power of x that depends only on `n`; powers are cached per length (the
chunks of a snapshot share one length, the last one aside).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from functools import lru_cache


def _pick_crc32() -> tuple[str, Callable[..., int]]:
    if os.environ.get("GLA_CRC32", "").strip().lower() != "zlib":
        try:
            from isal.isal_zlib import crc32 as isal_crc32
        except ImportError:  # a platform without an isal wheel: zlib's is correct, only slower
            pass
        else:
            return "isal", isal_crc32
    return "zlib", zlib.crc32


CRC32_IMPL, crc32 = _pick_crc32()
"""`crc32(data, start=0)`, as `zlib.crc32`; CRC32_IMPL names the implementation ("isal" or "zlib")."""

_POLY = 0xEDB88320  # x^32 + x^26 + ... + 1, bit-reversed: bit 31 is x^0
_ONE = 1 << 31  # the polynomial 1 in this bit order


def _mul(a: int, b: int) -> int:
    """a * b mod P for polynomials in the reflected bit order."""
    out = 0
    m = _ONE
    while a:
        if a & m:
            out ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return out


@lru_cache(maxsize=64)
def _x_pow_8n(n: int) -> int:
    """x^(8n) mod P by square and multiply (~60 `_mul`s for megabytes; cached per n)."""
    result, base, e = _ONE, _ONE >> 8, n  # base = x^8: one byte's shift
    while e:
        if e & 1:
            result = _mul(result, base)
        base = _mul(base, base)
        e >>= 1
    return result


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32(A + B) from crc32(A), crc32(B) and len(B), as zlib's function of that name."""
    if len_b < 0:
        raise ValueError("len_b must be >= 0")
    if len_b == 0:
        return crc_a
    return _mul(_x_pow_8n(len_b), crc_a) ^ crc_b
