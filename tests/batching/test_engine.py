"""generate_batch and Engine (hfaccel/batching/engine.py) on tiny models: greedy equals each prompt run alone
through plain Transformers generate() (chunked prefill, preemption and prefix sharing included), sampling
is per request and reproducible, stop strings, concurrent submit with cancellations, no block leaks."""

from __future__ import annotations

import random

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.batching import Engine, EngineCore, SamplingParams, generate_batch
from tests.conftest import run_threads


def workload(vocab: int, n: int = 10, longest: int = 60, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(1, longest, (n,), generator=g)]


def alone(ref, prompt: list[int], new: int, **kw) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)[0, len(prompt):]
    eos = kw.get("eos_token_id", ref.generation_config.eos_token_id)
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    toks = out.tolist()
    for i, t in enumerate(toks):                 # generate() pads after EOS: cut there, keep the EOS
        if t in eos:
            return toks[: i + 1]
    return toks


def no_leak(core_or_pool) -> None:
    blocks = getattr(core_or_pool, "pool", core_or_pool).blocks
    assert blocks.num_free == blocks.num_blocks and all(c == 0 for c in blocks.ref_count)
    blocks.check()


@pytest.mark.parametrize("arch,accel", [("llama", None), ("qwen2", "cpu-fast"), ("gpt2", None),
                                        ("mistral", {})])
def test_greedy_equals_each_prompt_alone(arch, accel):
    ref, model = models.tiny(arch), models.tiny(arch)
    if accel is not None:                                    # {}: the default (lossless) config
        hfaccel.accelerate_model(model, accel or None, kv_cache={"max_cache_tokens": 4096}, compile={"warmup": False})
    prompts = workload(ref.config.vocab_size, n=10)
    eos = int(ref.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)[0, -3])           # a token some rows emit: they finish early
    res = generate_batch(model, prompts, max_new_tokens=14, eos_token_id=eos, max_batch=4, token_budget=24,
                         max_cache_tokens=2048)
    for p, r in zip(prompts, res):
        want = alone(ref, p, 14, eos_token_id=eos)
        assert r.token_ids == want and r.finish_reason == ("eos" if want[-1] == eos else "length")
    assert any(r.finish_reason == "eos" for r in res)


def test_preemption_by_recompute_keeps_greedy_output_and_leaks_nothing():
    ref, model = models.tiny("llama"), models.tiny("llama")
    prompts = workload(ref.config.vocab_size, n=8, longest=40, seed=3)
    core = EngineCore(model, max_batch=8, token_budget=64, max_cache_tokens=128, block_size=8)   # 16 blocks
    params = SamplingParams(max_new_tokens=30)
    reqs = [core.new_request(p, params) for p in prompts]
    for r in reqs:
        core.add(r)
    while core.has_work:
        core.step()
    assert core.scheduler.preemptions > 0
    for p, r in zip(prompts, reqs):
        assert r.output == alone(ref, p, 30, eos_token_id=None)
    no_leak(core)


def test_prefix_shared_between_live_requests():
    ref, model = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 2048, "block_size": 8})
    shared = workload(ref.config.vocab_size, n=1, longest=2, seed=9)[0] + list(range(10, 50))
    prompts = [shared + [60 + i, 70 + i] for i in range(3)]
    core = EngineCore(model, max_batch=4, token_budget=64)
    reqs = [core.new_request(p, SamplingParams(max_new_tokens=20)) for p in prompts]
    for r in reqs:
        core.add(r)
    seen = 0
    while core.has_work:
        core.step()
        live = [r for r in reqs if r.table]
        if len(live) >= 2:
            seen = max(seen, len(set(live[0].table) & set(live[1].table)))
    assert reqs[0].reused == 0 and reqs[1].reused >= 32 and reqs[2].reused >= 32
    assert seen >= 4                                   # at least 4 blocks held by two live requests at once
    for p, r in zip(prompts, reqs):
        assert r.output == alone(ref, p, 20, eos_token_id=None)
    pool = model.hfaccel_kv_pool
    assert pool.blocks.num_free == pool.blocks.num_blocks and all(c == 0 for c in pool.blocks.ref_count)


def test_sampling_is_per_request_and_reproducible():
    model = models.tiny("llama")
    prompts = workload(model.config.vocab_size, n=5)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11, max_new_tokens=10, eos_token_id=None)
    together = generate_batch(model, prompts, max_batch=5, **kw)
    for p, r in zip(prompts, together):
        assert generate_batch(model, [p], **kw)[0].token_ids == r.token_ids   # same tokens in any batch
    assert len({tuple(r.token_ids) for r in together}) > 1
    greedy = generate_batch(model, prompts[:2], max_new_tokens=10, eos_token_id=None)
    top1 = generate_batch(model, prompts[:2], do_sample=True, top_k=1, seed=1, max_new_tokens=10, eos_token_id=None)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


class CharTokenizer:
    """ids -> letters, enough for stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_min_new_tokens():
    ref, model = models.tiny("llama"), models.tiny("llama")
    p = workload(ref.config.vocab_size, n=1, longest=20, seed=2)[0]
    free = alone(ref, p, 12, eos_token_id=None)
    text = CharTokenizer().decode(free)
    stop = text[4:6]
    res = generate_batch(model, [p], tokenizer=CharTokenizer(), max_new_tokens=12, eos_token_id=None,
                         stop_strings=stop)[0]
    assert res.finish_reason == "stop" and stop in CharTokenizer().decode(res.token_ids)
    assert res.token_ids == free[: len(res.token_ids)] and len(res.token_ids) <= 6
    eos = free[1]
    res = generate_batch(model, [p], max_new_tokens=12, eos_token_id=eos, min_new_tokens=5)[0]
    assert res.token_ids == alone(ref, p, 12, eos_token_id=eos, min_new_tokens=5)


def test_concurrent_submit_from_four_threads_with_cancellations():
    ref, model = models.tiny("llama"), models.tiny("llama")
    prompts = workload(ref.config.vocab_size, n=24, longest=30, seed=5)
    want = {i: alone(ref, p, 12, eos_token_id=None) for i, p in enumerate(prompts)}
    engine = Engine(model, max_batch=6, token_budget=32, max_cache_tokens=512)
    start = engine.free_blocks
    results, streams, errors = {}, {}, []

    def client(k: int) -> None:
        rnd = random.Random(k)
        try:
            handles = [(i, engine.submit(prompts[i], max_new_tokens=12, eos_token_id=None))
                       for i in range(k, len(prompts), 4)]
            for i, h in handles:
                if rnd.random() < 0.3:
                    h.cancel()
            for i, h in handles:
                streams[i] = list(h.stream())
                results[i] = h.result(timeout=120)
        except BaseException as e:      # noqa: BLE001 - surfaced below
            errors.append(e)

    run_threads(client, 4, 300)
    engine.shutdown()
    assert not errors and engine.error is None and len(results) == len(prompts)
    cancelled = [i for i, r in results.items() if r.finish_reason == "cancelled"]
    for i, r in results.items():
        assert streams[i] == r.token_ids                    # nothing lost or duplicated on the way
        if r.finish_reason == "cancelled":
            assert r.token_ids == want[i][: len(r.token_ids)]
        else:
            assert r.finish_reason == "length" and r.token_ids == want[i]
    assert len(cancelled) >= 1
    assert engine.free_blocks == start
    no_leak(engine.core)


def test_shutdown_is_graceful_or_cancels_and_refuses_new_work():
    model = models.tiny("llama")
    prompts = workload(model.config.vocab_size, n=4)
    engine = Engine(model, max_batch=2)
    hs = [engine.submit(p, max_new_tokens=8, eos_token_id=None) for p in prompts]
    engine.shutdown()
    assert all(h.done and h.result().finish_reason == "length" for h in hs)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompts[0])
    engine = Engine(model, max_batch=1)
    hs = [engine.submit(p, max_new_tokens=50, eos_token_id=None) for p in prompts]
    engine.shutdown(cancel_pending=True)
    assert all(h.done for h in hs) and hs[-1].result().finish_reason == "cancelled"
    no_leak(engine.core)


def test_bad_prompts_are_refused_before_anything_runs():
    model = models.tiny("llama")
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(model, [[5, 6], []])
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        generate_batch(model, [[5, 99999]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate_batch(model, ["hello"])
    with pytest.raises(ValueError, match="top_p = 0"):
        generate_batch(model, [[5]], top_p=0)
    engine = Engine(model)
    with pytest.raises(ValueError, match="max_new_tokens = 0"):
        engine.submit([1, 2], max_new_tokens=0)
    engine.shutdown()


def test_a_failing_step_gives_every_block_back(monkeypatch):
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 1024})
    pool = model.hfaccel_kv_pool
    calls = []

    def broken(self, reqs, n):
        calls.append(n)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return original(self, reqs, n)

    original = EngineCore._forward
    monkeypatch.setattr(EngineCore, "_forward", broken)
    with pytest.raises(RuntimeError, match="injected"):
        generate_batch(model, workload(model.config.vocab_size, n=4), max_new_tokens=8, max_batch=2)
    assert pool.blocks.num_free == pool.blocks.num_blocks and all(c == 0 for c in pool.blocks.ref_count)


@pytest.mark.parametrize("row_kernel", ["cpp", "sdpa"])
def test_requests_decode_from_consecutive_blocks_and_row_attention_matches_the_gather(row_kernel):
    """Each admitted request reserves room for its whole length, so its blocks stay consecutive while all
    requests grow together, and decode reads every row as one view of the pool (with hfaccel's C++ row
    decode, one call per layer, or one sdpa per row)."""
    from hfaccel.cache import attention
    from hfaccel.kernels import cpu_attention

    if row_kernel == "cpp" and not cpu_attention.status()[0]:
        pytest.skip(f"hfaccel's C++ row decode does not build here: {cpu_attention.status()[1]}")

    model = models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 2048, "block_size": 8})   # hfaccel_paged
    prompts = workload(model.config.vocab_size, n=8, longest=50, seed=5)
    core = EngineCore(model, max_batch=8, token_budget=40, prefix_reuse=False)
    assert core.mode == "paged"
    for p in prompts:
        core.add(core.new_request(p, SamplingParams(max_new_tokens=20)))
    rows = []
    original = attention.decode_rows

    def spy(cache, layer, query, scale):
        segs = cache.row_segments(cache.layers[layer].length)
        rows.extend(len(s) for s in segs)
        out = original(cache, layer, query, scale)
        k, v = cache.read(layer, cache.layers[layer].length)      # the padded gather, masked, as reference
        mask = torch.zeros(len(segs), 1, 1, k.shape[2], dtype=torch.bool)
        for r, off in enumerate(cache.offsets):
            mask[r, ..., off:] = True
        g = query.shape[1] // k.shape[1]
        ref = torch.nn.functional.scaled_dot_product_attention(
            query, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=scale)
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
        return out

    attention.decode_rows = spy
    attention.set_row_kernel(row_kernel)
    try:
        while core.has_work:
            core.step()
    finally:
        attention.decode_rows = original
        attention.set_row_kernel("auto")
    assert rows and all(n == 1 for n in rows)               # every decode row was one run of slots: no copy
    no_leak(core)
