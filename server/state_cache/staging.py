"""Copies a snapshot to the GPU while it is still arriving from Redis (device staging).

Why: a resumed turn read from Redis lands in pinned host memory, and the engine's step then copies
all of it (48 MiB for the 1.3B model, ~1 ms over PCIe on the H200 host) into the conversation's
device slot before the first token's prefill can run. That copy sat on the critical path after the
last byte. Here each range of the payload is copied to a device buffer on a side stream as soon as
the decoder has it, so by the time the checksum is verified only the last piece's copy is left,
and the step's copy into the slot is device to device.

Nothing staged is used before `finish`, which runs after the whole payload checked out, and a read
that fails simply drops the buffer: it was allocated on the side stream, so the caching allocator
hands its memory to nothing else until the copies queued there are done. A consumer on another
stream must `record_stream` it (`StatePool.write` does).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from server.state_cache.snapshot import SnapshotHeader


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


class DeviceStager:
    """A device copy of one payload, filled range by range in payload order.

    Args:
        header: the snapshot's header (tensor names, stored dtypes, shapes and offsets).
        device: where the state goes: CUDA (copies queue on a side stream and are awaited in
            `finish`), or CPU (plain copies; what the CPU tests exercise).
    """

    def __init__(self, header: SnapshotHeader, device: torch.device) -> None:
        self._stream = None
        if device.type == "cuda":
            self._stream = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self._buf = torch.empty(header.payload_len, dtype=torch.uint8, device=device)
            self.tensors = {
                i.name: self._buf[i.offset : i.offset + i.nbytes].view(i.dtype).view(i.shape) if i.nbytes
                else torch.empty(i.shape, dtype=i.dtype, device=device)
                for i in header.tensors
            }
        self.bytes_staged = 0

    def copy(self, start: int, src: torch.Tensor) -> None:
        """Queues host bytes `src` (uint8, pinned for an asynchronous copy) for payload offset `start`."""
        n = src.numel()
        if not n:
            return
        if self._stream is None:
            self._buf[start : start + n].copy_(src)
        else:
            with torch.cuda.stream(self._stream):
                self._buf[start : start + n].copy_(src, non_blocking=True)
        self.bytes_staged += n

    def finish(self) -> dict[str, torch.Tensor]:
        """The device tensors, once every queued copy is done (call it after the checksum passed)."""
        if self._stream is not None:
            self._stream.synchronize()
        return self.tensors
