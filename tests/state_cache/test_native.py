"""The native receive loop's library (`native.py`, `recv_many.c`): its CRC-32 and its build."""

import ctypes
import logging
import os
import zlib

import pytest

from server.state_cache import native


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """`library()` built anew into an empty cache directory (and forgotten again afterwards)."""
    monkeypatch.setenv("GLA_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 4097, (1 << 20) + 3])
def test_the_crc_equals_zlibs_at_any_length_alignment_and_start(n):
    lib = native.library()
    assert lib is not None
    data = os.urandom(n + 8)
    buf = ctypes.create_string_buffer(data, len(data))
    for shift in (0, 1, 3, 7):  # misaligned starts take the byte loop first
        for start in (0, 1, 0xDEADBEEF):
            got = lib.gla_crc32(start, ctypes.addressof(buf) + shift, n)
            assert got == zlib.crc32(data[shift : shift + n], start), (n, shift, start)


def test_built_once_into_the_cache_and_loaded_from_it_after(fresh):
    assert native.library() is not None
    built = list(fresh.glob("recv_many-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_without_a_working_compiler_it_is_none_and_says_so(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="server.state_cache.native"):
        assert native.library() is None
    assert "Python threads" in caplog.text
    assert not list(fresh.glob("*.so"))  # nothing half-built left behind


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("GLA_NATIVE_RECV", "0")
    assert native.library() is None


def test_isal_crc_through_its_address_equals_zlibs():
    """What the native loop calls for each piece where `isal` is installed (it is a dependency)."""
    addr = native.isal_crc32()
    assert addr is not None
    fn = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64)(addr)
    data = os.urandom(100_003)
    buf = ctypes.create_string_buffer(data, len(data))
    for shift, n, start in [(0, 100_000, 0), (1, 99_999, 7), (3, 5, 0xFFFFFFFF), (0, 0, 12)]:
        assert fn(start, ctypes.addressof(buf) + shift, n) == zlib.crc32(data[shift : shift + n], start)
