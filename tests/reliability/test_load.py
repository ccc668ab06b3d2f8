"""Load: the Engine under 8 submitting threads with random cancellations (1,000 requests), and 2,000
sequential generate() calls with prefix reuse, on a tiny model. Nothing lost, duplicated or leaked."""

from __future__ import annotations

import random
import threading

import torch

import hfaccel
from hfaccel import models
from hfaccel.batching import Engine
from hfaccel.bench.metrics import current_rss
from tests.conftest import run_threads

from .conftest import TALLY


def test_engine_with_8_threads_1000_requests_and_cancellations():
    model, plain = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 1024, "block_size": 8})
    pool = model.hfaccel_kv_pool
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 500, (20,), generator=g).tolist()      # half the prompts share a 20-token prefix
    distinct = [(shared if i % 2 else []) + torch.randint(3, 500, (int(n),), generator=g).tolist()
                for i, n in enumerate(torch.randint(1, 24, (50,), generator=g))]
    want = [plain.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(p):].tolist() for p in distinct]
    engine = Engine(model, max_batch=16, token_budget=64)
    start = engine.free_blocks
    out, errors = [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        rnd = random.Random(k)
        try:
            handles = []
            for _ in range(125):
                i = rnd.randrange(len(distinct))
                h = engine.submit(distinct[i], max_new_tokens=6, eos_token_id=None)
                if rnd.random() < 0.1:
                    h.cancel()
                handles.append((i, h))
            for i, h in handles:
                streamed = list(h.stream())
                res = h.result(timeout=300)
                with lock:
                    out.append((i, streamed, res))
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    run_threads(client, 8, 600)
    engine.shutdown()
    TALLY["inputs"] += len(out)
    assert not errors and engine.error is None and len(out) == 1000
    assert len({res.request_id for _, _, res in out}) == 1000
    cancelled = 0
    for i, streamed, res in out:
        assert streamed == res.token_ids                           # nothing lost or duplicated
        if res.finish_reason == "cancelled":
            cancelled += 1
            assert res.token_ids == want[i][: len(res.token_ids)]
        else:
            assert res.finish_reason == "length" and res.token_ids == want[i]
    assert 0 < cancelled < 300
    leaked = start - engine.free_blocks + sum(pool.blocks.ref_count)
    TALLY["leaks"] += leaked
    assert leaked == 0
    pool.blocks.check()


def test_rss_is_stable_over_2000_generate_calls_with_prefix_reuse(capsys):
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 4096, "block_size": 8})
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 500, (40,), generator=g)
    calls = 0

    def run(n: int) -> None:
        nonlocal calls
        for _ in range(n):
            ids = torch.cat([prefix, torch.randint(3, 500, (int(torch.randint(1, 16, (1,), generator=g)),),
                                                   generator=g)])[None]
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
            calls += 1

    run(200)                                   # warm: allocator pools, the prefix in the cache
    warm = current_rss()
    run(1800)
    after = current_rss()
    TALLY["inputs"] += calls
    stats = model.hfaccel_stats
    growth = (after - warm) / 2**20
    with capsys.disabled():
        print(f"\nRSS after 200 warm calls {warm / 2**20:.1f} MiB, after {calls} calls {after / 2**20:.1f} MiB "
              f"(+{growth:.1f} MiB); prefix hit rate {stats.hit_rate:.2f}")
    assert calls == 2000 and stats.reused_tokens > 0
    pool = model.hfaccel_kv_pool
    TALLY["leaks"] += pool.blocks.num_blocks - pool.blocks.num_free
    assert pool.blocks.num_free == pool.blocks.num_blocks
    assert growth < 16, f"RSS grew {growth:.1f} MiB over 1800 warm calls"
