"""Tests for the paged KV block manager.

The stateful test drives random allocate / compute / append / free / reset
sequences against a simulated KV store (which tokens were written into which
block slot), so a prefix-cache hit is checked against what is really in the
reused blocks, not only against the manager's own bookkeeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from pdserve.engine.block_manager import (
    Allocation,
    BlockManager,
    NoFreeBlocksError,
    hash_block,
)

# --- helpers ---------------------------------------------------------------------------


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable plus the private pools, to prove atomicity."""
    return (
        bm.stats(),
        {o: bm.block_table(o) for o in bm.owners()},
        tuple(bm._refcount),
        tuple(bm._free),
        tuple(bm._evictable),
        dict(bm._hash_to_block),
        tuple(bm._block_hash),
    )


def check_invariants(bm: BlockManager) -> None:
    tables = {o: bm.block_table(o) for o in bm.owners()}
    refs = Counter(b for t in tables.values() for b in t)
    for owner, table in tables.items():
        assert len(table) == len(set(table)), f"{owner} holds a block twice"
    # Refcounts are exactly the number of tables each block appears in.
    assert sum(bm._refcount) == sum(len(t) for t in tables.values())
    assert all(bm._refcount[b] == refs.get(b, 0) for b in range(bm.num_blocks))
    free, evictable = set(bm._free), set(bm._evictable)
    assert len(free) == len(bm._free), "block on the free list twice"
    assert not free & evictable
    assert not (free | evictable) & refs.keys(), "block both free and referenced"
    assert len(free) + len(evictable) + len(refs) == bm.num_blocks, "block leaked"
    assert bm.num_free_blocks == bm.num_blocks - len(refs)
    assert bm.usage == pytest.approx(len(refs) / bm.num_blocks)
    # Hash map and per-block hashes mirror each other; evictable blocks all hold one.
    assert all(bm._block_hash[b] == h for h, b in bm._hash_to_block.items())
    assert sum(h is not None for h in bm._block_hash) == len(bm._hash_to_block)
    assert all(bm._block_hash[b] is not None for b in evictable)
    assert all(bm._block_hash[b] is None for b in free)
    s = bm.stats()
    assert s.num_used_blocks + s.num_free_blocks == s.num_blocks
    assert s.num_cached_blocks == len(evictable)


# --- stateful property test ------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    owners = Bundle("owners")

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        # Simulated KV: block -> {slot: token}. Cleared whenever a block is handed out fresh.
        self.kv: dict[int, dict[int, int]] = {}
        self.queries = 0
        self.hits = 0

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.kv = {b: {} for b in range(num_blocks)}

    def capacity(self, owner: str) -> int:
        return len(self.bm.block_table(owner)) * self.bm.block_size

    # A two-letter alphabet makes shared prefixes (and hash collisions of content) common.
    @rule(
        target=owners,
        prompt=st.lists(st.integers(0, 1), min_size=1, max_size=12),
        slack=st.integers(-2, 2),
    )
    def allocate(self, prompt: list[int], slack: int):
        owner = f"r{self.counter}"
        self.counter += 1
        num_tokens = max(0, len(prompt) + slack)
        before = snapshot(self.bm)
        try:
            alloc = self.bm.allocate(owner, prompt, num_tokens)
        except NoFreeBlocksError:
            assert snapshot(self.bm) == before
            return multiple()  # no new owner enters the bundle
        bs = self.bm.block_size
        cached = alloc.num_cached_tokens
        assert list(alloc.block_ids) == self.bm.block_table(owner)
        assert len(alloc.block_ids) == self.bm.blocks_for_tokens(num_tokens)
        assert cached % bs == 0
        assert cached <= min(len(prompt) - 1, num_tokens)
        if not self.bm.enable_prefix_caching:
            assert cached == 0
        # The KV really present in the reused blocks must equal this prompt's prefix.
        for pos in range(cached):
            assert self.kv[alloc.block_ids[pos // bs]].get(pos % bs) == prompt[pos]
        for block in alloc.block_ids[cached // bs :]:
            self.kv[block] = {}
        self.queries += len(prompt)
        self.hits += cached
        self.tokens[owner] = prompt[:num_tokens]
        self.computed[owner] = cached
        return owner

    @rule(owner=owners, data=st.data())
    def compute(self, owner: str, data) -> None:
        if not self.bm.has(owner):
            return
        limit = min(len(self.tokens[owner]), self.capacity(owner))
        start = self.computed[owner]
        end = data.draw(st.integers(start, limit))
        table, bs = self.bm.block_table(owner), self.bm.block_size
        for pos in range(start, end):
            slots = self.kv[table[pos // bs]]
            # Uncomputed positions live in blocks this owner got fresh; a slot that is
            # already written means two owners write the same physical KV slot.
            assert pos % bs not in slots
            slots[pos % bs] = self.tokens[owner][pos]
        self.bm.mark_computed(owner, self.tokens[owner][:end])
        self.computed[owner] = end

    @rule(owner=owners, token=st.integers(0, 1))
    def append(self, owner: str, token: int) -> None:
        if not self.bm.has(owner):
            return
        want = len(self.tokens[owner]) + 1
        old_table = self.bm.block_table(owner)
        before = snapshot(self.bm)
        try:
            new = self.bm.ensure_capacity(owner, want)
        except NoFreeBlocksError:
            assert snapshot(self.bm) == before
            return
        assert self.bm.block_table(owner) == old_table + new
        assert len(self.bm.block_table(owner)) == max(
            len(old_table), self.bm.blocks_for_tokens(want)
        )
        for block in new:
            assert self.bm._refcount[block] == 1
            self.kv[block] = {}
        self.tokens[owner].append(token)

    @rule(owner=consumes(owners))
    def free(self, owner: str) -> None:
        if not self.bm.has(owner):
            return
        n = len(self.bm.block_table(owner))
        assert self.bm.free(owner) == n
        assert not self.bm.has(owner)
        with pytest.raises(KeyError):
            self.bm.free(owner)
        del self.tokens[owner], self.computed[owner]

    @precondition(lambda self: hasattr(self, "bm"))
    @rule()
    def reset(self) -> None:
        self.bm.reset_prefix_cache()
        assert self.bm.stats().num_cached_blocks == 0

    @precondition(lambda self: hasattr(self, "bm"))
    @invariant()
    def invariants(self) -> None:
        check_invariants(self.bm)
        s = self.bm.stats()
        assert (s.prefix_queries_tokens, s.prefix_hit_tokens) == (self.queries, self.hits)
        assert set(self.bm.owners()) == set(self.tokens)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for owner in self.bm.owners():
            self.bm.free(owner)
        check_invariants(self.bm)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.usage == 0


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


# --- construction and basic accounting -------------------------------------------------


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (-1, 4), (4, 0), (4, -2)])
def test_bad_construction_raises_value_error(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@given(n=st.integers(0, 1000), bs=st.integers(1, 64))
def test_blocks_for_tokens_is_ceil_division(n: int, bs: int) -> None:
    bm = BlockManager(1, bs)
    k = bm.blocks_for_tokens(n)
    assert ((k - 1) * bs < n <= k * bs) if n else k == 0


def test_read_only_attributes() -> None:
    bm = BlockManager(8, 16)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks, bm.usage) == (8, 16, 8, 0.0)
    with pytest.raises(AttributeError):
        bm.num_blocks = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        bm.block_size = 3  # type: ignore[misc]


def test_unknown_owner_and_double_free_raise_key_error() -> None:
    bm = BlockManager(4, 2)
    for call in (bm.free, bm.block_table, lambda o: bm.ensure_capacity(o, 3)):
        with pytest.raises(KeyError):
            call("ghost")
    with pytest.raises(KeyError):
        bm.mark_computed("ghost", [1, 2])
    bm.allocate("a", [1, 2, 3])
    assert bm.free("a") == 2
    with pytest.raises(KeyError):
        bm.free("a")
    assert bm.num_free_blocks == 4


def test_allocate_existing_owner_raises_value_error() -> None:
    bm = BlockManager(4, 2)
    bm.allocate("a", [1])
    before = snapshot(bm)
    with pytest.raises(ValueError):
        bm.allocate("a", [1])
    assert snapshot(bm) == before


def test_mark_computed_beyond_capacity_raises() -> None:
    bm = BlockManager(4, 2)
    bm.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError):
        bm.mark_computed("a", [1, 2, 3, 4, 5])


# --- atomic failure --------------------------------------------------------------------


def test_allocate_failure_is_atomic_even_with_cache_hits() -> None:
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    bm.allocate("b", [9])  # 3 + 1 blocks: pool full, a's prefix blocks are shared-able
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(1)
    before = snapshot(bm)
    # Would hit a's 2 full blocks but still needs 3 fresh ones.
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("c", prompt + [6, 7, 8, 9, 10])
    assert snapshot(bm) == before
    assert not bm.has("c")


def test_evictable_hits_are_not_double_counted_as_free() -> None:
    bm = BlockManager(3, 2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", [1, 2, 3, 4, 5])
    bm.free("a")  # 2 evictable + 1 free
    before = snapshot(bm)
    # Hits both evictable blocks; then needs 2 fresh but only 1 block is left over.
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", [1, 2, 3, 4, 5, 6, 7])
    assert snapshot(bm) == before


def test_ensure_capacity_is_atomic_and_returns_new_blocks() -> None:
    bm = BlockManager(4, 2)
    bm.allocate("a", [1, 2, 3])
    assert bm.ensure_capacity("a", 4) == []
    assert bm.ensure_capacity("a", 1) == []  # tables never shrink
    new = bm.ensure_capacity("a", 6)
    assert len(new) == 1 and bm.block_table("a")[-1] == new[0]
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.ensure_capacity("a", 10)  # needs 2 more, only 1 left
    assert snapshot(bm) == before


# --- prefix caching --------------------------------------------------------------------


@given(
    k=st.integers(0, 4),
    block_size=st.integers(1, 4),
    tail_a=st.lists(st.integers(100, 199), min_size=1, max_size=6),
    tail_b=st.lists(st.integers(200, 299), min_size=1, max_size=6),
    data=st.data(),
)
def test_shared_prefix_shares_exactly_k_blocks(k, block_size, tail_a, tail_b, data) -> None:
    prefix = data.draw(
        st.lists(st.integers(0, 50), min_size=k * block_size, max_size=k * block_size)
    )
    a, b = prefix + tail_a, prefix + tail_b
    bm = BlockManager(64, block_size)
    alloc_a = bm.allocate("a", a)
    assert alloc_a.num_cached_tokens == 0
    bm.mark_computed("a", a)
    alloc_b = bm.allocate("b", b)
    # Tails differ at their first token, so the hit is exactly the k prefix blocks.
    assert alloc_b.num_cached_tokens == k * block_size
    assert alloc_b.block_ids[:k] == alloc_a.block_ids[:k]
    assert not set(alloc_b.block_ids[k:]) & set(alloc_a.block_ids)
    s = bm.stats()
    assert (s.prefix_queries_tokens, s.prefix_hit_tokens) == (len(a) + len(b), k * block_size)


@given(n_blocks=st.integers(1, 5), block_size=st.integers(1, 4))
def test_hit_never_covers_last_token(n_blocks: int, block_size: int) -> None:
    prompt = list(range(n_blocks * block_size))  # ends exactly on a block boundary
    bm = BlockManager(32, block_size)
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    alloc = bm.allocate("b", prompt)
    assert alloc.num_cached_tokens == (n_blocks - 1) * block_size
    assert alloc.num_cached_tokens <= len(prompt) - 1


def test_hit_is_capped_at_num_tokens() -> None:
    bm = BlockManager(16, 2)
    prompt = list(range(9))
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    alloc = bm.allocate("b", prompt, num_tokens=3)
    assert alloc.num_cached_tokens == 2
    assert len(alloc.block_ids) == 2


def test_partial_block_is_never_shared() -> None:
    bm = BlockManager(16, 4)
    a = [1, 2, 3, 4, 5, 6]  # one full block + a partial one
    bm.allocate("a", a)
    bm.mark_computed("a", a)
    alloc = bm.allocate("b", [1, 2, 3, 4, 5, 6, 7])
    assert alloc.num_cached_tokens == 4
    assert alloc.block_ids[0] == bm.block_table("a")[0]
    assert alloc.block_ids[1] != bm.block_table("a")[1]


def test_mark_computed_is_incremental_and_only_full_blocks() -> None:
    bm = BlockManager(16, 2)
    seq = [5, 6, 7, 8, 9]
    bm.allocate("a", seq, num_tokens=6)
    bm.mark_computed("a", seq[:1])
    assert len(bm._hash_to_block) == 0
    bm.mark_computed("a", seq[:3])
    assert len(bm._hash_to_block) == 1
    bm.mark_computed("a", seq)
    bm.mark_computed("a", seq)  # repeating is a no-op
    assert len(bm._hash_to_block) == 2
    assert bm.allocate("b", seq + [0]).num_cached_tokens == 4


def test_cached_blocks_survive_owner_free() -> None:
    bm = BlockManager(8, 2)
    prompt = [1, 2, 3, 4, 5]
    table_a = bm.allocate("a", prompt).block_ids
    bm.mark_computed("a", prompt)
    bm.free("a")
    s = bm.stats()
    assert (s.num_cached_blocks, s.num_free_blocks, s.num_used_blocks) == (2, 8, 0)
    assert bm.usage == 0
    alloc = bm.allocate("b", prompt)
    assert alloc.num_cached_tokens == 4
    assert alloc.block_ids[:2] == table_a[:2]
    assert bm.stats().num_cached_blocks == 0  # reused blocks left the LRU


def test_duplicate_content_keeps_first_mapping() -> None:
    bm = BlockManager(8, 2)
    prompt = [1, 2, 3, 4, 5]
    a = bm.allocate("a", prompt)
    b = bm.allocate("b", prompt)  # nothing registered yet: no hit
    assert b.num_cached_tokens == 0 and not set(a.block_ids) & set(b.block_ids)
    bm.mark_computed("a", prompt)
    bm.mark_computed("b", prompt)
    assert sorted(bm._hash_to_block.values()) == sorted(a.block_ids[:2])
    bm.free("b")
    assert bm.stats().num_cached_blocks == 0  # b's duplicates went to the free list
    assert bm.allocate("c", prompt).block_ids[:2] == a.block_ids[:2]


def test_eviction_drops_hashes_lru_tail_first() -> None:
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4, 5]
    table_a = bm.allocate("a", prompt).block_ids
    bm.mark_computed("a", prompt)
    bm.free("a")  # 2 cached (prefix blocks) + 2 plain free
    bm.allocate("b", [7, 7, 7])  # takes the 2 plain free blocks, no eviction
    assert bm.stats().num_cached_blocks == 2
    bm.allocate("c", [8])  # must evict: the tail block is least recently freed
    assert bm.block_table("c") == [table_a[1]]
    assert bm.stats().num_cached_blocks == 1
    assert len(bm._hash_to_block) == 1
    bm.free("b")
    assert bm.allocate("d", prompt).num_cached_tokens == 2  # only block 0 survives


def test_eviction_makes_old_prefix_unreachable() -> None:
    bm = BlockManager(3, 2)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    bm.free("a")
    bm.allocate("b", [9, 9, 9, 9, 9])  # needs all 3 blocks: evicts both cached ones
    assert bm._hash_to_block == {} and bm.stats().num_cached_blocks == 0
    bm.free("b")
    assert bm.allocate("c", prompt).num_cached_tokens == 0


def test_reset_prefix_cache_keeps_live_hashes() -> None:
    bm = BlockManager(8, 2)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    bm.allocate("x", [4, 4, 4])
    bm.mark_computed("x", [4, 4, 4])
    bm.free("x")
    assert bm.stats().num_cached_blocks == 1
    bm.reset_prefix_cache()
    s = bm.stats()
    assert s.num_cached_blocks == 0 and s.num_free_blocks == 5
    assert bm.allocate("y", [4, 4, 4]).num_cached_tokens == 0
    assert bm.allocate("b", prompt).num_cached_tokens == 4  # a's blocks still registered


def test_prefix_caching_disabled_shares_nothing() -> None:
    bm = BlockManager(16, 2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    a = bm.allocate("a", prompt)
    bm.mark_computed("a", prompt)
    b = bm.allocate("b", prompt)
    assert b.num_cached_tokens == 0
    assert not set(a.block_ids) & set(b.block_ids)
    bm.free("a")
    assert bm.stats().num_cached_blocks == 0
    assert bm.stats().prefix_hit_tokens == 0


def test_allocation_is_frozen() -> None:
    alloc = Allocation((1, 2), 0)
    with pytest.raises(AttributeError):
        alloc.num_cached_tokens = 3  # type: ignore[misc]


# --- hash_block ------------------------------------------------------------------------

token_lists = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=16)


@given(tokens=token_lists, parent=st.binary(min_size=32, max_size=32))
def test_hash_block_depends_on_parent(tokens: list[int], parent: bytes) -> None:
    root = hash_block(None, tokens)
    assert hash_block(parent, tokens) != root
    assert hash_block(root, tokens) != root
    assert hash_block(parent, tokens) == hash_block(parent, list(tokens))
    assert hash_block(parent, tuple(tokens)) == hash_block(parent, tokens)


@given(a=token_lists, b=token_lists)
def test_hash_block_distinguishes_tokens(a: list[int], b: list[int]) -> None:
    assert (hash_block(None, a) == hash_block(None, b)) == (a == b)


def test_hash_block_chain_distinguishes_prefixes() -> None:
    h1 = hash_block(hash_block(None, [1, 2]), [3, 4])
    h2 = hash_block(hash_block(None, [9, 9]), [3, 4])
    assert h1 != h2


def test_hash_block_is_deterministic_across_processes() -> None:
    code = (
        "from pdserve.engine.block_manager import hash_block;"
        "print(hash_block(hash_block(None, [1, 2, 3]), [4, 5, 6]).hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == hash_block(hash_block(None, [1, 2, 3]), [4, 5, 6]).hex()
