"""The kv_cache feature end to end: an unchanged generate() on the paged pool, token-exact with plain
Transformers, with prefix reuse, LRU eviction, KV int8 and revert."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.bench.runner import make_prompts
from hfaccel.cache import attention as paged_attention
from hfaccel.cache.feature import measured_kv_sqnr, new_cache
from hfaccel.cache.paged import KVPool

from ..conftest import greedy, needs_default_model, prompts

SMALL = {"max_cache_tokens": 4096, "block_size": 8}


def mixed_batch(vocab: int, lengths=(5, 23, 12, 17), seed: int = 3):
    """Batch 4, left-padded to the longest prompt."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    x = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, n in enumerate(lengths):
        x[r, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, width - n:] = 1
    return x, mask


def pair(arch: str = "llama", **config):
    plain = models.tiny(arch)
    model = models.tiny(arch)
    report = hfaccel.accelerate_model(model, kv_cache={**SMALL, **config.pop("kv_cache", {})}, **config)
    return plain, model, report


def test_paged_generate_equals_plain_batch1_and_mixed_batch4(tiny_arch):
    plain, model, report = pair(tiny_arch)
    assert report.lossless and any(c.target == "generate" for c in report.changes)
    x = prompts(plain.config.vocab_size, batch=1, length=11)
    assert torch.equal(greedy(model, x, n=20), greedy(plain, x, n=20))
    x, mask = mixed_batch(plain.config.vocab_size)
    assert torch.equal(greedy(model, x, mask, n=20), greedy(plain, x, mask, n=20))
    pool = model.hfaccel_kv_pool
    assert pool.blocks.num_free == pool.blocks.num_blocks        # every block given back after generate
    pool.blocks.check()


def test_padding_costs_no_blocks():
    _, model, _ = pair()
    x, mask = mixed_batch(model.config.vocab_size, lengths=(3, 40))
    out = model.generate(x, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values                       # returned: the caller owns it until dropped
    # live: 3+4 and 40+4 tokens (the last new token is not written); reserved: whole blocks of 8 per row
    assert cache.live_tokens == 7 + 44 and cache.reserved_tokens == 8 + 48
    assert cache.live_tokens / cache.reserved_tokens > 0.9
    cache.release()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beams_num_return_sequences_and_sampling_equal_plain(arch):
    plain, model, _ = pair(arch)
    x, mask = mixed_batch(plain.config.vocab_size, lengths=(9, 14))
    kw = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    for extra in (dict(num_beams=2, do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False)):
        assert torch.equal(model.generate(x, **kw, **extra), plain.generate(x, **kw, **extra)), extra
    torch.manual_seed(4)
    a = model.generate(x, do_sample=True, num_return_sequences=2, top_k=30, **kw)
    torch.manual_seed(4)
    assert torch.equal(a, plain.generate(x, do_sample=True, num_return_sequences=2, top_k=30, **kw))
    assert model.hfaccel_kv_pool.blocks.num_free == model.hfaccel_kv_pool.blocks.num_blocks


def test_assisted_decoding_crops_the_paged_cache():
    plain, model, _ = pair()
    draft = models.tiny("llama", seed=7, num_hidden_layers=1)
    x = prompts(plain.config.vocab_size, batch=1, length=13)
    assert torch.equal(greedy(model, x, n=24, assistant_model=draft), greedy(plain, x, n=24))


def test_prefix_reuse_prefills_only_the_suffix_and_is_identical_to_cold():
    plain, model, _ = pair()
    vocab = plain.config.vocab_size
    system = prompts(vocab, batch=1, length=45, seed=11)         # 5 full blocks of 8 and 5 tokens
    q1 = torch.cat([system, prompts(vocab, batch=1, length=6, seed=12)], dim=1)
    q2 = torch.cat([system, prompts(vocab, batch=1, length=9, seed=13)], dim=1)
    stats = model.hfaccel_stats
    assert torch.equal(greedy(model, q1, n=12), greedy(plain, q1, n=12))
    assert stats.reused_tokens == 0 and stats.prefix_hits == 0
    calls = []
    inner = model.model.forward

    def spy(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        calls.append(ids.shape[1])
        return inner(*a, **k)

    model.model.forward = spy
    try:
        assert torch.equal(greedy(model, q2, n=12), greedy(plain, q2, n=12))
    finally:
        del model.model.forward
    assert calls[0] == q2.shape[1] - 40                            # prefill ran on the suffix only
    assert stats.reused_tokens == 40 and stats.prefix_hits == 5 and stats.hit_rate == 5 / 7   # 1 miss on the cold call, 5 hits + 1 miss
    assert torch.equal(greedy(model, q2, n=12), greedy(plain, q2, n=12))   # warm again: still identical
    # a hit leaves the row's blocks scattered (cached prefix + fresh blocks): the first decode step moves
    # them into one consecutive run, so decoding reads a view of the pool instead of gathering
    out = model.generate(q2, attention_mask=torch.ones_like(q2), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    table = out.past_key_values.tables[0]
    assert table == list(range(table[0], table[0] + len(table))) and out.past_key_values._run is not None
    assert torch.equal(out.sequences, greedy(plain, q2, n=12))
    out.past_key_values.release()
    model.hfaccel_kv_pool.blocks.check()


def test_batch_prefix_reuse_and_padded_batches_register_blocks():
    plain, model, _ = pair()
    vocab = plain.config.vocab_size
    x, mask = mixed_batch(vocab, lengths=(20, 33))
    assert torch.equal(greedy(model, x, mask, n=6), greedy(plain, x, mask, n=6))
    # each row's own blocks were cached despite the padding: the same prompts unpadded hit them
    row = x[1:, mask[1].bool()]
    assert torch.equal(greedy(model, row, n=6), greedy(plain, row, n=6))
    assert model.hfaccel_stats.reused_tokens == 32
    both = torch.cat([x[:1, -20:], x[1:, -20:]])                  # batch without padding: common reuse
    assert torch.equal(greedy(model, both, n=6), greedy(plain, both, n=6))


def test_lru_eviction_when_the_pool_is_full():
    plain, model, _ = pair(kv_cache={"max_cache_tokens": 96, "block_size": 8})    # 12 blocks
    vocab = plain.config.vocab_size
    a = prompts(vocab, batch=1, length=33, seed=1)
    for seed in (1, 2, 3, 4):                                      # each caches 4 blocks, 12 in all
        p = prompts(vocab, batch=1, length=33, seed=seed)
        assert torch.equal(greedy(model, p, n=8), greedy(plain, p, n=8))
    stats = model.hfaccel_stats
    assert stats.evictions > 0 and stats.fallbacks == 0
    before = stats.prefix_hits
    assert torch.equal(greedy(model, a, n=8), greedy(plain, a, n=8))      # its blocks were evicted first
    assert stats.prefix_hits == before
    model.hfaccel_kv_pool.blocks.check()


def test_a_call_too_big_for_the_pool_falls_back_and_says_so():
    plain, model, _ = pair(kv_cache={"max_cache_tokens": 32, "block_size": 8})
    x = prompts(plain.config.vocab_size, batch=2, length=30)
    with pytest.warns(UserWarning, match=r"needs up to 10 KV blocks, the pool has 4 free; it runs with "
                                         r"Transformers' DynamicCache"):
        out = greedy(model, x, n=8)
    assert torch.equal(out, greedy(plain, x, n=8))
    assert model.hfaccel_stats.fallbacks == 1


def test_explicit_cache_choices_are_respected():
    from transformers import DynamicCache

    plain, model, _ = pair()
    x = prompts(plain.config.vocab_size, batch=1, length=9)
    calls = model.hfaccel_stats.generate_calls
    for kw in (dict(past_key_values=DynamicCache(config=model.config)), dict(cache_implementation="static"),
               dict(use_cache=False)):
        assert torch.equal(greedy(model, x, n=6, **kw), greedy(plain, x, n=6)), kw
    assert model.hfaccel_stats.generate_calls == calls


def test_revert_detaches_everything():
    model = models.tiny("qwen2")
    impl = model.config._attn_implementation
    sig = inspect.signature(model.generate)
    hfaccel.accelerate_model(model, kv_cache=SMALL)
    assert inspect.signature(model.generate) == sig and model.config._attn_implementation == "hfaccel_paged"
    assert hfaccel.revert_model(model) == []
    for name in ("generate", "hfaccel_kv_pool", "hfaccel_stats"):
        assert name not in model.__dict__
    assert model.config._attn_implementation == impl


def test_static_and_dynamic_types():
    plain = models.tiny("llama")
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, kv_cache={"type": "static"})
    assert model.generation_config.cache_implementation == "static" and report.lossless
    x = prompts(plain.config.vocab_size, batch=1, length=9)
    assert torch.equal(greedy(model, x, n=6), greedy(plain, x, n=6))
    hfaccel.revert_model(model)
    assert model.generation_config.cache_implementation is None
    report = hfaccel.accelerate_model(model, kv_cache={"type": "dynamic", "dtype": "int8"})
    assert [s.reason for s in report.skipped if s.feature == "kv_cache"] == ["KV dtype int8 needs kv_cache.type: paged"]


def test_gather_mode_for_other_attention_backends():
    plain, model, report = pair(attention={"backend": "eager"})
    assert model.config._attn_implementation == "eager"
    x, mask = mixed_batch(plain.config.vocab_size)
    assert torch.equal(greedy(model, x, mask, n=10), greedy(plain, x, mask, n=10))


def test_kv_int8_is_reported_lossy_and_smaller():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, kv_cache={**SMALL, "dtype": "int8"})
    assert not report.lossless
    assert any("KV int8 is lossy" in n and "SQNR" in n for n in report.notes)
    pool = model.hfaccel_kv_pool
    assert pool.keys.dtype == torch.int8 and pool.key_scales.dtype == torch.float16
    x = prompts(model.config.vocab_size, batch=2, length=12)
    assert greedy(model, x, n=8).shape == (2, 20)
    assert measured_kv_sqnr(model) > 35       # 8-bit per-token-per-head: ~40 dB on Gaussian-like K/V


@needs_default_model
def test_default_model_kv_int8_memory_and_perplexity(default_model):
    plain, tok = default_model
    fp32 = KVPool.bytes_per_token(plain, torch.float32)
    int8 = KVPool.bytes_per_token(plain, torch.float32, "int8")
    assert fp32 / int8 >= 3.5                       # 256 vs 66 bytes per token and head: 3.88x
    model = copy.deepcopy(plain)
    hfaccel.accelerate_model(model, kv_cache={"dtype": "int8", "max_cache_tokens": 8192})
    assert model.hfaccel_kv_pool.bytes_per_slot == int8
    from hfaccel.quality import perplexity

    base = perplexity(plain, tok, window=256, max_windows=2, chunk=32)["perplexity"]
    quant = perplexity(model, tok, window=256, max_windows=2, chunk=32)["perplexity"]
    assert math.isfinite(quant) and quant / base < 1.03
    x = make_prompts(tok, plain.config.vocab_size, 1, 40, seed=5)
    agree = (greedy(model, x, n=24) == greedy(plain, x, n=24)).float().mean().item()
    assert agree > 0.8


@needs_default_model
def test_default_model_prefix_reuse_identical_to_cold(default_model):
    plain, tok = default_model
    model = copy.deepcopy(plain)
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 8192})
    system = "You are a careful assistant. " * 12
    outs = []
    for q in ("What is a list?", "What is a dict?"):
        enc = tok(system + q, return_tensors="pt")
        outs.append((greedy(model, enc.input_ids, enc.attention_mask, n=16),
                     greedy(plain, enc.input_ids, enc.attention_mask, n=16)))
    assert all(torch.equal(a, b) for a, b in outs)
    assert model.hfaccel_stats.reused_tokens >= 64


def test_new_cache_follows_the_model():
    from transformers import DynamicCache

    plain, model, _ = pair()
    assert isinstance(new_cache(plain), DynamicCache)
    cache = new_cache(model)
    assert cache.pool is model.hfaccel_kv_pool and cache.attention == "paged"
    assert model.config._attn_implementation == paged_attention.NAME
