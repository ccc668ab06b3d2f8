"""A transformers Cache over pooled, block-paged K/V storage.

KVPool holds one K and one V tensor per model, [layers, num_blocks * block_size, kv_heads, head_dim]
("slots"), plus the BlockPool that hands out block ids. A PagedCache is one generate() call's view of
that pool: a block table per batch row (shared by all layers, since every layer stores the same
positions) and one PagedLayer per decoder layer.

Rows never own tensors: forking a row (beam search, num_return_sequences) shares its blocks, and the
first write into a shared block copies it (copy-on-write, all layers at once). crop() shortens every
layer and returns whole unused blocks to the pool.

This first version gathers each row's blocks into a contiguous [B, H, T, D] tensor for the attention
call (what DynamicCache returns), so every attention backend and mask works unchanged.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_pool import BlockPool


class KVPool:
    """Per-model K/V storage, allocated once and reused across generate() calls."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.blocks = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, max_tokens: int, block_size: int = 16) -> "KVPool":
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, -(-max_tokens // block_size), block_size,
                   p.dtype, p.device)

    @property
    def bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for t in (self.keys, self.values):
            t[:, dst * bs:(dst + 1) * bs] = t[:, src * bs:(src + 1) * bs]


class PagedLayer(CacheLayerMixin):
    is_croppable = True
    is_sliding = False

    def __init__(self, cache: "PagedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0              # tokens this layer holds per row (rows are aligned; padding is masked)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, H, S, D]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, s, _ = key_states.shape
        start = self.length
        slots = self.cache.writable_slots(b, start, start + s)             # [B, S]
        pool = self.cache.pool
        flat = slots.reshape(-1)
        h, d = key_states.shape[1], key_states.shape[-1]
        pool.keys[self.layer_idx].index_copy_(0, flat, key_states.transpose(1, 2).reshape(b * s, h, d)
                                              .to(pool.keys.dtype))
        pool.values[self.layer_idx].index_copy_(0, flat, value_states.transpose(1, 2).reshape(b * s, h, d)
                                                .to(pool.values.dtype))
        self.length = start + s
        idx = self.cache.slots(self.length)                               # [B, T]
        keys = pool.keys[self.layer_idx][idx].transpose(1, 2)              # [B, H, T, D]
        values = pool.values[self.layer_idx][idx].transpose(1, 2)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.is_initialized = False

    # Batch-level operations act on the shared block tables: PagedCache does them once for all layers.
    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("crop a PagedCache through the cache, not a single layer")


class PagedCache(Cache):
    """One generate() call's K/V, stored in a KVPool. Release it (or drop it) to return its blocks."""

    def __init__(self, pool: KVPool, num_layers: int | None = None):
        n = num_layers if num_layers is not None else pool.keys.shape[0]
        super().__init__(layers=[PagedLayer(self, i) for i in range(n)])
        self.pool = pool
        self.tables: list[list[int]] = []
        self._slot_cache: tuple[int, torch.Tensor] | None = None
        self._prepared = 0        # positions [0, _prepared) have private, allocated blocks in every row
        self._finalizer = weakref.finalize(self, _release_tables, pool.blocks, self.tables)

    # --- block tables -------------------------------------------------------------------------
    def _ensure_rows(self, batch: int) -> None:
        if not self.tables:
            self.tables.extend([] for _ in range(batch))
        elif len(self.tables) != batch:
            raise ValueError(f"PagedCache holds {len(self.tables)} rows, the model passed {batch}")

    def writable_slots(self, batch: int, start: int, end: int) -> torch.Tensor:
        """[B, end - start] slot indices for positions start..end-1, allocating and un-sharing blocks.

        Every layer writes the same positions, so only the first layer to reach them does the table work.
        """
        self._ensure_rows(batch)
        if end <= self._prepared:
            return self.slots(end)[:, start:end]
        bs = self.pool.block_size
        need = -(-end // bs)
        missing = sum(max(0, need - len(t)) for t in self.tables)
        if missing:
            fresh = iter(self.pool.blocks.allocate(missing))       # all rows or none: CacheFullError
            for t in self.tables:
                t.extend(next(fresh) for _ in range(need - len(t)))
            self._slot_cache = None
        first = start // bs
        for t in self.tables:                                      # copy-on-write where rows share blocks
            for j in range(first, need):
                new = self.pool.blocks.copy_on_write(t[j])
                if new != t[j]:
                    self.pool.copy_block(t[j], new)
                    t[j] = new
                    self._slot_cache = None
        self._prepared = end
        return self.slots(end)[:, start:end]

    def slots(self, length: int) -> torch.Tensor:
        """[B, length] slot index of every position of every row."""
        if self._slot_cache is not None and self._slot_cache[0] >= length:
            return self._slot_cache[1][:, :length]
        bs = self.pool.block_size
        blocks = torch.tensor([t[: -(-length // bs)] for t in self.tables], device=self.pool.keys.device)
        offsets = torch.arange(bs, device=blocks.device)
        full = (blocks[:, :, None] * bs + offsets).reshape(len(self.tables), -1)
        self._slot_cache = (full.shape[1], full)
        return full[:, :length]

    def release(self) -> None:
        """Return every block to the pool now (also done when the cache is garbage-collected)."""
        _release_tables(self.pool.blocks, self.tables)
        self._slot_cache = None
        self._prepared = 0
        for layer in self.layers:
            layer.reset()

    def _retable(self, rows: list[int]) -> None:
        new = [list(self.tables[r]) for r in rows]
        for t in new:
            self.pool.blocks.share(t)
        _release_tables(self.pool.blocks, self.tables)
        self.tables.extend(new)
        self._slot_cache = None
        self._prepared = 0        # rows now share blocks: the next write must copy on write again

    # --- Cache API ----------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0:
            return
        for layer in self.layers:
            layer.length = max(0, layer.length + tokens_to_remove)
        keep = -(-max(layer.length for layer in self.layers) // self.pool.block_size)
        for t in self.tables:
            extra = t[keep:]
            del t[keep:]
            self.pool.blocks.release(extra)
        self._slot_cache = None
        self._prepared = min(self._prepared, keep * self.pool.block_size)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.tables:
            self._retable([int(i) for i in beam_idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.tables:
            self._retable([r for r in range(len(self.tables)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.tables:
            self._retable([int(i) for i in indices])

    @property
    def live_tokens(self) -> int:
        return len(self.tables) * max((layer.length for layer in self.layers), default=0)

    @property
    def reserved_tokens(self) -> int:
        return sum(len(t) for t in self.tables) * self.pool.block_size


def _release_tables(blocks, tables: list[list[int]]) -> None:
    for t in tables:
        blocks.release(t)
    tables.clear()
