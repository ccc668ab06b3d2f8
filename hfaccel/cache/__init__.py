"""KV cache: block bookkeeping (block_pool) and a transformers Cache over pooled, paged storage (paged)."""

from .block_pool import BlockPool, CacheFullError, block_hash
from .paged import KVPool, PagedCache

__all__ = ["BlockPool", "CacheFullError", "KVPool", "PagedCache", "block_hash"]
