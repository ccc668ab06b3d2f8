"""KV cache: block bookkeeping (block_pool) now; the paged transformers Cache over it lands next."""

from .block_pool import BlockPool, CacheFullError, block_hash

__all__ = ["BlockPool", "CacheFullError", "block_hash"]
