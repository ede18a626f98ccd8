"""Paged KV-cache block manager with content-hashed prefix caching.

The KV cache is split into ``num_blocks`` blocks of ``block_size`` token slots; a
block is an integer id in ``[0, num_blocks)``. Requests ("owners") hold an ordered
block table. Every block is in exactly one of three states:

* **free**       -- refcount 0, no hash; holds nothing worth keeping.
* **used**       -- refcount >= 1; referenced by one or more owners' tables.
* **evictable**  -- refcount 0 but holds a registered hash, so its KV can still be
  reused by a later request with the same prefix. Kept in LRU order.

Lifecycle of one owner::

    allocate(owner, prompt)       prefix-cache hits (refcount++) + fresh blocks
      -> mark_computed(owner, ids)  KV written; full blocks get a chained hash
      -> ensure_capacity(owner, n)  grow the table as decoding appends tokens
      -> free(owner)                refcount--; 0 -> evictable (hashed) or free

Fresh blocks come from the free list first; only when it is empty is the
least-recently-freed evictable block reclaimed, dropping its hash. Every
mutating call is atomic: if it raises, no state (including statistics) changed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation needs more blocks than can be taken right now."""


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Return the chained SHA-256 of one full block of tokens.

    ``parent`` is the hash of the preceding block (``None`` for the first block),
    so equal hashes imply equal whole prefixes, not just equal blocks. The result
    depends only on the arguments (explicit little-endian int64 packing, no
    Python ``hash()``), so it is stable across processes and machines.
    """
    h = hashlib.sha256()
    # A tag byte keeps "no parent" distinct from any real parent digest.
    if parent is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01")
        h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(frozen=True)
class Allocation:
    """Result of :meth:`BlockManager.allocate`.

    ``num_cached_tokens`` leading tokens already have their KV in the first
    ``num_cached_tokens // block_size`` blocks of ``block_ids``.
    """

    block_ids: tuple[int, ...]
    num_cached_tokens: int


@dataclass(frozen=True)
class BlockManagerStats:
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    prefix_queries_tokens: int
    prefix_hit_tokens: int


@dataclass(slots=True)
class _OwnerState:
    block_ids: list[int] = field(default_factory=list)
    # Leading blocks whose chained hash is known; mark_computed resumes from here.
    num_hashed_blocks: int = 0
    parent_hash: bytes | None = None


class BlockManager:
    """Reference-counted block allocator with optional prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order == free order, so popitem(last=False) yields the LRU block.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refcount: list[int] = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._owners: dict[str, _OwnerState] = {}
        self._prefix_queries_tokens = 0
        self._prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now: free plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one owner, in ``[0, 1]``."""
        return (self._num_blocks - self.num_free_blocks) / self._num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token positions (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` positions fit without any prefix-cache hit.

        Conservative: a hit on a block that is already in use would need fewer.
        """
        return self.blocks_for_tokens(num_tokens) <= self.num_free_blocks

    def allocate(
        self, owner: str, token_ids: Sequence[int], num_tokens: int | None = None
    ) -> Allocation:
        """Give a new ``owner`` a block table covering ``num_tokens`` positions.

        ``num_tokens`` defaults to ``len(token_ids)``; the table always has exactly
        ``blocks_for_tokens(num_tokens)`` blocks. With prefix caching, leading full
        blocks of ``token_ids`` whose chained hash is registered are shared instead
        of taken fresh. The hit never covers the last token of ``token_ids`` (its
        logits must be computed) nor goes beyond ``num_tokens``.

        Raises ValueError if ``owner`` already exists or ``num_tokens < 0``, and
        NoFreeBlocksError (leaving all state untouched) if blocks run out.
        """
        if owner in self._owners:
            raise ValueError(f"owner {owner!r} already has blocks")
        if num_tokens is None:
            num_tokens = len(token_ids)
        num_needed = self.blocks_for_tokens(num_tokens)

        # Lookup phase: read-only, so a failure below leaves nothing to undo.
        hits: list[int] = []
        parent: bytes | None = None
        if self.enable_prefix_caching:
            bs = self._block_size
            max_hit_blocks = min(len(token_ids) - 1, num_tokens) // bs
            for i in range(max_hit_blocks):
                h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
                block = self._hash_to_block.get(h)
                if block is None:
                    break
                hits.append(block)
                parent = h

        num_fresh = num_needed - len(hits)
        # Evictable hits stop being takeable once we reference them.
        takeable = self.num_free_blocks - sum(1 for b in hits if self._refcount[b] == 0)
        if num_fresh > takeable:
            raise NoFreeBlocksError(
                f"owner {owner!r} needs {num_fresh} fresh blocks, only {takeable} available"
            )

        for block in hits:
            if self._refcount[block] == 0:
                del self._evictable[block]
            self._refcount[block] += 1
        block_ids = hits + [self._take_block() for _ in range(num_fresh)]
        self._owners[owner] = _OwnerState(block_ids, len(hits), parent)

        num_cached_tokens = len(hits) * self._block_size
        self._prefix_queries_tokens += len(token_ids)
        self._prefix_hit_tokens += num_cached_tokens
        return Allocation(tuple(block_ids), num_cached_tokens)

    def ensure_capacity(self, owner: str, num_tokens: int) -> list[int]:
        """Grow ``owner``'s table to hold ``num_tokens`` positions in total.

        Returns the newly appended block ids (empty if it already fits; tables never
        shrink). Raises KeyError for an unknown owner and NoFreeBlocksError, with no
        partial growth, if not enough blocks can be taken.
        """
        state = self._owners[owner]
        missing = self.blocks_for_tokens(num_tokens) - len(state.block_ids)
        if missing <= 0:
            return []
        if missing > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"owner {owner!r} needs {missing} more blocks, only "
                f"{self.num_free_blocks} available"
            )
        new_blocks = [self._take_block() for _ in range(missing)]
        state.block_ids.extend(new_blocks)
        return new_blocks

    def block_table(self, owner: str) -> list[int]:
        """Return a copy of ``owner``'s block table. KeyError for an unknown owner."""
        return list(self._owners[owner].block_ids)

    def mark_computed(self, owner: str, token_ids: Sequence[int]) -> None:
        """Record that KV for the first ``len(token_ids)`` tokens of ``owner`` is written.

        Each block that became full since the last call gets its chained hash
        registered, making it reusable by later allocations. If a different block
        already holds that hash the existing mapping wins and this block stays
        unregistered (it is released to the free list on ``free``). Work is
        proportional to the newly full blocks. KeyError for an unknown owner;
        ValueError if ``token_ids`` exceeds the table's capacity. Does nothing
        else when prefix caching is disabled.
        """
        state = self._owners[owner]
        bs = self._block_size
        if len(token_ids) > len(state.block_ids) * bs:
            raise ValueError(
                f"owner {owner!r}: {len(token_ids)} tokens exceed table capacity "
                f"{len(state.block_ids) * bs}"
            )
        if not self.enable_prefix_caching:
            return
        parent = state.parent_hash
        for i in range(state.num_hashed_blocks, len(token_ids) // bs):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            if parent not in self._hash_to_block:
                block = state.block_ids[i]
                self._hash_to_block[parent] = block
                self._block_hash[block] = parent
            # The chain continues through duplicates: later blocks hash by content.
            state.num_hashed_blocks = i + 1
            state.parent_hash = parent

    def free(self, owner: str) -> int:
        """Release ``owner``'s blocks and forget the owner; return how many.

        Blocks whose refcount drops to 0 become evictable if they hold a hash,
        otherwise free. KeyError for an unknown (or already freed) owner.
        """
        state = self._owners.pop(owner)
        # Release tail-first so that, under LRU eviction, a sequence's later blocks
        # are reclaimed before its prefix, which is the part most likely reused.
        for block in reversed(state.block_ids):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        return len(state.block_ids)

    def has(self, owner: str) -> bool:
        """Whether ``owner`` currently holds a block table."""
        return owner in self._owners

    def owners(self) -> list[str]:
        """Current owners in allocation order."""
        return list(self._owners)

    def stats(self) -> BlockManagerStats:
        """Point-in-time counters; see :class:`BlockManagerStats`."""
        num_free = self.num_free_blocks
        return BlockManagerStats(
            num_blocks=self._num_blocks,
            num_free_blocks=num_free,
            num_used_blocks=self._num_blocks - num_free,
            num_cached_blocks=len(self._evictable),
            prefix_queries_tokens=self._prefix_queries_tokens,
            prefix_hit_tokens=self._prefix_hit_tokens,
        )

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of all unreferenced blocks; they become plain free.

        Blocks still in use keep their hashes, so sharing among live owners and
        their eventual return to the cache are unaffected.
        """
        for block in self._evictable:
            self._forget_hash(block)
            self._free.append(block)
        self._evictable.clear()

    def _take_block(self) -> int:
        # Callers check availability first, so one of the two pools is non-empty.
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget_hash(block)
        self._refcount[block] = 1
        return block

    def _forget_hash(self, block: int) -> None:
        h = self._block_hash[block]
        if h is not None:
            del self._hash_to_block[h]
            self._block_hash[block] = None
