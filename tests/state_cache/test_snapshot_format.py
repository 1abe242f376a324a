import random
import struct

import pytest
import torch

from server.state_cache.keys import prefix_hash
from server.state_cache.snapshot import (
    CHECKSUM_BLAKE2B,
    FLAG_REDUCED_PRECISION,
    ModelMismatch,
    PrefixMismatch,
    SnapshotCorrupt,
    SnapshotDecoder,
    SnapshotError,
    SnapshotHeader,
    decode_blob,
    decode_snapshot,
    encode_snapshot,
)
from tests.state_cache.helpers import assert_state_equal, fp, make_state

FP = fp("model-a")
PH = prefix_hash([5, 6, 7])


def _encode(state=None, **kw):
    return encode_snapshot(state or make_state(), num_tokens=3, prefix_hash=PH, fingerprint=FP, **kw)


def test_round_trip_is_exact_and_keeps_metadata():
    state = make_state() | {"step": torch.tensor([1, 2, 3], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    enc = _encode(state)
    snap = decode_blob(enc.to_blob(), fingerprint=FP, prefix_hash=PH)
    assert_state_equal(snap.tensors, state)
    assert snap.num_tokens == 3 and snap.header.prefix_hash == PH and snap.header.fingerprint == FP
    assert [t.name for t in snap.header.tensors] == list(state)
    assert all(t.offset % 64 == 0 for t in snap.header.tensors)


def test_split_header_and_payload_round_trip_and_chunks_cover_payload():
    enc = _encode(checksum_alg=CHECKSUM_BLAKE2B)
    chunks = enc.chunks(100)
    assert len(chunks) > 1 and b"".join(bytes(c) for c in chunks) == bytes(enc.payload)
    snap = decode_snapshot(enc.header_bytes, bytearray().join(chunks), fingerprint=FP)
    assert_state_equal(snap.tensors, make_state())


def test_bf16_storage_halves_float32_and_restores_dtype():
    state = make_state(layers=3, v=64, k=32, conv=False)
    exact, half = _encode(state), _encode(state, storage_dtype=torch.bfloat16)
    assert len(half.payload) == len(exact.payload) // 2
    assert half.header.flags & FLAG_REDUCED_PRECISION and not exact.header.flags
    snap = decode_blob(half.to_blob(), fingerprint=FP)
    for name, t in state.items():
        got = snap.tensors[name]
        assert got.dtype == torch.float32
        assert ((got - t).norm() / t.norm()).item() < 4e-3  # bf16 keeps 8 bits of mantissa
    raw = decode_blob(half.to_blob(), fingerprint=FP, restore_dtype=False)
    assert all(t.dtype == torch.bfloat16 for t in raw.tensors.values())


def test_corrupted_payload_is_rejected():
    enc = _encode()
    blob = bytearray(enc.to_blob())
    blob[len(enc.header_bytes) + 7] ^= 0x01
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        decode_blob(blob, fingerprint=FP)
    with pytest.raises(SnapshotCorrupt):
        decode_blob(enc.to_blob()[:-1], fingerprint=FP)


def test_every_single_byte_flip_in_the_header_is_rejected():
    enc = _encode()
    rng = random.Random(0)
    for pos in range(len(enc.header_bytes)):
        blob = bytearray(enc.to_blob())
        blob[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(SnapshotError):
            decode_blob(blob, fingerprint=FP, prefix_hash=PH)


def test_other_model_and_other_prefix_are_rejected():
    blob = _encode().to_blob()
    with pytest.raises(ModelMismatch):
        decode_blob(blob, fingerprint=fp("model-b"))
    with pytest.raises(PrefixMismatch):
        decode_blob(blob, fingerprint=FP, prefix_hash=prefix_hash([5, 6]))


def test_future_version_and_foreign_bytes_are_rejected():
    enc = _encode()
    blob = bytearray(enc.to_blob())
    struct.pack_into("<H", blob, 8, 2)
    with pytest.raises(SnapshotCorrupt, match="version 2"):
        decode_blob(blob, fingerprint=FP)
    with pytest.raises(SnapshotCorrupt, match="magic"):
        decode_blob(b"\x80\x04\x95" + bytes(200), fingerprint=FP)  # a pickle is not a snapshot


def test_header_with_valid_crc_but_overlapping_tensors_is_rejected():
    enc = _encode()
    h = enc.header
    bad = SnapshotHeader(
        h.num_tokens, h.prefix_hash, h.fingerprint, h.payload_len, h.checksum_alg, h.payload_checksum,
        (h.tensors[0], type(h.tensors[1])(**{**_asdict(h.tensors[1]), "offset": 0})),
    )
    with pytest.raises(SnapshotCorrupt, match="offset"):
        decode_snapshot(bad.to_bytes(), enc.payload, fingerprint=FP)


def _asdict(info):
    return {f: getattr(info, f) for f in info.__slots__}


def test_encode_validates_its_input():
    with pytest.raises(ValueError):
        encode_snapshot({}, num_tokens=1, prefix_hash=PH, fingerprint=FP)
    with pytest.raises(ValueError):
        encode_snapshot(make_state(), num_tokens=1, prefix_hash=b"short", fingerprint=FP)
    with pytest.raises(ValueError, match="dtype"):
        encode_snapshot({"x": torch.zeros(2, dtype=torch.complex64)}, num_tokens=1, prefix_hash=PH,
                        fingerprint=FP)


def _split(payload, sizes):
    parts, pos = [], 0
    for n in sizes:
        parts.append(bytes(payload[pos : pos + n]))
        pos += n
    return parts + [bytes(payload[pos:])]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_payload_in_parts_decodes_to_the_same_tensors(dtype):
    state = make_state() | {"step": torch.tensor([1, 2, 3], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    enc = _encode(state, storage_dtype=dtype)
    whole = decode_snapshot(enc.header_bytes, enc.payload, fingerprint=FP, prefix_hash=PH).tensors
    n = len(enc.payload)
    # parts that cut through tensors, padding and single bytes, an empty part, and Redis-style chunks
    for sizes in ([1, 63, 2, 100], [0, n // 3, 1], [7] * (n // 7 - 1)):
        got = decode_snapshot(enc.header_bytes, _split(enc.payload, sizes), fingerprint=FP, prefix_hash=PH)
        assert_state_equal(got.tensors, whole)
    got = decode_snapshot(enc.header_bytes, [bytes(c) for c in enc.chunks(64)], fingerprint=FP)
    assert_state_equal(got.tensors, whole)
    if dtype is None:
        assert_state_equal(whole, state)


def test_a_corrupted_or_missing_part_is_rejected():
    enc = _encode(checksum_alg=CHECKSUM_BLAKE2B)
    for alg_enc in (enc, _encode()):
        parts = [bytes(c) for c in alg_enc.chunks(50)]
        for i in range(len(parts)):
            bad = list(parts)
            bad[i] = bytes([bad[i][0] ^ 0x80]) + bad[i][1:]
            with pytest.raises(SnapshotCorrupt, match="checksum"):
                decode_snapshot(alg_enc.header_bytes, bad, fingerprint=FP)
        swapped = [parts[1], parts[0], *parts[2:]]
        with pytest.raises(SnapshotCorrupt, match="checksum"):
            decode_snapshot(alg_enc.header_bytes, swapped, fingerprint=FP)
        with pytest.raises(SnapshotCorrupt, match="bytes"):
            decode_snapshot(alg_enc.header_bytes, parts[:-1], fingerprint=FP)


def test_big_payloads_use_an_owned_writable_buffer():
    state = {"a": torch.randn(3, 1 << 20)}  # 12 MiB: above the huge-page threshold
    enc = _encode(state)
    snap = decode_snapshot(enc.header_bytes, [bytes(c) for c in enc.chunks(1 << 20)], fingerprint=FP)
    assert torch.equal(snap.tensors["a"], state["a"])
    snap.tensors["a"].add_(1)  # writable memory of its own, not the (immutable) Redis bytes
    assert torch.equal(snap.tensors["a"], state["a"] + 1)
    assert_state_equal(decode_blob(enc.to_blob(), fingerprint=FP).tensors, state)


def _stream(enc, groups, **kw):
    dec = SnapshotDecoder(enc.header_bytes, fingerprint=FP, **kw)
    for g in groups:
        dec.feed(g)
    return dec.finish()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streamed_decode_equals_whole_decode(dtype):
    """Fed in groups of parts that cut through tensors and padding (an empty part too), the
    streaming decoder gives what `decode_snapshot` gives."""
    state = make_state() | {"step": torch.tensor([1, 2, 3], dtype=torch.int64), "empty": torch.zeros(0, 4)}
    enc = _encode(state, storage_dtype=dtype)
    whole = decode_snapshot(enc.header_bytes, enc.payload, fingerprint=FP, prefix_hash=PH)
    n = len(enc.payload)
    for sizes in ([1, 63, 2, 100], [0, n // 3, 1], [7] * (n // 7 - 1)):
        parts = _split(enc.payload, sizes)
        got = _stream(enc, [parts[i : i + 2] for i in range(0, len(parts), 2)], prefix_hash=PH)
        assert got.num_tokens == whole.num_tokens
        assert_state_equal(got.tensors, whole.tensors)
    if dtype is None:
        assert_state_equal(whole.tensors, state)


def test_streamed_decode_rejects_bad_payloads_and_headers():
    enc = _encode()
    parts = [bytes(c) for c in enc.chunks(40)]
    bad = [parts[0], bytes([parts[1][0] ^ 1]) + parts[1][1:], *parts[2:]]
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        _stream(enc, [bad])
    with pytest.raises(SnapshotCorrupt, match="bytes"):  # short
        _stream(enc, [parts[:-1]])
    with pytest.raises(SnapshotCorrupt, match="exceeds"):  # long: refused before it is copied
        _stream(enc, [parts, [b"x"]])
    with pytest.raises(ModelMismatch):
        SnapshotDecoder(enc.header_bytes, fingerprint=fp("model-b"))
    with pytest.raises(PrefixMismatch):
        SnapshotDecoder(enc.header_bytes, fingerprint=FP, prefix_hash=prefix_hash([1]))


def test_finish_says_when_it_has_work_left_widening_or_device_copies():
    """`finish_bytes` lets the tier run `finish` inline when it only compares the checksum; a state
    widened from bf16 or copied to a device must still finish on a worker thread."""
    state = make_state()
    plain = _encode(state)
    reduced = _encode(state, storage_dtype=torch.bfloat16)
    cases = {
        "plain": (SnapshotDecoder(plain.header_bytes, fingerprint=FP, prefix_hash=PH), plain, 0),
        "kept reduced": (SnapshotDecoder(reduced.header_bytes, fingerprint=FP, prefix_hash=PH, restore_dtype=False),
                         reduced, 0),
        "widened": (SnapshotDecoder(reduced.header_bytes, fingerprint=FP, prefix_hash=PH), reduced,
                    len(reduced.payload)),
        "staged": (SnapshotDecoder(plain.header_bytes, fingerprint=FP, prefix_hash=PH,
                                   stage_device=torch.device("cpu")), plain, len(plain.payload)),
    }
    for name, (dec, enc, want) in cases.items():
        assert dec.finish_bytes == want, name
        dec.feed([enc.payload])
        dec.finish()  # and it does finish, whichever way it is run
