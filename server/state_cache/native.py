"""Builds and loads `recv_many.c`, the bulk reader's receive loop without the GIL (ctypes).

Why at run time: the package ships no compiled code, and a C compiler is on every machine this
runs on (Triton compiles its own launchers with it too). The library is built once per source
version into a cache directory and loaded with ctypes, whose calls release the GIL. Where no
compiler works, `library()` is None and the bulk reader receives with Python threads as before;
`GLA_NATIVE_RECV=0` forces that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("recv_many.c")
_FLAGS = ["-O2", "-shared", "-fPIC", "-pthread", "-std=gnu11"]

# gla_job.status
OK, MISMATCH, CLOSED, TIMEOUT, ERROR = range(5)


class Seg(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_int64), ("piece", ctypes.c_int64),
                ("expect", ctypes.c_void_p)]


class Job(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int64), ("nsegs", ctypes.c_int64), ("segs", ctypes.POINTER(Seg)),
                ("crcs", ctypes.POINTER(ctypes.c_uint32)), ("deadline_ns", ctypes.c_int64),
                ("received", ctypes.c_int64), ("status", ctypes.c_int64), ("err", ctypes.c_int64),
                ("crc_fn", ctypes.c_void_p)]


def _cache_dir() -> Path:
    env = os.environ.get("GLA_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gla-serve"


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: processes building at once each load a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it is off or cannot be built."""
    if os.environ.get("GLA_NATIVE_RECV", "1") == "0":
        return None
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    path = _cache_dir() / f"recv_many-{digest}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("native Redis receive loop unavailable (%s %s); reading with Python threads", e,
                    detail.decode(errors="replace")[:500])
        return None
    lib.gla_recv_many.argtypes = [ctypes.POINTER(Job), ctypes.c_int64]
    lib.gla_recv_many.restype = ctypes.c_int
    lib.gla_crc32.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int64]
    lib.gla_crc32.restype = ctypes.c_uint32
    return lib


@functools.cache
def isal_crc32() -> int | None:
    """The address of ISA-L's `crc32_gzip_refl` (zlib's crc32 semantics) in the `isal` package's
    extension, for `Job.crc_fn`; None without it or where `crc.py` uses zlib's (`GLA_CRC32=zlib`)."""
    from server.state_cache.crc import CRC32_IMPL

    if CRC32_IMPL != "isal":
        return None
    try:
        from isal import isal_zlib

        fn = ctypes.CDLL(isal_zlib.__file__).crc32_gzip_refl
    except (ImportError, OSError, AttributeError):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value
