
import pytest
import torch

from server.state_cache.keys import (
    ANCHOR_BLOCK,
    KeySpace,
    PrefixHasher,
    bytes_to_tokens,
    key_part,
    model_fingerprint,
    prefix_hash,
    tokens_to_bytes,
    weights_digest_from_files,
    weights_digest_from_state_dict,
)


def test_prefix_hash_of_any_length_matches_hashing_that_prefix_alone():
    tokens = list(range(1000, 1000 + 2 * ANCHOR_BLOCK + 37))
    h = PrefixHasher(tokens)
    for n in (0, 1, ANCHOR_BLOCK - 1, ANCHOR_BLOCK, ANCHOR_BLOCK + 1, 2 * ANCHOR_BLOCK, len(tokens)):
        assert h.prefix_hash(n) == prefix_hash(tokens[:n])
    hashes = {h.prefix_hash(n) for n in range(len(tokens) + 1)}
    assert len(hashes) == len(tokens) + 1
    with pytest.raises(ValueError):
        h.prefix_hash(len(tokens) + 1)


def test_prefix_hash_distinguishes_trailing_zero_and_order():
    assert prefix_hash([1, 2]) != prefix_hash([1, 2, 0])
    assert prefix_hash([1, 2]) != prefix_hash([2, 1])
    assert prefix_hash([]) != prefix_hash([0])


def test_token_bytes_round_trip_and_validation():
    ids = [0, 1, 2**32 - 1, 65535]
    data = tokens_to_bytes(ids)
    assert len(data) == 16 and data[:4] == b"\0\0\0\0" and bytes_to_tokens(data) == ids
    for bad in ([-1], [2**32], [[1, 2]]):
        with pytest.raises(ValueError):
            tokens_to_bytes(bad)
    with pytest.raises(ValueError):
        bytes_to_tokens(b"abc")


def test_keys_are_namespaced_by_tenant_and_cannot_be_forged_with_separators():
    ks = KeySpace("gla:", "m1")
    a, b = ks.conversation("alice", "c1"), ks.conversation("bob", "c1")
    assert a != b and ":alice:" in a
    # a tenant name with a separator is hashed, so it cannot reach into another namespace
    assert ks.token_log("alice:log", "x") != ks.token_log("alice", "log:x")
    assert key_part("alice:conv").startswith("~") and key_part("ok-name_1.2") == "ok-name_1.2"
    assert ks.snapshot("alice", b"\1" * 32) != ks.snapshot("bob", b"\1" * 32)
    assert KeySpace("gla:", "m2").snapshot("alice", b"\1" * 32) != ks.snapshot("alice", b"\1" * 32)


def test_model_fingerprint_tracks_config_and_weights_but_not_volatile_fields(tmp_path):
    cfg = {"hidden_size": 64, "num_heads": 2, "transformers_version": "5.0"}
    w1 = weights_digest_from_state_dict({"w": torch.ones(3)})
    w2 = weights_digest_from_state_dict({"w": torch.tensor([1.0, 1.0, 1.0001])})
    assert w1 != w2
    base = model_fingerprint(cfg, w1)
    assert len(base) == 32
    assert model_fingerprint({**cfg, "transformers_version": "5.9"}, w1) == base
    assert model_fingerprint({**cfg, "hidden_size": 128}, w1) != base
    assert model_fingerprint(cfg, w2) != base
    (tmp_path / "model.safetensors").write_bytes(b"abc" * 1000)
    d1 = weights_digest_from_files([tmp_path / "model.safetensors"], block_bytes=7)
    (tmp_path / "model.safetensors").write_bytes(b"abc" * 999 + b"abd")
    assert weights_digest_from_files([tmp_path / "model.safetensors"]) != d1
