"""Scheduler (hfaccel/batching/scheduler.py) on a bare BlockPool: admission while blocks last, FIFO order,
token budget and chunked prefill, preemption by recompute, blocks freed at once, prefix sharing."""

from __future__ import annotations

import pytest

from hfaccel.batching.params import SamplingParams
from hfaccel.batching.scheduler import Request, Scheduler, State
from hfaccel.cache.block_pool import BlockPool

BS = 4


def req(n: int, new: int = 8, start: int = 0) -> Request:
    return Request(list(range(start, start + n)), SamplingParams(max_new_tokens=new))


def run(s: Scheduler, step, token: int = 7) -> None:
    """What the engine does with a step: advance computed, append a token where the logits were taken."""
    for r in step.decodes:
        r.computed += 1
        r.output.append(token)
    if step.prefill is not None:
        r = step.prefill
        r.computed += step.prefill_tokens
        if r.pending == 0:
            r.output.append(token)
    # blocks the forward would allocate
    for r in step.decodes + ([step.prefill] if step.prefill else []):
        missing = s.blocks.blocks_for(r.computed) - len(r.table)
        if missing > 0:
            r.table += s.blocks.allocate(missing)


def test_fifo_admission_and_token_budget_chunks_prefill():
    s = Scheduler(BlockPool(64, BS), max_batch=4, token_budget=10)
    a, b, c = req(25), req(3, start=100), req(3, start=200)
    for r in (a, b, c):
        s.add(r)
    step = s.schedule()
    assert step.prefill is a and step.prefill_tokens == 10 and not step.decodes     # chunk = the budget
    run(s, step)
    assert s.schedule().prefill is a                     # a's prefill continues before anyone is admitted
    for _ in range(2):
        run(s, s.schedule())
    assert a.pending == 1 and a.output == [7] and a.computed == 25
    step = s.schedule()                                  # a decodes, b is admitted with the rest of the budget
    assert step.decodes == [a] and step.prefill is b and step.prefill_tokens == 3
    run(s, step)
    step = s.schedule()
    assert step.decodes == [a, b] and step.prefill is c
    assert [r.state for r in (a, b, c)] == [State.RUNNING] * 3


def test_max_batch_limits_running_requests():
    s = Scheduler(BlockPool(64, BS), max_batch=2, token_budget=16)
    rs = [req(2, start=10 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    for _ in range(3):
        run(s, s.schedule())
    assert s.running == rs[:2] and list(s.waiting) == rs[2:]


def test_head_of_queue_that_does_not_fit_blocks_later_ones():
    s = Scheduler(BlockPool(8, BS), max_batch=8, token_budget=64)
    small = req(4, new=4)
    s.add(small)
    run(s, s.schedule())                       # small holds 1 block (+1 reserved for its decode)
    big, late = req(28, new=4, start=50), req(2, new=2, start=90)
    s.add(big)
    s.add(late)
    step = s.schedule()
    assert step.prefill is None and list(s.waiting) == [big, late]    # big needs 7 + 1 reserved > 7 free
    s.finish(small, "eos")
    assert s.blocks.num_free == 8
    step = s.schedule()
    assert step.prefill is big and late.state == State.WAITING


def test_preemption_frees_the_newest_and_it_resumes_first():
    s = Scheduler(BlockPool(4, BS), max_batch=4, token_budget=16)
    a, b = req(4, new=8), req(4, new=8, start=40)
    s.add(a)
    s.add(b)
    run(s, s.schedule())                                 # a prefilled: 1 block
    run(s, s.schedule())                                 # a decodes (2nd block), b prefilled (3rd block)
    assert a.computed == 5 and b.computed == 4 and s.blocks.num_free == 1
    c = req(2, new=1, start=80)
    s.add(c)
    for _ in range(3):
        run(s, s.schedule())                             # a and b decode; b needs a block at 8 tokens
    step = s.schedule()
    # both decoding need a new block (a at 8, b at 8) with 0 free: b, the newest, is preempted
    preempted = [r for r in (a, b) if r.preemptions]
    assert preempted == [b] and b.state == State.WAITING and s.waiting[0] is b and b.table == []
    assert b.output and b.computed == 0 and b.pending == len(b.prompt) + len(b.output)   # recompute all
    assert step.decodes == [a]
    s.blocks.check()


def test_finish_returns_blocks_at_once_and_no_leak():
    pool = BlockPool(16, BS)
    s = Scheduler(pool, max_batch=4, token_budget=16)
    rs = [req(5, new=3, start=10 * i) for i in range(3)]
    for r in rs:
        s.add(r)
    while s.has_work:
        step = s.schedule()
        run(s, step)
        for r in list(s.running):
            if len(r.output) >= r.params.max_new_tokens:
                held = len(r.table)
                free = pool.num_free
                s.finish(r, "length")
                assert pool.num_free == free + held
    assert pool.num_free == 16 and all(c == 0 for c in pool.ref_count)
    pool.check()


def test_prefix_shared_between_live_requests():
    pool = BlockPool(32, BS)
    s = Scheduler(pool, max_batch=4, token_budget=64)
    a = req(13, new=4)
    s.add(a)
    run(s, s.schedule())
    for j in range(3):                                   # the engine registers full prompt blocks
        pool.cache_block(a.table[j], hash(("a", j)))
    b = Request(list(range(13)), SamplingParams(max_new_tokens=4))
    pool.match_prefix = lambda tokens: (pool.share(a.table[:3]) or a.table[:3], [0, 1, 2])
    s.add(b)
    step = s.schedule()
    assert step.prefill is b and b.reused == 12 and step.prefill_tokens == 1
    assert all(pool.ref_count[blk] == 2 for blk in a.table[:3])


def test_bad_settings_and_oversized_requests_are_refused():
    with pytest.raises(ValueError, match="max_batch = 0"):
        Scheduler(BlockPool(4, BS), max_batch=0)
    with pytest.raises(ValueError, match="token_budget = 4"):
        Scheduler(BlockPool(4, BS), max_batch=4, token_budget=4)
    s = Scheduler(BlockPool(4, BS))
    with pytest.raises(ValueError, match="need 5 blocks; the pool has 4"):
        s.add(req(10, new=10))
    with pytest.raises(ValueError, match="temperature = 0"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="unknown sampling setting"):
        SamplingParams.from_kwargs(None, num_beams=4)
