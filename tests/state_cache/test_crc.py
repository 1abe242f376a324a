"""crc32_combine against zlib's crc32 of the concatenation; the fast crc32 against zlib's."""

import os
import random
import subprocess
import sys
import zlib

import pytest

from server.state_cache.crc import CRC32_IMPL, crc32, crc32_combine


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


@pytest.mark.parametrize("length", [0, 1, 7, 63, 64, 65, 4093, 1 << 20, (1 << 20) + 13])
def test_the_fast_crc32_equals_zlibs_with_a_running_start(length):
    """Snapshots written with either implementation must verify with the other."""
    rng = random.Random(length)
    data = rng.randbytes(length)
    start = rng.getrandbits(32)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)
    view = memoryview(bytearray(b"ab" + data))[2:]  # a writable, offset view, as the readers pass
    assert crc32(view, start) == zlib.crc32(view, start)


def test_the_installed_project_uses_isal():
    """`isal` is a dependency: a fresh install must take the fast path, not fall back silently."""
    assert CRC32_IMPL == "isal"


def test_gla_crc32_zlib_selects_zlib():
    code = "from server.state_cache.crc import CRC32_IMPL, crc32; import zlib; print(CRC32_IMPL, crc32 is zlib.crc32)"
    env = {**os.environ, "GLA_CRC32": "zlib"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["zlib", "True"]
