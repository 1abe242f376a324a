"""Cache keys: tenant namespaces, token-prefix hashes and the model fingerprint.

Every key carries the tenant, so one tenant can never read, resume or time another's entries, and
snapshot keys also carry a short model tag, so replicas serving different weights never share
state. A prefix is identified by a chained blake2b over its token ids: anchors every
`ANCHOR_BLOCK` tokens make hashing a 32K-token prompt cost 128 small hashes, and the exact-length
hash of any prefix is one more hash over the anchor and the tail.
"""

from __future__ import annotations

import array
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ANCHOR_BLOCK = 256
HASH_BYTES = 32
# Bump when the hashing scheme changes, so old keys simply stop matching.
SCHEME = "v1"

_SAFE_PART = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_TOKEN_ID = 2**32 - 1
assert array.array("I").itemsize == 4, "token logs are uint32"
_SWAP = sys.byteorder != "little"


def key_part(value: str) -> str:
    """A key component that cannot smuggle a separator: safe values stay readable, others are hashed.

    `~` is outside the safe alphabet, so a hashed part never equals a raw one.
    """
    if _SAFE_PART.fullmatch(value):
        return value
    return "~" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def tokens_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32, the byte form every hash and token log uses."""
    if isinstance(token_ids, list):  # the hot path (token logs): 2.5x numpy's list conversion
        try:
            arr = array.array("I", token_ids)  # rejects negatives, > 2**32 - 1, floats and nesting
        except (OverflowError, TypeError) as e:
            raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]") from e
        if _SWAP:
            arr.byteswap()
        return arr.tobytes()
    try:
        nd = np.asarray(token_ids, dtype=np.int64)
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]") from e
    if nd.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {nd.shape}")
    if nd.size and (nd.min() < 0 or nd.max() > _MAX_TOKEN_ID):
        raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]")
    return nd.astype("<u4").tobytes()


def bytes_to_tokens(data: bytes | bytearray | memoryview) -> list[int]:
    if len(data) % 4:
        raise ValueError(f"token log of {len(data)} bytes is not a whole number of uint32 ids")
    return np.frombuffer(data, dtype="<u4").tolist()


def _anchor_step(prev: bytes, block: bytes) -> bytes:
    return hashlib.blake2b(prev + block, digest_size=HASH_BYTES, person=b"gla-anchor").digest()


_ANCHOR0 = hashlib.blake2b(SCHEME.encode(), digest_size=HASH_BYTES, person=b"gla-anchor").digest()


class PrefixHasher:
    """Hashes of the prefixes of one token sequence, computed once and reused for many lengths.

    Example:
        >>> h = PrefixHasher([1, 2, 3])
        >>> h.prefix_hash(2) == prefix_hash([1, 2])
        True
    """

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.num_tokens = len(token_ids)
        self._data = tokens_to_bytes(token_ids)
        step = 4 * ANCHOR_BLOCK
        # anchors[k] summarises tokens[: k * ANCHOR_BLOCK]
        self.anchors = [_ANCHOR0]
        for k in range(self.num_tokens // ANCHOR_BLOCK):
            self.anchors.append(_anchor_step(self.anchors[-1], self._data[k * step : (k + 1) * step]))

    def anchor_for(self, n: int) -> bytes:
        """The anchor under which a prefix of length `n` is indexed."""
        return self.anchors[n // ANCHOR_BLOCK]

    def prefix_hash(self, n: int) -> bytes:
        """The exact hash of `tokens[:n]`; prefixes of different lengths never share a hash."""
        if not 0 <= n <= self.num_tokens:
            raise ValueError(f"prefix length {n} outside [0, {self.num_tokens}]")
        k = n // ANCHOR_BLOCK
        tail = self._data[4 * k * ANCHOR_BLOCK : 4 * n]
        data = self.anchors[k] + tail + n.to_bytes(8, "little")
        return hashlib.blake2b(data, digest_size=HASH_BYTES, person=b"gla-prefix").digest()


def prefix_hash(token_ids: Sequence[int]) -> bytes:
    """The hash stored in a snapshot header: identifies exactly the tokens the state summarises."""
    return PrefixHasher(token_ids).prefix_hash(len(token_ids))


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds every key the cache uses; the only place key layout is defined.

    Args:
        prefix: namespace for this deployment, e.g. "gla:" (shared by all replicas of one service).
        model_tag: short model identity (see `model_tag`), so different weights never share state.

    Keys (tenant `t`, conversation `c`, prefix hash `p`, anchor `a`):
        {prefix}{model}:{t}:snap:{p}   snapshot of a token prefix (manifest; chunks hang off it)
        {prefix}{model}:{t}:anc:{a}    set of prefix lengths cached under an anchor
        {prefix}{model}:{t}:conv:{c}   the conversation's latest committed prefix (length + hash)
        {prefix}{t}:log:{c}            the conversation's token ids (model independent)
        {prefix}{t}:lease:{c}          the turn lease
    """

    prefix: str = "gla:"
    model_tag: str = "model"

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}{key_part(tenant)}"

    def _model_tenant(self, tenant: str) -> str:
        return f"{self.prefix}{key_part(self.model_tag)}:{key_part(tenant)}"

    def snapshot(self, tenant: str, prefix_digest: bytes) -> str:
        return f"{self._model_tenant(tenant)}:snap:{prefix_digest.hex()}"

    def anchor(self, tenant: str, anchor_digest: bytes) -> str:
        return f"{self._model_tenant(tenant)}:anc:{anchor_digest.hex()}"

    def conversation(self, tenant: str, conversation_id: str) -> str:
        return f"{self._model_tenant(tenant)}:conv:{key_part(conversation_id)}"

    def token_log(self, tenant: str, conversation_id: str) -> str:
        return f"{self._tenant(tenant)}:log:{key_part(conversation_id)}"

    def lease(self, tenant: str, conversation_id: str) -> str:
        return f"{self._tenant(tenant)}:lease:{key_part(conversation_id)}"


def _config_json(config: Mapping[str, Any] | Any) -> str:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or have to_dict(), got {type(config).__name__}")
    # Fields that change between library versions but not the math stay out of the identity.
    volatile = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}
    return json.dumps({k: v for k, v in config.items() if k not in volatile}, sort_keys=True, default=str)


def weights_digest_from_files(paths: Iterable[str | Path], block_bytes: int = 8 << 20) -> bytes:
    """blake2b over checkpoint files (e.g. *.safetensors), streamed so memory stays flat."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"gla-weights")
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(block_bytes):
                h.update(block)
    return h.digest()


def weights_digest_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """blake2b over parameter names, shapes, dtypes and bytes (for models built in memory)."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"gla-weights")
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def model_fingerprint(config: Mapping[str, Any] | Any, weights_digest: bytes | str) -> bytes:
    """32-byte identity of a model: its config plus its weights.

    Snapshots carry it and are rejected when it differs, so a state computed by other weights is
    never loaded even if keys collide.
    """
    digest = weights_digest.encode() if isinstance(weights_digest, str) else weights_digest
    data = _config_json(config).encode() + b"\0" + digest
    return hashlib.blake2b(data, digest_size=HASH_BYTES, person=b"gla-model").digest()


def model_tag(fingerprint: bytes) -> str:
    """The short form of a fingerprint used inside keys."""
    return fingerprint[:8].hex()
