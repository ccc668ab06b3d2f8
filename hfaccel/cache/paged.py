"""A transformers Cache over pooled, block-paged K/V storage.

KVPool holds one K and one V tensor per model, [layers, kv_heads, slots, head_dim] with
slots = (num_blocks + 1) * block_size (head-major, so that a run of consecutive slots is a [H, T, D] view
whose inner dims are contiguous, the layout sdpa reads fastest), plus the BlockPool that hands out block ids. The extra last block
is the *null block*: it is never allocated, and every left-padding position of every row maps to it, so
padding costs no memory (a row of 16 real tokens in a batch padded to 512 holds one block, not 32).
Padding K/V written there is garbage that the attention mask hides.

A PagedCache is one generate() call's view of the pool: a block table per batch row (shared by all
layers, since every layer stores the same positions), the row's left-padding offset, and one PagedLayer
per decoder layer. Logical position t of row r lives in slot

    null block                                   if t < offset[r]       (padding)
    table[r][(t - offset[r]) // bs] * bs + (t - offset[r]) % bs      otherwise

so each row's first real token starts a block: prompts that share a prefix share whole blocks, whatever
padding their batches had. Rows never own tensors: forking a row (beam search, num_return_sequences)
shares its blocks, and the first write into a shared block copies it (copy-on-write, all layers at once).
crop() shortens every layer and returns whole unused blocks to the pool.

Prefix reuse: a cache built by `PagedCache.for_prompt` looks up the prompt's full blocks in the pool's
prefix index and starts with them in its tables (generate() then prefills only the rest), and it
registers every full prompt block it computes, once the last layer has written it.

Two ways to hand K/V to attention:
- "gather" (default, works with every attention implementation): update() returns the row's K/V gathered
  into a contiguous [B, H, T, D] tensor, as DynamicCache does.
- "paged" (with the hfaccel_paged attention function, hfaccel.cache.attention): update() only writes and
  returns the new tokens; the attention function reads the pool through the block table.

KV int8 (dtype="int8"): symmetric int8 per token and per KV head, with an fp16 scale per (token, head):
head_dim + 2 bytes per token-head instead of 4 * head_dim.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_pool import NO_PARENT, BlockPool, CacheFullError, block_hash

KV_DTYPES = ("model", "int8")
ATTENTION_MODES = ("gather", "paged")

# The paged attention function finds the cache of the layer that just wrote through this: update() leaves
# (the tensor it returned, cache, layer index) here and the attention call that receives that very tensor
# takes it. Any other call (another cache, no cache) falls back to plain sdpa.
_pending = threading.local()


def take_pending(key: torch.Tensor) -> tuple["PagedCache", int] | None:
    slot = getattr(_pending, "value", None)
    if slot is None or slot[0] is not key:
        return None
    _pending.value = None
    return slot[1], slot[2]


@dataclass
class CacheStats:
    """Counters of one model's KV pool, exposed as `model.hfaccel_stats` (live, cumulative)."""

    generate_calls: int = 0
    prompt_tokens: int = 0         # real (non-padding) prompt tokens seen by generate()
    reused_tokens: int = 0         # of those, taken from the prefix cache instead of being prefilled
    prefix_queries: int = 0        # full prompt blocks looked up
    prefix_hits: int = 0           # full prompt blocks found
    evictions: int = 0             # cached blocks reused for other data (LRU)
    fallbacks: int = 0             # generate() calls too big for the free pool, run on a DynamicCache
    pool_blocks: int = 0
    free_blocks: int = 0
    block_size: int = 0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class KVPool:
    """Per-model K/V storage, allocated once and reused across generate() calls."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", kv_dtype: str = "model"):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype = {kv_dtype!r} is not allowed; allowed: {', '.join(KV_DTYPES)}")
        self.blocks = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.num_layers = num_layers
        self.dtype = dtype                      # what update() takes and returns
        self.kv_dtype = kv_dtype
        self.null_block = num_blocks
        shape = (num_layers, kv_heads, (num_blocks + 1) * block_size, head_dim)
        store = torch.int8 if kv_dtype == "int8" else dtype
        # empty, not zeros: a slot is always written before it is read (on CPU the pages are only touched
        # as blocks get used). The null block is zeroed: padding reads it before any pad token wrote it.
        self.keys = torch.empty(shape, dtype=store, device=device)
        self.values = torch.empty(shape, dtype=store, device=device)
        self.key_scales = self.value_scales = None
        if kv_dtype == "int8":
            self.key_scales = torch.empty(shape[:3], dtype=torch.float16, device=device)
            self.value_scales = torch.empty(shape[:3], dtype=torch.float16, device=device)
        null = slice(num_blocks * block_size, None)
        for t in (self.keys, self.values, self.key_scales, self.value_scales):
            if t is not None:
                t[:, :, null] = 0
        self.stats = CacheStats(pool_blocks=num_blocks, block_size=block_size)

    @staticmethod
    def geometry(model) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of a transformers decoder."""
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        from ..tp import tp_size

        kv_heads //= tp_size(model)                     # tensor parallel: this rank's share of the KV heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    @classmethod
    def bytes_per_token(cls, model, dtype: torch.dtype, kv_dtype: str = "model") -> int:
        layers, kv_heads, head_dim = cls.geometry(model)
        per_head = head_dim + 2 if kv_dtype == "int8" else head_dim * torch.empty(0, dtype=dtype).element_size()
        return 2 * layers * kv_heads * per_head

    @classmethod
    def for_model(cls, model, max_tokens: int, block_size: int = 16, kv_dtype: str = "model",
                  dtype: torch.dtype | None = None) -> "KVPool":
        layers, kv_heads, head_dim = cls.geometry(model)
        p = next(model.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        return cls(layers, kv_heads, head_dim, -(-max_tokens // block_size), block_size, dtype, p.device, kv_dtype)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None)

    @property
    def bytes_per_slot(self) -> int:
        return self.bytes // self.keys.shape[2]

    def layer_views(self, layer: int):
        """(K, V, K scales, V scales) of one layer indexed [slot, head, ...], as the decode kernels take them."""
        ks = self.key_scales[layer].transpose(0, 1) if self.key_scales is not None else None
        vs = self.value_scales[layer].transpose(0, 1) if self.value_scales is not None else None
        return self.keys[layer].transpose(0, 1), self.values[layer].transpose(0, 1), ks, vs

    def snapshot(self) -> CacheStats:
        s = self.stats
        b = self.blocks.stats
        s.prefix_queries, s.prefix_hits, s.evictions = b.prefix_queries, b.prefix_hits, b.evictions
        s.free_blocks = self.blocks.num_free
        return s

    # --- tensor access ------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store [H, N, D] keys/values at N slot indices."""
        if self.kv_dtype == "int8":
            for src, store, scales in ((keys, self.keys, self.key_scales), (values, self.values, self.value_scales)):
                q, s = quantize_int8(src)
                store[layer].index_copy_(1, slots, q)
                scales[layer].index_copy_(1, slots, s)
        else:
            self.keys[layer].index_copy_(1, slots, keys.to(self.keys.dtype))
            self.values[layer].index_copy_(1, slots, values.to(self.values.dtype))

    def _dequant(self, k, v, ks, vs):
        if self.kv_dtype == "int8":
            k = k.to(self.dtype) * ks.to(self.dtype)[..., None]
            v = v.to(self.dtype) * vs.to(self.dtype)[..., None]
        return k, v

    def write_run(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store [H, S, D] keys/values at consecutive slots start .. start + S - 1."""
        end = start + keys.shape[1]
        if self.kv_dtype == "int8":
            for src, store, scales in ((keys, self.keys, self.key_scales), (values, self.values, self.value_scales)):
                q, sc = quantize_int8(src)
                store[layer, :, start:end] = q
                scales[layer, :, start:end] = sc
        else:
            self.keys[layer, :, start:end] = keys
            self.values[layer, :, start:end] = values

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` ([B, T] indices) as [B, H, T, D] in the pool's compute dtype."""
        b, t = slots.shape
        h, n, d = self.keys.shape[1:]
        # one index over the flattened [H * slots] rows, ordered [B, H, T]: the result is contiguous
        # [B, H, T, D], the layout sdpa's fast kernels need
        idx = (slots[:, None, :] + torch.arange(h, device=slots.device)[None, :, None] * n).reshape(-1)
        k = self.keys[layer].view(h * n, d).index_select(0, idx)
        v = self.values[layer].view(h * n, d).index_select(0, idx)
        ks = vs = None
        if self.kv_dtype == "int8":
            ks = self.key_scales[layer].reshape(-1).index_select(0, idx)
            vs = self.value_scales[layer].reshape(-1).index_select(0, idx)
        k, v = self._dequant(k, v, ks, vs)
        return k.view(b, h, t, d), v.view(b, h, t, d)

    def read_run(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one row stored in consecutive slots: [1, H, T, D] views, no copy (unless int8)."""
        k = self.keys[layer, :, start:start + length]
        v = self.values[layer, :, start:start + length]
        ks = vs = None
        if self.kv_dtype == "int8":
            ks = self.key_scales[layer, :, start:start + length]
            vs = self.value_scales[layer, :, start:start + length]
        k, v = self._dequant(k, v, ks, vs)
        return k[None], v[None]

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for t in (self.keys, self.values, self.key_scales, self.value_scales):
            if t is not None:
                t[:, :, dst * bs:(dst + 1) * bs] = t[:, :, src * bs:(src + 1) * bs]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x ~= q * scale[..., None]. The scale is stored in fp16 and the
    quantization uses the rounded fp16 scale, so dequantization is consistent with it."""
    amax = x.detach().abs().amax(dim=-1).float()
    scale = (amax / 127.0).clamp(min=2.0 ** -14).to(torch.float16)
    q = torch.round(x.float() / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class PagedLayer(CacheLayerMixin):
    is_croppable = True
    is_sliding = False

    def __init__(self, cache: "PagedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0              # logical positions per row (rows are aligned; padding is masked)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, H, S, D]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        b, h, s, d = key_states.shape
        start = self.length
        if cache._run is not None and start + s <= cache._prepared:
            # one row in consecutive, prepared blocks (the batch-1 decode path after the step's first
            # layer did the table work): plain slice copies, no index tensors
            cache.pool.write_run(self.layer_idx, cache._run + start, key_states[0], value_states[0])
        else:
            slots = cache.writable_slots(b, start, start + s).reshape(-1)          # [B * S]
            cache.pool.write(self.layer_idx, slots, key_states.transpose(0, 1).reshape(h, b * s, d),
                             value_states.transpose(0, 1).reshape(h, b * s, d))
        self.length = start + s
        if self.layer_idx == cache.last_layer:
            cache.register_prompt_blocks(self.length)
        if cache.attention == "paged":
            _pending.value = (key_states, cache, self.layer_idx)
            return key_states, value_states
        return cache.read(self.layer_idx, self.length)

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
    """One generate() call's K/V, stored in a KVPool. Release it (or drop it) to return its blocks.

    attention: "gather" (any attention implementation) or "paged" (only with hfaccel_paged attention).
    """

    def __init__(self, pool: KVPool, num_layers: int | None = None, *, attention: str = "gather"):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention = {attention!r} is not allowed; allowed: {', '.join(ATTENTION_MODES)}")
        n = num_layers if num_layers is not None else pool.num_layers
        super().__init__(layers=[PagedLayer(self, i) for i in range(n)])
        self.pool = pool
        self.attention = attention
        self.last_layer = n - 1
        self.tables: list[list[int]] = []
        self.offsets: list[int] = []             # left padding per row
        self.prompts: list[list[int]] | None = None   # real prompt tokens per row, to register full blocks
        self._hashes: list[list[int]] = []       # chained hashes of each row's registered prompt blocks
        self._slot_cache: tuple[int, torch.Tensor] | None = None
        self._run: int | None = None             # first slot, when a single row sits in consecutive slots
        self._table_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prepared = 0        # positions [0, _prepared) have private, allocated blocks in every row
        self._compacted = False
        self._segments = None
        self._segment_tensors = None             # row_segment_tensors: (the segments, their tensors)
        # decode attention row by row over each row's own K/V (views of the pool), ignoring the left padding:
        # for callers whose mask is exactly "no padding" (the batching engine), see attention.decode_rows
        self.row_views = False
        self._finalizer = weakref.finalize(self, _release_tables, pool.blocks, self.tables)

    @classmethod
    def for_prompt(cls, pool: KVPool, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   reuse: bool = True, attention: str = "gather") -> "PagedCache":
        """A cache for generate(input_ids, attention_mask=...): rows left-padded by the mask map their padding
        to the null block, and (reuse=True) a batch without padding starts from the longest run of full
        blocks that every row finds in the prefix index; generate() prefills only what follows."""
        cache = cls(pool, attention=attention)
        ids = input_ids.tolist()
        offsets = [0] * len(ids)
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)
            lead = (~mask).int().cumprod(dim=1).sum(dim=1)                 # leading zeros per row
            real = mask.sum(dim=1)
            if bool((lead + real == mask.shape[1]).all()):                 # left padding only
                offsets = lead.tolist()
            else:   # holes or right padding: positions stay 1:1 with slots, no prefix bookkeeping
                cache.offsets = offsets
                return cache
        cache.offsets = offsets
        cache.prompts = [row[p:] for row, p in zip(ids, offsets)]
        cache._hashes = [[] for _ in ids]
        stats = pool.stats
        stats.generate_calls += 1
        stats.prompt_tokens += sum(len(p) for p in cache.prompts)
        if reuse and not any(offsets):
            matches = [pool.blocks.match_prefix(p) for p in cache.prompts]
            k = min(len(m[0]) for m in matches)
            for blocks, hashes in matches:
                pool.blocks.release(blocks[k:])
                cache.tables.append(blocks[:k])
                cache._hashes[len(cache.tables) - 1] = hashes[:k]
            if k:
                for layer in cache.layers:
                    layer.length = k * pool.block_size
                    layer.is_initialized = True
                cache._prepared = k * pool.block_size
                stats.reused_tokens += k * pool.block_size * len(ids)
        return cache

    def expand_rows(self, n: int) -> None:
        """Repeat every row n times in place, as generate() expands its inputs for num_beams or
        num_return_sequences (repeat_interleave): the copies share the rows' blocks."""
        if n <= 1:
            return
        rows = [r for r in range(len(self.offsets)) for _ in range(n)]
        if self.tables:
            self._retable(rows)
            return
        self.offsets = [self.offsets[r] for r in rows]
        if self.prompts is not None:
            self.prompts = [self.prompts[r] for r in rows]
            self._hashes = [list(self._hashes[r]) for r in rows]

    # --- block tables -------------------------------------------------------------------------
    def _ensure_rows(self, batch: int) -> None:
        if not self.tables:
            if self.offsets and len(self.offsets) != batch:
                raise ValueError(f"PagedCache was built for {len(self.offsets)} rows, the model passed {batch}")
            self.tables.extend([] for _ in range(batch))
            if not self.offsets:
                self.offsets = [0] * batch
        elif len(self.tables) != batch:
            raise ValueError(f"PagedCache holds {len(self.tables)} rows, the model passed {batch}")

    def _blocks_needed(self, row: int, end: int) -> int:
        return -(-max(0, end - self.offsets[row]) // self.pool.block_size)

    def writable_slots(self, batch: int, start: int, end: int) -> torch.Tensor:
        """[B, end - start] slot indices for positions start..end-1, allocating and un-sharing blocks.

        Every layer writes the same positions, so only the first layer to reach them does the table work.
        """
        self._ensure_rows(batch)
        if end <= self._prepared:
            return self.slots(end)[:, start:end]
        bs = self.pool.block_size
        needs = [self._blocks_needed(r, end) for r in range(batch)]
        missing = sum(max(0, n - len(t)) for n, t in zip(needs, self.tables))
        if missing:
            blocks = self.pool.blocks
            if missing > blocks.num_free:                          # all rows or none
                raise CacheFullError(missing, blocks.num_free, bs)
            for n, t in zip(needs, self.tables):                   # each row continues its own run if it can
                if n > len(t):
                    t.extend(blocks.allocate(n - len(t), t[-1] if t else None))
            self._invalidate()
        for r, t in enumerate(self.tables):                        # copy-on-write where rows share blocks
            for j in range(max(0, start - self.offsets[r]) // bs, needs[r]):
                new = self.pool.blocks.copy_on_write(t[j])
                if new != t[j]:
                    self.pool.copy_block(t[j], new)
                    t[j] = new
                    self._invalidate()
        if batch == 1 and end - start == 1 and not self._compacted and needs[0] > 1:     # first decode step
            self._compact(start)
        self._prepared = end
        return self.slots(end)[:, start:end]

    def _compact(self, written: int) -> None:
        """Move a single row whose blocks are scattered (a prefix hit followed by fresh blocks) into
        consecutive blocks, once: one copy of what is written so far, after which every decode step reads
        its K/V as a view of the pool instead of gathering them. Skipped when no free run is long enough."""
        self._compacted = True
        table = self.tables[0]
        if table == list(range(table[0], table[0] + len(table))):
            return
        run = self.pool.blocks.allocate_run(len(table))
        if run is None:
            return
        bs = self.pool.block_size
        j = 0
        while j * bs < written:              # copy maximal runs of consecutive source blocks as slices
            k = j + 1
            while k < len(table) and table[k] == table[k - 1] + 1 and k * bs < written:
                k += 1
            n = min(k * bs, written) - j * bs
            src, dst = table[j] * bs, run[j] * bs
            for t in (self.pool.keys, self.pool.values, self.pool.key_scales, self.pool.value_scales):
                if t is not None:
                    t[:, :, dst:dst + n] = t[:, :, src:src + n]
            j = k
        self.pool.blocks.release(table)
        table[:] = run
        self._invalidate()

    def _invalidate(self) -> None:
        self._segments = None
        self._slot_cache = None
        self._run = None
        self._table_cache = None

    def block_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, W] int32 block ids, padded with the null block; [B] int32 left-padding offsets)."""
        if self._table_cache is None:
            device = self.pool.keys.device
            width = max(max(len(t) for t in self.tables), 1)
            table = [t + [self.pool.null_block] * (width - len(t)) for t in self.tables]
            self._table_cache = (torch.tensor(table, dtype=torch.int32, device=device),
                                 torch.tensor(self.offsets, dtype=torch.int32, device=device))
        return self._table_cache

    def slots(self, length: int) -> torch.Tensor:
        """[B, length] slot index of every logical position of every row."""
        if self._slot_cache is not None and self._slot_cache[0] >= length:
            return self._slot_cache[1][:, :length]
        bs = self.pool.block_size
        device = self.pool.keys.device
        width = max(max(len(t) for t in self.tables), 1)
        table = torch.tensor([t + [self.pool.null_block] * (width - len(t)) for t in self.tables], device=device)
        span = max(length, width * bs + max(self.offsets))
        pos = torch.arange(span, device=device)
        rel = pos[None, :] - torch.tensor(self.offsets, device=device)[:, None]          # [B, span]
        inside = rel.clamp(0, width * bs - 1)
        full = table.gather(1, inside // bs) * bs + inside % bs
        full = torch.where(rel < 0, self.pool.null_block * bs + pos % bs, full)
        valid = min(p + len(t) * bs for p, t in zip(self.offsets, self.tables))   # positions with real slots
        self._slot_cache = (max(valid, length), full)
        self._run = None
        if len(self.tables) == 1 and not self.offsets[0] and self.tables[0]:
            t = self.tables[0]
            if t == list(range(t[0], t[0] + len(t))):
                self._run = t[0] * bs
        return full[:, :length]

    def row_segments(self, length: int) -> list[list[tuple[int, int]]]:
        """Per row, the (first slot, count) runs of consecutive slots holding its positions offset..length-1,
        without the left padding: one run when the row's blocks are consecutive."""
        key = (length, tuple(map(len, self.tables)))
        if getattr(self, "_segments", None) is not None and self._segments[0] == key:
            return self._segments[1]
        bs = self.pool.block_size
        out = []
        for table, off in zip(self.tables, self.offsets):
            left, segs = length - off, []
            for j in range(-(-left // bs)):
                n = min(bs, left - j * bs)
                if segs and segs[-1][0] + segs[-1][1] == table[j] * bs and segs[-1][1] % bs == 0:
                    segs[-1] = (segs[-1][0], segs[-1][1] + n)
                else:
                    segs.append((table[j] * bs, n))
            out.append(segs)
        self._segments = (key, out)
        return out

    def row_segment_tensors(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """row_segments(length) as (seg_start, seg_len, row_ptr) int64 tensors, built once per step (every
        layer reads the same runs)."""
        segs = self.row_segments(length)
        if self._segment_tensors is not None and self._segment_tensors[0] is segs:
            return self._segment_tensors[1]
        from ..kernels.cpu_attention import segments_tensors

        tensors = segments_tensors(segs, self.pool.keys.device)
        self._segment_tensors = (segs, tensors)
        return tensors

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, length, D] K and V of every row: a view of the pool when one row sits in consecutive
        blocks (the common batch-1 case: blocks are handed out in order), else a gather."""
        if self._run is None or self._slot_cache is None or length > self._slot_cache[0]:
            slots = self.slots(length)                     # (re)builds the slot map and the run
            if self._run is None:
                return self.pool.read(layer, slots)
        return self.pool.read_run(layer, self._run, length)

    def register_prompt_blocks(self, length: int) -> None:
        """Add every prompt block that is full and written in all layers to the pool's prefix index."""
        if self.prompts is None:
            return
        bs = self.pool.block_size
        for r, (prompt, table, hashes) in enumerate(zip(self.prompts, self.tables, self._hashes)):
            full = min(len(prompt), length - self.offsets[r]) // bs
            parent = hashes[-1] if hashes else NO_PARENT
            for j in range(len(hashes), full):
                parent = block_hash(parent, prompt[j * bs:(j + 1) * bs])
                self.pool.blocks.cache_block(table[j], parent)
                hashes.append(parent)

    def release(self) -> None:
        """Return every block to the pool now (also done when the cache is garbage-collected)."""
        _release_tables(self.pool.blocks, self.tables)
        self._invalidate()
        self._prepared = 0
        self.prompts = None
        for layer in self.layers:
            layer.reset()

    def _retable(self, rows: Sequence[int]) -> None:
        new = [list(self.tables[r]) for r in rows]
        for t in new:
            self.pool.blocks.share(t)
        _release_tables(self.pool.blocks, self.tables)
        self.tables.extend(new)
        self.offsets = [self.offsets[r] for r in rows]
        if self.prompts is not None:
            self.prompts = [self.prompts[r] for r in rows]
            self._hashes = [list(self._hashes[r]) for r in rows]
        self._invalidate()
        self._prepared = 0        # rows now share blocks: the next write must copy on write again

    # --- Cache API ----------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0:
            return
        for layer in self.layers:
            layer.length = max(0, layer.length + tokens_to_remove)
        length = max(layer.length for layer in self.layers)
        for r, t in enumerate(self.tables):
            keep = self._blocks_needed(r, length)
            extra = t[keep:]
            del t[keep:]
            self.pool.blocks.release(extra)
        self._invalidate()
        self._prepared = min(self._prepared, length)

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
        """Real (non-padding) tokens held, over all rows."""
        length = max((layer.length for layer in self.layers), default=0)
        return sum(max(0, length - p) for p in self.offsets[:len(self.tables)])

    @property
    def reserved_tokens(self) -> int:
        """Token slots of the blocks held, over all rows (a block shared by rows counts once per row)."""
        return sum(len(t) for t in self.tables) * self.pool.block_size


def _release_tables(blocks, tables: list[list[int]]) -> None:
    for t in tables:
        blocks.release(t)
    tables.clear()
