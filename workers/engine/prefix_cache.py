"""A prefix cache of KV blocks, shared by the causal LM engines of one worker process.

A prompt is cut into blocks of `BLOCK_TOKENS` tokens. Block i is keyed by a hash chained
over everything before it: hash(key of block i-1, the tokens of block i), seeded with the
model version and the organization. So a key names one exact token prefix of one model
for one organization, and two requests share a block only when everything before it is
equal too. The value is that block's keys and values for every layer.

Organizations never share blocks: a hit shortens the time to the first token, and a
shared cache would let one tenant learn, by timing, whether another tenant's prompt
began a certain way (docs/security.md).

Memory is bounded (`MANTLE_KV_CACHE_MB` for the whole process) and the least recently
used block goes first. A lookup or an insert touches a chain from its last block to its
first, so a block is always more recent than the blocks that extend it and eviction
takes chains from their ends: a block is never evicted while a block after it is kept
(which could no longer be reached: lookups stop at the first miss).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 16
DEFAULT_MB = 256


class PrefixCache:
    """Thread-safe LRU of KV blocks: key -> array [2 * layers, kv_heads, BLOCK_TOKENS, head_dim].

    Row 2i of a block is layer i's keys, row 2i + 1 its values (the engine's past order).
    """

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # tokens served from the cache
        self.misses = 0  # prompt tokens that had to be computed (full blocks only)
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, namespace: str, tokens: Sequence[int], blocks: int) -> list[bytes]:
        """The chained keys of the first `blocks` full blocks of `tokens`."""
        keys: list[bytes] = []
        parent = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
        size = self.block_tokens
        for b in range(blocks):
            chunk = np.asarray(tokens[b * size : (b + 1) * size], dtype=np.int64)
            parent = hashlib.blake2b(parent + chunk.tobytes(), digest_size=16).digest()
            keys.append(parent)
        return keys

    def cacheable_blocks(self, prompt_len: int) -> int:
        """Full blocks of a prompt that may be cached or reused. At least the last two
        prompt tokens are always computed: the last one's logits choose the first generated
        token, and ONNX Runtime computes a call of one token on another kernel path whose
        logits differ (by up to 0.57 on the built-in model) from the same token computed
        beside others, which would change a greedy answer with what happened to be cached."""
        return max(0, prompt_len - 2) // self.block_tokens

    def lookup(self, namespace: str, tokens: Sequence[int]) -> list[np.ndarray]:
        """The cached blocks of the longest cached prefix of `tokens` (maybe none)."""
        if not self.enabled:
            return []
        wanted = self.cacheable_blocks(len(tokens))
        if not wanted:
            return []
        keys = self.keys(namespace, tokens, wanted)
        found: list[np.ndarray] = []
        with self._lock:
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                found.append(block)
            for key in reversed(keys[: len(found)]):
                self._blocks.move_to_end(key)
            self.hits += len(found) * self.block_tokens
            self.misses += (wanted - len(found)) * self.block_tokens
        return found

    def insert(
        self,
        namespace: str,
        tokens: Sequence[int],
        blocks: Sequence[np.ndarray],
        *,
        start: int = 0,
    ) -> None:
        """Store `blocks` as the full blocks start, start + 1, ... of `tokens`; blocks
        already present are only touched."""
        if not self.enabled or not blocks:
            return
        keys = self.keys(namespace, tokens, start + len(blocks))[start:]
        with self._lock:
            for key, block in zip(keys, blocks, strict=True):
                if key in self._blocks:
                    continue
                if block.nbytes > self.max_bytes:
                    return
                self._blocks[key] = block
                self._bytes += block.nbytes
            for key in reversed(keys):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            while self._bytes > self.max_bytes and self._blocks:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


def block_tokens() -> int:
    """MANTLE_KV_BLOCK_TOKENS, else BLOCK_TOKENS."""
    raw = os.environ.get("MANTLE_KV_BLOCK_TOKENS", "").strip()
    if not raw:
        return BLOCK_TOKENS
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= 1024:
        raise ValueError(
            f"MANTLE_KV_BLOCK_TOKENS must be a whole number from 1 to 1024, not {raw!r}"
        )
    return size


_shared: PrefixCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> PrefixCache:
    """The process's cache, sized by MANTLE_KV_CACHE_MB (0 turns caching off)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            raw = os.environ.get("MANTLE_KV_CACHE_MB", "").strip()
            mb = int(raw) if raw else DEFAULT_MB
            _shared = PrefixCache(mb * 1024 * 1024, block_tokens())
            logger.info("prefix cache: %d MB, blocks of %d tokens", mb, _shared.block_tokens)
        return _shared
