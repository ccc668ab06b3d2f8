"""Block pool: pure bookkeeping for a paged KV cache. No tensors here.

The pool owns `num_blocks` block ids of `block_size` tokens each. It tracks
- a reference count per block (a block shared by several sequences has ref_count > 1);
- a free queue: allocation takes from its head. A released block that holds a cached prefix joins the
  tail, so cached blocks are evicted least recently released first (LRU); a released block with nothing
  cached goes to the head and is reused first (its memory is warm, and the pool's untouched pages stay
  untouched: on CPU the resident size grows only as far as the cache is actually used);
- a prefix index: hash of (parent block's hash, this block's tokens) -> block id, for FULL blocks only.
  A cached block whose ref_count is 0 stays in the free queue with its hash; a prefix hit takes it back
  out ("touch") without recomputing it. It is evicted only when allocation reaches it.

NOTE: a block in the prefix index is immutable: only a sequence's last, partial block is ever written.
Writing into a shared block goes through copy_on_write(), which hands the writer a private block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import HfaccelError

NO_PARENT = 0


class CacheFullError(HfaccelError, RuntimeError):
    """Not enough free blocks: names how many were needed and how many are free."""

    def __init__(self, needed: int, free: int, block_size: int):
        super().__init__(f"KV cache pool is full: {needed} blocks of {block_size} tokens needed, {free} free "
                         f"(raise kv_cache.max_cache_tokens or memory_fraction, or shorten the batch)")
        self.needed = needed
        self.free = free


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """Chained hash of one full block: equal only when the whole prefix up to this block is equal."""
    return hash((parent, tuple(tokens)))


@dataclass
class PoolStats:
    prefix_queries: int = 0      # blocks looked up
    prefix_hits: int = 0         # blocks found cached
    evictions: int = 0           # cached blocks reused for other data

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1:
            raise ValueError(f"num_blocks = {num_blocks} is not allowed; allowed: >= 1")
        if block_size < 1:
            raise ValueError(f"block_size = {block_size} is not allowed; allowed: >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of: dict[int, int] = {}        # block id -> its prefix hash (cached blocks only)
        self._block_of: dict[int, int] = {}       # prefix hash -> block id
        self._reserved: set[int] = set()          # free blocks kept for a sequence's growth (reserve_run)
        self.stats = PoolStats()

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def free_order(self) -> list[int]:
        """Free block ids, next to be allocated first (for tests and debugging)."""
        return list(self._free)

    # --- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n fresh blocks with ref_count 1, taken from the head of the free queue; all or nothing.

        after: a block id the new ones should follow. When blocks after+1 .. after+n are all free they are
        taken instead (a cached one among them is evicted), so a sequence that grows stays in consecutive
        blocks and its K/V can be read as one view of the pool, without a gather. Only blocks that hold
        no cached prefix qualify: cached ones are evicted in LRU order, never out of turn.
        """
        if n > len(self._free):
            raise CacheFullError(n, len(self._free), self.block_size)
        if after is not None:
            run = range(after + 1, after + 1 + n)
            if run.stop <= self.num_blocks and all(b in self._free and b not in self._hash_of for b in run):
                for block in run:
                    del self._free[block]
                    self._reserved.discard(block)
                    self.ref_count[block] = 1
                return list(run)
        out = []
        for block in self._free:                  # head of the queue first, passing over reserved blocks
            if len(out) == n:
                break
            if block not in self._reserved:
                out.append(block)
        if len(out) < n:                          # reservations are soft: take reserved blocks before failing
            out += [b for b in self._reserved if b not in out][: n - len(out)]
        for block in out:
            del self._free[block]
            self._reserved.discard(block)
            self._evict(block)
            self.ref_count[block] = 1
        return out

    def reserve_run(self, n: int) -> int | None:
        """Keep the lowest run of n free, uncached, unreserved blocks for one sequence's growth; returns its
        first id (None: no such run). Allocations that are not the run's own continuation (allocate(after=
        the block before it)) pass over reserved blocks while others are free, so a sequence that grows into
        its run stays in consecutive blocks and reads its K/V as one view. Soft: a full pool takes them."""
        start = self._lowest_run(n)
        if start is not None:
            self._reserved.update(range(start, start + n))
        return start

    def unreserve(self, blocks) -> None:
        self._reserved.difference_update(blocks)

    def allocate_run(self, n: int) -> list[int] | None:
        """n free blocks with consecutive ids holding no cached prefix (the lowest such run), or None."""
        start = self._lowest_run(n)
        return None if start is None else self.allocate(n, after=start - 1)

    def _lowest_run(self, n: int) -> int | None:
        if n < 1 or n > len(self._free):
            return None
        start, count = -2, 0
        for b in sorted(b for b in self._free if b not in self._hash_of and b not in self._reserved):
            start, count = (start, count + 1) if b == start + count else (b, 1)
            if count == n:
                return start
        return None

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each block (a forked sequence, a beam, a prefix hit)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self._free[b]       # a cached block in the free queue comes back to life
            self.ref_count[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a sequence's blocks in order: they are queued
        last-first, so the tail of a sequence (least likely to be shared) is evicted before its prefix."""
        for b in reversed(blocks):
            if self.ref_count[b] <= 0:
                raise ValueError(f"block {b} released more often than it was referenced")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None
                if b not in self._hash_of:        # nothing worth keeping: reuse it first, while its memory is warm
                    self._free.move_to_end(b, last=False)

    def copy_on_write(self, block: int) -> int:
        """The block id a writer may write into: `block` itself when private and uncached, else a fresh
        block (the caller copies the tensor data from `block` into it)."""
        if self.ref_count[block] == 1 and block not in self._hash_of:
            return block
        (new,) = self.allocate(1)
        self.release([block])
        return new

    # --- prefix index -------------------------------------------------------------------------
    def cache_block(self, block: int, block_hash_: int) -> None:
        """Register a FULL block under its chained hash. The first block registered for a hash wins."""
        if block in self._hash_of or block_hash_ in self._block_of:
            return
        self._hash_of[block] = block_hash_
        self._block_of[block_hash_] = block

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Longest run of cached full blocks at the start of `tokens`.

        Returns (block ids, their hashes); each matched block gains a reference. The last token of the
        prompt is never covered, so the model still computes logits for it.
        """
        blocks, hashes = [], []
        parent = NO_PARENT
        full = (len(tokens) - 1) // self.block_size
        for i in range(full):
            h = block_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            self.stats.prefix_queries += 1
            b = self._block_of.get(h)
            if b is None:
                break
            self.stats.prefix_hits += 1
            blocks.append(b)
            hashes.append(h)
            parent = h
        self.share(blocks)
        return blocks, hashes

    def drop_cached(self) -> int:
        """Forget every cached prefix that no sequence holds (those blocks become plain free blocks).
        Returns how many were dropped. Blocks in use keep their entries until released."""
        dropped = [b for b in self._hash_of if self.ref_count[b] == 0]
        for b in dropped:
            del self._block_of[self._hash_of.pop(b)]
            self._free.move_to_end(b, last=False)
        return len(dropped)

    def _evict(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            self.stats.evictions += 1

    def check(self) -> None:
        """Invariants (tests call this after every operation)."""
        for b in range(self.num_blocks):
            assert self.ref_count[b] >= 0, b
            assert (self.ref_count[b] == 0) == (b in self._free), b
        assert all(self._block_of[h] == b for b, h in self._hash_of.items())
        assert all(b in self._free for b in self._reserved), "reserved blocks are free"
        assert len(self._hash_of) == len(self._block_of)
