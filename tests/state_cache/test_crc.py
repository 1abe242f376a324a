"""crc32_combine against zlib's crc32 of the concatenation."""

import os
import random
import zlib

import pytest

from server.state_cache.crc import crc32_combine


@pytest.mark.parametrize("len_a,len_b", [(0, 0), (0, 7), (5, 0), (1, 1), (3, 4), (1000, 4093), (17, 1 << 20)])
def test_combine_equals_crc_of_the_concatenation(len_a, len_b):
    a, b = os.urandom(len_a), os.urandom(len_b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)


def test_a_chain_of_random_parts_combines_to_the_whole():
    rng = random.Random(5)
    data = rng.randbytes(200_000)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(20))})
    crc = 0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        crc = crc32_combine(crc, zlib.crc32(data[lo:hi]), hi - lo)
    assert crc == zlib.crc32(data)
    assert crc32_combine(crc, zlib.crc32(b"x"), 1) != zlib.crc32(data + b"y")


def test_negative_length_is_refused():
    with pytest.raises(ValueError):
        crc32_combine(1, 2, -1)
