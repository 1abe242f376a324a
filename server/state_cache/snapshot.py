"""The snapshot format: one sequence's state as a versioned binary header plus raw tensor bytes.

Bytes read back from Redis are untrusted, so decoding never unpickles: a fixed struct and a tensor
table are parsed with bounds checks, the header has its own crc32, the payload its checksum, and a
snapshot from other weights (fingerprint) or other tokens (prefix hash) is refused.

Layout (little-endian):
    fixed    magic "GLASNAP\\0", version u16, flags u16, header_len u32, num_tokens u64,
             prefix_hash 32s, fingerprint 32s, payload_len u64, checksum_alg u8, 7 pad,
             payload_checksum 32s, num_tensors u32
    table    per tensor: name_len u16, name utf-8, stored dtype u8, original dtype u8, ndim u8,
             dims u64 * ndim, offset u64, nbytes u64        (offsets 64-byte aligned, ascending)
    trailer  crc32 u32 of everything above
    payload  the tensors' bytes, `payload_len` of them
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.state_cache.crc import crc32, crc32_combine

if TYPE_CHECKING:
    from server.state_cache.staging import DeviceStager

_log = logging.getLogger(__name__)

MAGIC = b"GLASNAP\x00"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NDIM = 8
ALIGN = 64
FLAG_REDUCED_PRECISION = 1

_FIXED = struct.Struct("<8sHHIQ32s32sQB7x32sI")
_TRAILER = struct.Struct("<I")

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.bfloat16,
    3: torch.float16,
    4: torch.float64,
    5: torch.int32,
    6: torch.int64,
    7: torch.uint8,
    8: torch.int8,
    9: torch.bool,
}
_DTYPE_CODES = {dt: code for code, dt in _DTYPES.items()}

CHECKSUM_CRC32 = 1
CHECKSUM_BLAKE2B = 2

# Buffers at least this big come from an anonymous mmap advised for transparent huge pages: the
# first touch of fresh memory, not the copy, dominated decode (48 MiB: bytearray(n) + fill 20 ms,
# huge-page mmap + fill 3.6 ms on the 2-core CI box, where THP is in `madvise` mode).
# 0 turns it off (e.g. where huge-page faults are slow).
HUGE_BUFFER_MIN_BYTES = int(os.environ.get("GLA_STATE_HUGE_PAGE_MIN_BYTES", 4 << 20))

Buffer = bytes | bytearray | memoryview | mmap.mmap
# ready destination tensors for a decode, or a function of its validated header that returns them
Buffers = Mapping[str, torch.Tensor] | Callable[["SnapshotHeader"], Mapping[str, torch.Tensor] | None]


class _Checksum:
    """The payload checksum, fed piece by piece (`update` in payload order), so a payload that
    arrives as Redis chunks is verified without joining it first."""

    def __init__(self, alg: int) -> None:
        if alg == CHECKSUM_CRC32:
            self._crc: int | None = 0
        elif alg == CHECKSUM_BLAKE2B:
            self._crc = None
            self._blake = hashlib.blake2b(digest_size=32)
        else:
            raise SnapshotCorrupt(f"unknown checksum algorithm {alg}")

    def update(self, data: Buffer) -> None:
        # crc32 runs ~4x faster than blake2b on 48 MiB (12 vs 53 ms here) and the threat is bit
        # rot or a truncated write, not forgery: anyone who can write Redis could recompute any
        # digest. Both release the GIL on big buffers.
        if self._crc is not None:
            self._crc = crc32(data, self._crc)
        else:
            self._blake.update(data)

    @property
    def combinable(self) -> bool:
        """Whether parts can be checksummed apart and `combine`d (crc32 can, blake2b cannot)."""
        return self._crc is not None

    def combine(self, part_crc: int, nbytes: int) -> None:
        """Appends a part of `nbytes` whose own crc32 (from 0) is `part_crc`."""
        assert self._crc is not None, "only crc32 checksums combine"
        self._crc = crc32_combine(self._crc, part_crc, nbytes)

    def digest(self) -> bytes:
        if self._crc is not None:
            return self._crc.to_bytes(4, "little").ljust(32, b"\0")
        return self._blake.digest()


def _fresh_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """Zeroed, writable host memory for a payload; big ones on transparent huge pages."""
    if 0 < HUGE_BUFFER_MIN_BYTES <= nbytes and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError):
            return bytearray(nbytes)
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP unavailable: still correct, only slower to fault in
            pass
        return m
    return bytearray(nbytes)


def _host_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` (fresh memory from `_fresh_buffer`) to decode into."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(_fresh_buffer(nbytes), dtype=torch.uint8)


def _writable_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor (valid while `t` lives)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def _scatter(parts: Sequence[Buffer], segments: Sequence[tuple[int, int, memoryview]], checksum: _Checksum) -> None:
    """Feeds every byte of `parts` (consecutive pieces of one payload) to `checksum` and copies
    payload range [start, end) of each segment into its view, each byte once, part by part (the
    part is still in cache when it is copied). `segments` are ascending and disjoint."""
    si, pos = 0, 0
    for part in parts:
        checksum.update(part)  # the part itself (immutable bytes from Redis), then its one copy
        src = memoryview(part).cast("B")
        end = pos + len(src)
        while si < len(segments) and segments[si][0] < end:
            start, stop, dst = segments[si]
            a, b = max(start, pos), min(stop, end)
            if a < b:
                dst[a - start : b - start] = src[a - pos : b - pos]
            if stop > end:
                break
            si += 1
        pos = end


class SnapshotError(ValueError):
    """A snapshot that must not be loaded; `reason` names the metric it counts under."""

    reason = "invalid"


class SnapshotCorrupt(SnapshotError):
    reason = "corrupt"


class ModelMismatch(SnapshotError):
    reason = "model_mismatch"


class PrefixMismatch(SnapshotError):
    reason = "prefix_mismatch"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: torch.dtype  # as stored
    orig_dtype: torch.dtype  # as given to encode (restored on decode)
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    num_tokens: int
    prefix_hash: bytes
    fingerprint: bytes
    payload_len: int
    checksum_alg: int
    payload_checksum: bytes
    tensors: tuple[TensorInfo, ...]
    flags: int = 0
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        table = bytearray()
        for t in self.tensors:
            name = t.name.encode()
            table += struct.pack("<H", len(name)) + name
            table += struct.pack("<BBB", _DTYPE_CODES[t.dtype], _DTYPE_CODES[t.orig_dtype], len(t.shape))
            table += struct.pack(f"<{len(t.shape)}QQQ", *t.shape, t.offset, t.nbytes)
        header_len = _FIXED.size + len(table) + _TRAILER.size
        fixed = _FIXED.pack(
            MAGIC, self.version, self.flags, header_len, self.num_tokens, self.prefix_hash,
            self.fingerprint, self.payload_len, self.checksum_alg, self.payload_checksum, len(self.tensors),
        )
        body = fixed + bytes(table)
        return body + _TRAILER.pack(crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SnapshotHeader:
        """Parses and validates a header; `data` may continue past it (a whole blob)."""
        data = memoryview(data)
        if len(data) < _FIXED.size + _TRAILER.size:
            raise SnapshotCorrupt(f"snapshot header truncated: {len(data)} bytes")
        (magic, version, flags, header_len, num_tokens, phash, fp, payload_len, alg, psum,
         n_tensors) = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise SnapshotCorrupt("not a gla-serve state snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise SnapshotCorrupt(f"snapshot format version {version}; this server reads {FORMAT_VERSION}")
        if not _FIXED.size + _TRAILER.size <= header_len <= min(MAX_HEADER_BYTES, len(data)):
            raise SnapshotCorrupt(f"snapshot header length {header_len} out of range")
        body_end = header_len - _TRAILER.size
        (crc,) = _TRAILER.unpack_from(data, body_end)
        if crc32(data[:body_end]) != crc:
            raise SnapshotCorrupt("snapshot header checksum mismatch")
        if alg not in (CHECKSUM_CRC32, CHECKSUM_BLAKE2B):
            raise SnapshotCorrupt(f"unknown checksum algorithm {alg}")
        if not 1 <= n_tensors <= MAX_TENSORS:
            raise SnapshotCorrupt(f"snapshot holds {n_tensors} tensors")
        tensors = _parse_table(data[:body_end], _FIXED.size, n_tensors, payload_len)
        return cls(num_tokens, bytes(phash), bytes(fp), payload_len, alg, bytes(psum), tensors, flags, version)


def _parse_table(data: memoryview, pos: int, n_tensors: int, payload_len: int) -> tuple[TensorInfo, ...]:
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    end_prev = 0
    try:
        for _ in range(n_tensors):
            (name_len,) = struct.unpack_from("<H", data, pos)
            name = bytes(data[pos + 2 : pos + 2 + name_len]).decode()
            pos += 2 + name_len
            code, orig_code, ndim = struct.unpack_from("<BBB", data, pos)
            pos += 3
            if code not in _DTYPES or orig_code not in _DTYPES or ndim > MAX_NDIM:
                raise SnapshotCorrupt(f"tensor {name!r}: bad dtype code or ndim")
            *shape, offset, nbytes = struct.unpack_from(f"<{ndim}QQQ", data, pos)
            pos += 8 * (ndim + 2)
            dtype = _DTYPES[code]
            numel = 1
            for d in shape:
                numel *= d
            if name in names or len(name) != len(name.strip()) or not name:
                raise SnapshotCorrupt(f"tensor name {name!r} empty or repeated")
            if nbytes != numel * dtype.itemsize or offset < end_prev or offset + nbytes > payload_len:
                raise SnapshotCorrupt(f"tensor {name!r}: size or offset inconsistent with the payload")
            names.add(name)
            end_prev = offset + nbytes
            tensors.append(TensorInfo(name, dtype, _DTYPES[orig_code], tuple(shape), offset, nbytes))
    except (struct.error, UnicodeDecodeError) as e:
        raise SnapshotCorrupt(f"snapshot tensor table unreadable: {e}") from e
    if pos != len(data):
        raise SnapshotCorrupt("snapshot tensor table length mismatch")
    return tuple(tensors)


@dataclass(slots=True)
class EncodedSnapshot:
    """A snapshot ready to ship: the header bytes and the payload, kept apart so Redis can store
    the header as the manifest and the payload as chunks without another copy."""

    header: SnapshotHeader
    header_bytes: bytes
    payload: bytearray | mmap.mmap  # writable; an mmap on huge pages when big

    @property
    def nbytes(self) -> int:
        return len(self.header_bytes) + len(self.payload)

    def to_blob(self) -> bytes:
        return b"".join((self.header_bytes, self.payload))

    def chunks(self, chunk_bytes: int) -> list[memoryview]:
        view = memoryview(self.payload)
        return [view[i : i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]


@dataclass(slots=True)
class Snapshot:
    header: SnapshotHeader
    tensors: dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.header.num_tokens


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_snapshot(
    tensors: Mapping[str, torch.Tensor],
    *,
    num_tokens: int,
    prefix_hash: bytes,
    fingerprint: bytes,
    storage_dtype: torch.dtype | None = None,
    checksum_alg: int = CHECKSUM_CRC32,
) -> EncodedSnapshot:
    """Serialises a state (`StatePool.read` output) into an `EncodedSnapshot`.

    Args:
        tensors: name -> CPU tensor; any listed dtype, any shape.
        num_tokens: how many tokens the state has consumed.
        prefix_hash: `keys.prefix_hash(tokens[:num_tokens])`, 32 bytes.
        fingerprint: `keys.model_fingerprint(...)`, 32 bytes.
        storage_dtype: e.g. torch.bfloat16 to store float32/float64 tensors at half the bytes;
            None stores them exactly. Decoding restores the original dtype either way.
        checksum_alg: CHECKSUM_CRC32 (default) or CHECKSUM_BLAKE2B.
    """
    if not tensors:
        raise ValueError("a snapshot needs at least one tensor")
    if len(prefix_hash) != 32 or len(fingerprint) != 32:
        raise ValueError("prefix_hash and fingerprint must be 32 bytes")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    prepared: list[tuple[str, torch.Tensor, torch.dtype]] = []
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        stored = t.detach().to("cpu")
        if storage_dtype is not None and t.is_floating_point() and t.element_size() > storage_dtype.itemsize:
            stored = stored.to(storage_dtype)
        prepared.append((name, stored.contiguous(), t.dtype))
    infos: list[TensorInfo] = []
    offset = 0
    for name, t, orig in prepared:
        offset = _aligned(offset)
        infos.append(TensorInfo(name, t.dtype, orig, tuple(t.shape), offset, t.numel() * t.element_size()))
        offset += infos[-1].nbytes
    # a plain buffer: huge-page buffers made encode slower here (first-touch, 28 -> 60 ms per 48 MiB
    # on the CI VM) while making decode faster; encode runs off the request path anyway
    payload = bytearray(offset)
    dst = torch.frombuffer(payload, dtype=torch.uint8) if offset else None
    view = memoryview(payload)
    # Checksummed tensor by tensor right after its copy, while the bytes are still in cache.
    checksum = _Checksum(checksum_alg)
    done = 0
    for info, (_, t, _) in zip(infos, prepared, strict=True):
        if info.nbytes:
            dst[info.offset : info.offset + info.nbytes].copy_(t.reshape(-1).view(torch.uint8))
            checksum.update(view[done : info.offset + info.nbytes])
            done = info.offset + info.nbytes
    checksum.update(view[done:])
    view.release()
    reduced = any(i.dtype != i.orig_dtype for i in infos)
    header = SnapshotHeader(
        num_tokens=num_tokens,
        prefix_hash=prefix_hash,
        fingerprint=fingerprint,
        payload_len=offset,
        checksum_alg=checksum_alg,
        payload_checksum=checksum.digest(),
        tensors=tuple(infos),
        flags=FLAG_REDUCED_PRECISION if reduced else 0,
    )
    return EncodedSnapshot(header, header.to_bytes(), payload)


def check_identity(
    header: SnapshotHeader, *, fingerprint: bytes, prefix_hash: bytes | None = None
) -> None:
    """Refuses a header from other weights or, when `prefix_hash` is given, for other tokens."""
    if header.fingerprint != fingerprint:
        raise ModelMismatch("snapshot was made by a different model (fingerprint mismatch)")
    if prefix_hash is not None and header.prefix_hash != prefix_hash:
        raise PrefixMismatch("snapshot summarises a different token prefix")


def decode_snapshot(
    header_bytes: Buffer,
    payload: Buffer | Sequence[Buffer],
    *,
    fingerprint: bytes,
    prefix_hash: bytes | None = None,
    restore_dtype: bool = True,
    pin_memory: bool = False,
) -> Snapshot:
    """Validates and decodes; raises a `SnapshotError` subclass instead of returning a bad state.

    Args:
        header_bytes: the snapshot header (e.g. from the Redis manifest).
        payload: the payload in one buffer, or as a list/tuple of consecutive parts (the Redis
            chunks, never joined): the checksum runs over the parts in order and each part is
            copied once, straight into the tensors' memory.
        pin_memory: decode into page-locked memory (CUDA hosts: the copy into a device slot is
            then an asynchronous DMA and the host tier need not copy the state again).

    Tensors alias `payload` when it is one writable bytearray (or mmap) of exactly the payload
    size and no pinning is asked for; otherwise the payload is copied once.
    """
    header = SnapshotHeader.from_bytes(header_bytes)
    check_identity(header, fingerprint=fingerprint, prefix_hash=prefix_hash)
    parts: Sequence[Buffer] = payload if isinstance(payload, (list, tuple)) else (payload,)
    size = sum(memoryview(p).nbytes for p in parts)
    if size != header.payload_len:
        raise SnapshotCorrupt(f"snapshot payload is {size} bytes, header says {header.payload_len}")
    reduced = restore_dtype and any(t.dtype != t.orig_dtype for t in header.tensors)
    checksum = _Checksum(header.checksum_alg)
    out: dict[str, torch.Tensor] = {}
    if pin_memory and not reduced:
        # One pinned tensor each, as `HostLRU.prepare` would make (torch's caching host allocator
        # rounds blocks up to powers of two, so one block for the whole state could waste a third).
        out = {i.name: torch.empty(i.shape, dtype=i.dtype, pin_memory=True) for i in header.tensors}
        _scatter(parts, [(i.offset, i.offset + i.nbytes, _writable_view(out[i.name]))
                         for i in header.tensors if i.nbytes], checksum)
    else:
        if len(parts) == 1 and isinstance(parts[0], (bytearray, mmap.mmap)) and size:
            checksum.update(parts[0])
            data = torch.frombuffer(parts[0], dtype=torch.uint8)
        else:
            data = _host_bytes(size)
            _scatter(parts, [(0, size, _writable_view(data))], checksum)
        for info in header.tensors:
            if info.nbytes:
                out[info.name] = data[info.offset : info.offset + info.nbytes].view(info.dtype).view(info.shape)
            else:
                out[info.name] = torch.empty(info.shape, dtype=info.dtype)
    if checksum.digest() != header.payload_checksum:
        raise SnapshotCorrupt("snapshot payload checksum mismatch")
    if reduced:
        out = _widen(header, out, pin_memory)
    return Snapshot(header, out)


class SnapshotDecoder:
    """`decode_snapshot` in pieces: `feed` the payload's parts in order as they arrive, then `finish`.

    Why: reading a 48 MiB state from Redis is bound by parsing the reply on the event loop, and
    decoding it (checksum + one copy) took about as long again. Fed chunk by chunk from a worker
    thread while the loop fetches the next chunk, the decode hides behind the fetch: crc32 and the
    copies (torch `copy_`) run without the GIL. Same checks and result as `decode_snapshot`: the
    header is validated at construction, size and checksum in `finish`, and nothing is returned
    from a bad payload.
    """

    def __init__(
        self,
        header_bytes: Buffer,
        *,
        fingerprint: bytes,
        prefix_hash: bytes | None = None,
        restore_dtype: bool = True,
        pin_memory: bool = False,
        per_tensor: bool = False,
        stage_device: torch.device | None = None,
        buffers: Buffers | None = None,
    ) -> None:
        # per_tensor: one buffer per tensor instead of one for the payload; what pinned decodes
        # always get (each tensor is its own pinned allocation), selectable so the CPU tests
        # cover that layout and its alignment gaps too.
        # buffers: ready destination tensors for that per-tensor layout (`pinned.PinnedSets`), so
        # the decode allocates nothing on a resumed turn's critical path; or a function of the
        # validated header that returns them, called only when the decode would use them (the
        # header is then parsed once, and no set is spent on another model's snapshot or on a
        # reduced one that is widened anyway). Tensors that do not match the header's names,
        # stored dtypes and shapes, or are not contiguous, are ignored: the decode allocates.
        # stage_device: also copy the payload there as it arrives (`staging.py`); `finish` then
        # leaves the device tensors, in the stored dtypes, in `staged`.
        self.header = SnapshotHeader.from_bytes(header_bytes)
        check_identity(self.header, fingerprint=fingerprint, prefix_hash=prefix_hash)
        infos = self.header.tensors
        self._reduced = restore_dtype and any(t.dtype != t.orig_dtype for t in infos)
        self._pin = pin_memory
        self._checksum = _Checksum(self.header.checksum_alg)
        self._pos = 0
        if (pin_memory or per_tensor) and not self._reduced:
            ready = buffers(self.header) if callable(buffers) else buffers
            if ready is not None and _fits(ready, infos):
                self._out = dict(ready)
            else:
                self._out = {i.name: torch.empty(i.shape, dtype=i.dtype, pin_memory=pin_memory) for i in infos}
            self._segments = [(i.offset, i.offset + i.nbytes, _flat_bytes(self._out[i.name]))
                              for i in infos if i.nbytes]
        else:
            data = _host_bytes(self.header.payload_len)
            self._out = {i.name: data[i.offset : i.offset + i.nbytes].view(i.dtype).view(i.shape) if i.nbytes
                         else torch.empty(i.shape, dtype=i.dtype) for i in infos}
            self._segments = [(0, self.header.payload_len, data)] if self.header.payload_len else []
        self._si = 0
        self._layout = self._cover(self._segments, self.header.payload_len)
        self.staged: dict[str, torch.Tensor] | None = None
        self._stager: DeviceStager | None = None
        if stage_device is not None:
            from server.state_cache.staging import DeviceStager  # imports this module

            try:
                self._stager = DeviceStager(self.header, stage_device)
            except torch.cuda.OutOfMemoryError:  # no room on the device now: the state stays on the host
                _log.warning("no device memory to stage a %d-byte snapshot; reading it to the host only",
                             self.header.payload_len)

    def feed(self, parts: Sequence[Buffer]) -> None:
        """The next consecutive parts of the payload (e.g. Redis chunk replies, kept unjoined)."""
        for part in parts:
            n = memoryview(part).nbytes
            if self._pos + n > self.header.payload_len:
                raise SnapshotCorrupt(f"snapshot payload exceeds the {self.header.payload_len} bytes its header says")
            self._checksum.update(part)
            if n:
                src = _readonly_bytes(part)
                pos, end = self._pos, self._pos + n
                while self._si < len(self._segments) and self._segments[self._si][0] < end:
                    start, stop, dst = self._segments[self._si]
                    a, b = max(start, pos), min(stop, end)
                    if a < b:
                        dst[a - start : b - start].copy_(src[a - pos : b - pos])
                    if stop > end:
                        break
                    self._si += 1
                if self._stager is not None:
                    self._stage(pos, end)
            self._pos += n

    @staticmethod
    def _cover(
        segments: Sequence[tuple[int, int, torch.Tensor]], payload_len: int
    ) -> list[tuple[int, int, torch.Tensor]]:
        """The segments plus scratch buffers for the alignment gaps between them, so that every
        payload byte has a place to land (the gaps are checksummed too)."""
        out, pos = [], 0
        for start, stop, dst in segments:
            if start > pos:
                out.append((pos, start, torch.empty(start - pos, dtype=torch.uint8)))
            out.append((start, stop, dst))
            pos = stop
        if payload_len > pos:
            out.append((pos, payload_len, torch.empty(payload_len - pos, dtype=torch.uint8)))
        return out

    def views(self, start: int, stop: int) -> list[memoryview]:
        """Writable views of the destination of payload bytes [start, stop), in order, for a
        reader that receives the payload in place (`bulk_read`) instead of `feed`ing it."""
        if not 0 <= start <= stop <= self.header.payload_len:
            raise SnapshotCorrupt(f"payload range [{start}, {stop}) outside the {self.header.payload_len} bytes")
        out = []
        for a, b, dst in self._layout:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                out.append(_writable_view(dst[lo - a : hi - a]))
        return out

    def part_checksum(self, start: int, stop: int) -> int | None:
        """The crc32 of payload bytes [start, stop) on their own, for `absorb`; callable from any
        thread once they are written, so parallel readers checksum their own chunks (None when
        the checksum does not combine: blake2b)."""
        if not self._checksum.combinable:
            return None
        crc = 0
        for view in self.views(start, stop):
            crc = crc32(view, crc)
        return crc

    def absorb(self, start: int, stop: int, part_checksum: int | None = None) -> None:
        """Payload bytes [start, stop) were written through `views`: checksum them, in order
        (with `part_checksum` from `part_checksum`, only combine it)."""
        if start != self._pos:
            raise SnapshotCorrupt(f"payload range starts at {start}, expected {self._pos}")
        if part_checksum is not None:
            self._checksum.combine(part_checksum, stop - start)
        else:
            for view in self.views(start, stop):
                self._checksum.update(view)
        self._pos = stop
        if self._stager is not None:
            self._stage(start, stop)

    def _stage(self, start: int, stop: int) -> None:
        """Queues payload bytes [start, stop), now in place, for the device copy (the tensors'
        bytes only: the alignment gaps between them belong to no tensor)."""
        assert self._stager is not None
        for a, b, dst in self._segments:
            if b <= start:
                continue
            if a >= stop:
                break
            lo, hi = max(a, start), min(b, stop)
            self._stager.copy(lo, dst[lo - a : hi - a])

    @property
    def finish_bytes(self) -> int:
        """About how many bytes `finish` still has to touch: the payload when it widens a reduced
        state or waits for the device copies, else none (the checksum is already computed, and
        only compared), so the caller can run it inline rather than hop to a thread and back."""
        return self.header.payload_len if self._reduced or self._stager is not None else 0

    def finish(self) -> Snapshot:
        if self._pos != self.header.payload_len:
            raise SnapshotCorrupt(f"snapshot payload is {self._pos} bytes, header says {self.header.payload_len}")
        if self._checksum.digest() != self.header.payload_checksum:
            raise SnapshotCorrupt("snapshot payload checksum mismatch")
        out = _widen(self.header, self._out, self._pin) if self._reduced else self._out
        if self._stager is not None:
            self.staged = self._stager.finish()
        return Snapshot(self.header, out)


def _fits(buffers: Mapping[str, torch.Tensor], infos: Sequence[TensorInfo]) -> bool:
    """Whether `buffers` can take the decode of `infos` as they are (one tensor each, in place)."""
    if len(buffers) != len(infos):
        return False
    for i in infos:
        t = buffers.get(i.name)
        if (t is None or t.dtype != i.dtype or tuple(t.shape) != i.shape or not t.is_contiguous()
                or t.device.type != "cpu"):
            return False
    return True


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _readonly_bytes(part: Buffer) -> torch.Tensor:
    """A uint8 tensor over a payload part without copying it (Redis replies are immutable `bytes`;
    the tensor is only ever read)."""
    return torch.frombuffer(part, dtype=torch.uint8)


# torch warns once per process that a tensor over read-only bytes could be written; ours are only
# read, so spend that one warning here, at import, where silencing it touches no other thread.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def _widen(header: SnapshotHeader, tensors: dict[str, torch.Tensor], pin_memory: bool) -> dict[str, torch.Tensor]:
    """Reduced-precision tensors back to their original dtypes (pinned, or in one fresh buffer)."""
    if pin_memory:
        out = {}
        for info in header.tensors:
            wide = torch.empty(info.shape, dtype=info.orig_dtype, pin_memory=True)
            wide.copy_(tensors[info.name])
            out[info.name] = wide
        return out
    layout: list[tuple[TensorInfo, int, int]] = []
    total = 0
    for info in header.tensors:
        if info.dtype != info.orig_dtype:
            total = _aligned(total)
            nbytes = info.nbytes // info.dtype.itemsize * info.orig_dtype.itemsize
            layout.append((info, total, nbytes))
            total += nbytes
    data = _host_bytes(total)
    out = dict(tensors)
    for info, offset, nbytes in layout:
        if nbytes:
            wide = data[offset : offset + nbytes].view(info.orig_dtype).view(info.shape)
            wide.copy_(tensors[info.name])
        else:
            wide = torch.empty(info.shape, dtype=info.orig_dtype)
        out[info.name] = wide
    return out


def decode_blob(
    blob: bytes | bytearray | memoryview,
    *,
    fingerprint: bytes,
    prefix_hash: bytes | None = None,
    restore_dtype: bool = True,
) -> Snapshot:
    """Decodes the one-piece form (`EncodedSnapshot.to_blob()`)."""
    SnapshotHeader.from_bytes(blob)  # validates before the length field is trusted
    header_len = _FIXED.unpack_from(blob)[3]
    view = memoryview(blob)
    return decode_snapshot(
        view[:header_len], view[header_len:], fingerprint=fingerprint, prefix_hash=prefix_hash,
        restore_dtype=restore_dtype,
    )
