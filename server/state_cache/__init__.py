"""Tiered conversation state cache: host LRU and Redis behind one facade, `TieredStateCache`.

See docs/state-cache.md for the format, the key layout and how the engine wires it in.
"""

from server.state_cache.host import HostEntry, HostLRU
from server.state_cache.keys import (
    KeySpace,
    PrefixHasher,
    model_fingerprint,
    model_tag,
    prefix_hash,
    weights_digest_from_files,
    weights_digest_from_state_dict,
)
from server.state_cache.redis_tier import RedisTier
from server.state_cache.snapshot import (
    ModelMismatch,
    PrefixMismatch,
    Snapshot,
    SnapshotCorrupt,
    SnapshotError,
    decode_blob,
    decode_snapshot,
    encode_snapshot,
)
from server.state_cache.tiered import CacheHit, Lease, TieredStateCache

__all__ = [
    "CacheHit",
    "HostEntry",
    "HostLRU",
    "KeySpace",
    "Lease",
    "ModelMismatch",
    "PrefixHasher",
    "PrefixMismatch",
    "RedisTier",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotError",
    "TieredStateCache",
    "decode_blob",
    "decode_snapshot",
    "encode_snapshot",
    "model_fingerprint",
    "model_tag",
    "prefix_hash",
    "weights_digest_from_files",
    "weights_digest_from_state_dict",
]
