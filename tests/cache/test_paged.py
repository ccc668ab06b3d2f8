"""PagedCache inside an unmodified generate(): token-exact against Transformers' DynamicCache."""

from __future__ import annotations

import gc

import pytest
import torch

from hfaccel import models
from hfaccel.cache.block_pool import CacheFullError
from hfaccel.cache.paged import KVPool, PagedCache

from ..conftest import needs_default_model, prompts


def padded_batch(vocab: int):
    x = prompts(vocab, batch=3, length=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    return x, dict(attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)


def test_greedy_batch_with_padding_equals_dynamic_cache(tiny_arch):
    model = models.tiny(tiny_arch)
    pool = KVPool.for_model(model, max_tokens=1024, block_size=4)
    x, kw = padded_batch(model.config.vocab_size)
    cache = PagedCache(pool)
    assert torch.equal(model.generate(x, past_key_values=cache, **kw), model.generate(x, **kw))
    assert cache.live_tokens == 3 * (9 + 11) and cache.reserved_tokens == 3 * 20   # 20 = 5 blocks of 4
    cache.release()
    assert pool.blocks.num_free == pool.blocks.num_blocks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_and_num_return_sequences_share_and_copy_blocks(arch):
    model = models.tiny(arch)
    pool = KVPool.for_model(model, max_tokens=1024, block_size=4)
    x, kw = padded_batch(model.config.vocab_size)
    beams = dict(kw, num_beams=2, num_return_sequences=2)
    assert torch.equal(model.generate(x, past_key_values=PagedCache(pool), **beams), model.generate(x, **beams))
    sampled = dict(kw, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    ref = model.generate(x, **sampled)
    torch.manual_seed(0)
    assert torch.equal(model.generate(x, past_key_values=PagedCache(pool), **sampled), ref)
    gc.collect()                                   # dropped caches return their blocks
    assert pool.blocks.num_free == pool.blocks.num_blocks
    pool.blocks.check()


def test_assisted_decoding_crops_the_paged_cache():
    target = models.tiny("llama")
    draft = models.tiny("llama", seed=7, num_hidden_layers=1)
    pool = KVPool.for_model(target, max_tokens=512, block_size=4)
    x = prompts(target.config.vocab_size, batch=1, length=7)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20, min_new_tokens=20,
              pad_token_id=0)
    ref = target.generate(x, **kw)
    cache = PagedCache(pool)
    got = target.generate(x, past_key_values=cache, assistant_model=draft, **kw)
    assert torch.equal(got, ref)
    assert cache.reserved_tokens - cache.live_tokens < pool.block_size     # rejected drafts gave blocks back
    cache.release()
    assert pool.blocks.num_free == pool.blocks.num_blocks


def test_pool_exhaustion_raises_and_the_model_still_works():
    model = models.tiny("qwen2")
    pool = KVPool.for_model(model, max_tokens=32, block_size=4)      # 8 blocks
    x, kw = padded_batch(model.config.vocab_size)
    cache = PagedCache(pool)
    # the 9-token prompt needs 3 blocks per row, 9 in all: the whole allocation is refused, nothing is taken
    with pytest.raises(CacheFullError, match=r"KV cache pool is full: 9 blocks of 4 tokens needed, 8 free"):
        model.generate(x, past_key_values=cache, **kw)
    cache.release()
    assert pool.blocks.num_free == 8
    small = dict(kw, max_new_tokens=2, min_new_tokens=2)
    one = x[:1]
    small["attention_mask"] = torch.ones_like(one)
    cache = PagedCache(pool)
    assert torch.equal(model.generate(one, past_key_values=cache, **small), model.generate(one, **small))


def test_crop_validates_and_frees_whole_blocks():
    model = models.tiny("llama")
    pool = KVPool.for_model(model, max_tokens=64, block_size=4)
    cache = PagedCache(pool)
    k = torch.randn(2, model.config.num_key_value_heads, 10, 16)
    for i in range(model.config.num_hidden_layers):
        out_k, out_v = cache.update(k, k + 1, i)
        assert torch.equal(out_k, k) and torch.equal(out_v, k + 1)
    assert cache.get_seq_length() == 10 and pool.blocks.num_free == 16 - 6
    cache.crop(-5)
    assert cache.get_seq_length() == 5 and pool.blocks.num_free == 16 - 4
    with pytest.raises(ValueError, match="pass a negative number"):
        cache.crop(3)
    k2 = torch.randn(2, model.config.num_key_value_heads, 1, 16)
    out_k, _ = cache.update(k2, k2, 0)
    assert torch.equal(out_k, torch.cat([k[:, :, :5], k2], dim=2))


@needs_default_model
def test_default_model_paged_equals_dynamic(default_model):
    from hfaccel.bench.runner import make_prompts

    model, tok = default_model
    pool = KVPool.for_model(model, max_tokens=1024)
    x = make_prompts(tok, model.config.vocab_size, 2, 50, seed=3)
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=2)
    cache = PagedCache(pool)
    assert torch.equal(model.generate(x, past_key_values=cache, **kw), model.generate(x, **kw))
    cache.release()
    assert pool.blocks.num_free == pool.blocks.num_blocks
