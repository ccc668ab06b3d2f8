"""Block pool bookkeeping: exact block ids, reference counts and eviction order."""

from __future__ import annotations

import random

import pytest

from hfaccel.cache.block_pool import NO_PARENT, BlockPool, CacheFullError, block_hash


def cache_prompt(pool: BlockPool, tokens: list[int], blocks: list[int]) -> None:
    """Register every full block of `tokens` (held in `blocks`) as a model would after prefill."""
    parent = NO_PARENT
    for i in range(len(tokens) // pool.block_size):
        parent = block_hash(parent, tokens[i * pool.block_size:(i + 1) * pool.block_size])
        pool.cache_block(blocks[i], parent)


def test_allocate_in_order_and_uncached_blocks_are_reused_first():
    pool = BlockPool(6, block_size=4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.ref_count == [1, 1, 1, 1, 1, 0] and pool.num_free == 1
    pool.release([0, 1])                      # nothing cached in them: back to the head, warm memory first
    assert pool.free_order() == [0, 1, 5]
    assert pool.allocate(2) == [0, 1]
    pool.check()


def test_cache_full_error_names_needed_and_free_and_changes_nothing():
    pool = BlockPool(4, block_size=16)
    pool.allocate(3)
    with pytest.raises(CacheFullError, match=r"2 blocks of 16 tokens needed, 1 free") as info:
        pool.allocate(2)
    assert (info.value.needed, info.value.free) == (2, 1)
    assert pool.num_free == 1 and pool.allocate(1) == [3]
    pool.check()


def test_share_and_copy_on_write():
    pool = BlockPool(4, block_size=4)
    a = pool.allocate(2)                      # [0, 1]
    pool.share(a)                             # a beam / num_return_sequences fork
    assert pool.ref_count[:2] == [2, 2]
    assert pool.copy_on_write(1) == 2         # shared: the writer gets a private block
    assert pool.ref_count[:3] == [2, 1, 1]
    assert pool.copy_on_write(1) == 1         # now private: written in place
    pool.check()


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    pool = BlockPool(8, block_size=4)
    prompt = list(range(100, 110))            # 10 tokens: 2 full blocks + 2 tokens
    blocks = pool.allocate(3)
    cache_prompt(pool, prompt, blocks)
    assert [pool.is_cached(b) for b in blocks] == [True, True, False]
    pool.release(blocks)                      # the partial block (nothing cached) goes to the head,
    assert pool.free_order() == [2, 3, 4, 5, 6, 7, 1, 0]    # cached ones to the LRU tail, sequence tail first

    hit, hashes = pool.match_prefix(prompt[:8] + [7, 7])
    assert hit == [0, 1] and len(hashes) == 2
    assert pool.ref_count[:2] == [1, 1] and pool.free_order() == [2, 3, 4, 5, 6, 7]
    assert (pool.stats.prefix_hits, pool.stats.prefix_queries) == (2, 2)
    pool.release(hit)

    hit, _ = pool.match_prefix(prompt[:8])    # exactly 2 blocks: the last block must be recomputed
    assert hit == [0]
    pool.release(hit)
    hit, _ = pool.match_prefix([1] + prompt[1:])   # first block differs: the chain breaks at once
    assert hit == []
    pool.check()


def test_chained_hash_distinguishes_same_block_after_different_prefix():
    pool = BlockPool(8, block_size=2)
    a = pool.allocate(2)
    cache_prompt(pool, [1, 2, 3, 4], a)
    hit, _ = pool.match_prefix([9, 9, 3, 4, 5])
    assert hit == []
    hit, _ = pool.match_prefix([1, 2, 3, 4, 5])
    assert hit == a


def test_lru_eviction_order_of_cached_blocks():
    pool = BlockPool(4, block_size=2)
    old = pool.allocate(2)                    # [0, 1], cached, released first (oldest)
    cache_prompt(pool, [1, 2, 3, 4], old)
    pool.release(old)
    new = pool.allocate(2)                    # [2, 3]
    cache_prompt(pool, [5, 6, 7, 8], new)
    pool.release(new)
    assert pool.free_order() == [1, 0, 3, 2]
    got = pool.allocate(1)                    # least recently released: block 1 (tail of the old prompt)
    assert got == [1] and not pool.is_cached(1) and pool.stats.evictions == 1
    hit, _ = pool.match_prefix([1, 2, 3, 4, 9])
    assert hit == [0]                         # its first block is still cached
    hit2, _ = pool.match_prefix([5, 6, 7, 8, 9])
    assert hit2 == [2, 3]
    pool.check()


def test_double_release_is_an_error():
    pool = BlockPool(2)
    b = pool.allocate(1)
    pool.release(b)
    with pytest.raises(ValueError, match="block 0 released more often than it was referenced"):
        pool.release(b)


def test_random_workload_keeps_invariants_and_returns_every_block():
    rng = random.Random(0)
    pool = BlockPool(32, block_size=4)
    live: list[list[int]] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.4:
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 20))]
            hit, _ = pool.match_prefix(tokens)
            try:
                fresh = pool.allocate(pool.blocks_for(len(tokens)) - len(hit))
            except CacheFullError:
                pool.release(hit)
                continue
            blocks = hit + fresh
            cache_prompt(pool, tokens, blocks)
            live.append(blocks)
        elif op < 0.55 and live:
            seq = rng.choice(live)
            pool.share(seq)
            live.append(list(seq))
        elif op < 0.65 and live:
            seq = rng.choice(live)
            try:
                seq[-1] = pool.copy_on_write(seq[-1])
            except CacheFullError:
                pass
        elif live:
            pool.release(live.pop(rng.randrange(len(live))))
        pool.check()
    for seq in live:
        pool.release(seq)
    pool.check()
    assert pool.num_free == 32 and sum(pool.ref_count) == 0


def test_allocate_after_keeps_a_growing_sequence_consecutive():
    pool = BlockPool(8, block_size=4)
    assert pool.allocate(3) == [0, 1, 2]
    cache_prompt(pool, list(range(12)), [0, 1, 2])
    pool.release([0, 1, 2])                   # all cached: tail of the queue
    assert pool.free_order()[:2] == [3, 4]
    hit, _ = pool.match_prefix(list(range(12)))          # the last block is never matched: [0, 1]
    assert hit == [0, 1]
    assert pool.allocate(1, after=1) == [3]              # block 2 is free but cached: never evicted out of turn
    assert pool.is_cached(2) and pool.stats.evictions == 0
    assert pool.allocate(2, after=3) == [4, 5]           # free and uncached: the sequence stays consecutive
    assert pool.allocate(1, after=7) == [6]              # no room after block 7: from the head as usual
    assert pool.allocate(1, after=0) == [7]              # block 1 is taken: from the head as usual
    pool.check()


def test_allocate_run_finds_the_lowest_consecutive_free_run():
    pool = BlockPool(10, block_size=4)
    pool.allocate(10)
    pool.release([1])
    pool.release([3, 4, 5])
    pool.release([7, 8])
    assert pool.allocate_run(3) == [3, 4, 5]
    assert pool.allocate_run(3) is None
    assert pool.allocate_run(2) == [7, 8]
    cache_prompt(pool, [5, 6, 7, 8], [2])                # a cached free block breaks a run
    pool.release([2])
    assert pool.allocate_run(2) is None and pool.allocate_run(1) == [1]
    pool.check()


def test_drop_cached_forgets_free_prefixes_only():
    pool = BlockPool(6, block_size=2)
    a, b = pool.allocate(2), pool.allocate(2)
    cache_prompt(pool, [1, 2, 3, 4], a)
    cache_prompt(pool, [5, 6, 7, 8], b)
    pool.release(a)
    assert pool.drop_cached() == 2                       # a's blocks: free, forgotten, reused first
    assert sorted(pool.free_order()[:2]) == [0, 1] and not pool.is_cached(0)
    assert pool.is_cached(b[0]) and pool.match_prefix([5, 6, 7, 8, 9])[0] == b
    assert pool.match_prefix([1, 2, 3, 4, 5])[0] == []
    pool.check()


def test_reserved_runs_are_passed_over_by_others_and_soft_when_the_pool_is_short():
    pool = BlockPool(12, block_size=4)
    assert pool.reserve_run(4) == 0                       # blocks 0-3 kept for one sequence's growth
    assert pool.allocate(2) == [4, 5]                     # others pass over them
    assert pool.allocate(1, after=-1) == [0]              # the owner starts its run ...
    assert pool.allocate(2, after=0) == [1, 2]            # ... and grows into it
    assert pool.reserve_run(3) == 6 and pool.reserve_run(5) is None
    assert pool.allocate(3) == [9, 10, 11]
    assert sorted(pool.allocate(2)) == [3, 6]             # soft: nothing else is free, reserved blocks are taken
    pool.check()
    pool.unreserve(range(6, 9))
    assert pool.allocate(2) == [7, 8]
    pool.check()
