"""Iteration-level scheduling over a BlockPool: which requests run in the next step. No tensors here.

A request is a token list (prompt, then what it generated) and `computed`, how many of those tokens have
K/V in the pool. Its next work is always "feed tokens[computed:]": one token when it is decoding, a chunk
of its prompt while prefilling. The step whose fed tokens reach the end of the list yields logits for the
next token. A preempted request drops its blocks and starts again from computed = 0 with its prompt plus
what it had generated (recompute), so nothing it produced is lost or emitted twice.

Each step (schedule()):
1. every running request that is decoding gets one token; if the pool cannot hold the blocks they need,
   the most recently admitted requests are preempted (their blocks freed, back to the head of the queue)
   until it can;
2. the remaining token budget goes to prefill: first the running request that is mid-prefill, else the
   head of the waiting queue is admitted (FIFO: a request that does not fit blocks the ones behind it,
   so nothing overtakes it), with the longest cached prefix taken from the pool's prefix index.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from ..cache.block_pool import BlockPool
from .params import SamplingParams

_ids = itertools.count()


class State(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    state: State = State.WAITING
    computed: int = 0                            # tokens with K/V in the pool
    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    reserved: range = range(0)                   # blocks kept free for this request's growth (BlockPool.reserve_run)
    reused: int = 0                              # prompt tokens taken from the prefix cache (last admission)
    preemptions: int = 0
    finish_reason: str | None = None
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens to feed before the next logits."""
        return len(self.prompt) + len(self.output) - self.computed

    @property
    def decoding(self) -> bool:
        return self.pending == 1


@dataclass
class Step:
    decodes: list[Request]
    prefill: Request | None = None
    prefill_tokens: int = 0                      # how many of prefill.tokens[computed:] to feed
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and self.prefill is None


class Scheduler:
    def __init__(self, blocks: BlockPool, *, max_batch: int = 16, token_budget: int = 512,
                 prefix_reuse: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch} is not allowed; allowed: >= 1")
        if token_budget < max_batch + 1:
            raise ValueError(f"token_budget = {token_budget} is not allowed; allowed: > max_batch ({max_batch})")
        self.blocks = blocks
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.prefix_reuse = prefix_reuse
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []         # in admission order
        self.preemptions = 0

    # --- queue ----------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        need = self.blocks.blocks_for(len(req.prompt) + req.params.max_new_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"request {req.id}: prompt ({len(req.prompt)} tokens) + max_new_tokens "
                             f"({req.params.max_new_tokens}) need {need} blocks; the pool has "
                             f"{self.blocks.num_blocks} (raise max_cache_tokens)")
        req.state = State.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out (done, cancelled or failed) and free its blocks at once."""
        if req.state == State.RUNNING:
            self.running.remove(req)
        elif req.state == State.WAITING:
            self.waiting.remove(req)
        self._free(req)
        req.state = State.FINISHED
        req.finish_reason = reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -------------------------------------------------------------------------------
    def schedule(self) -> Step:
        step = Step(decodes=[])
        while True:                               # 1. decodes, preempting the newest until they fit
            decodes = [r for r in self.running if r.decoding]
            need = sum(self._new_blocks(r, 1) for r in decodes)
            if need <= self.blocks.num_free or not decodes:
                break
            victim = self.running[-1]
            self._preempt(victim)
            step.preempted.append(victim)
        step.decodes = decodes
        budget = self.token_budget - len(decodes)
        if budget <= 0:
            return step
        prefilling = [r for r in self.running if not r.decoding]
        if prefilling:                            # 2a. continue the running prefill
            req = prefilling[0]
        elif self.waiting and len(self.running) < self.max_batch:
            req = self._admit(self.waiting[0])    # 2b. admit the head of the queue, if it fits
            if req is None:
                return step
        else:
            return step
        n = min(req.pending, budget)
        while n > 0 and self._new_blocks(req, n) > self.blocks.num_free:
            n = (self.blocks.num_free + len(req.table)) * self.blocks.block_size - req.computed
        if n <= 0:
            return step
        step.prefill, step.prefill_tokens = req, n
        return step

    def _admit(self, req: Request) -> Request | None:
        table, hashes = (self.blocks.match_prefix(req.tokens) if self.prefix_reuse else ([], []))
        first = min(req.pending - len(table) * self.blocks.block_size, self.token_budget)
        need = self.blocks.blocks_for(len(table) * self.blocks.block_size + first) - len(table)
        # keep one block per decoding request in hand, so admitting does not force a preemption next step
        reserve = sum(1 for r in self.running if r.decoding)
        if need + reserve > self.blocks.num_free and self.running:
            self.blocks.release(table)
            return None
        self.waiting.popleft()
        req.table, req.hashes = table, hashes
        req.computed = req.reused = len(table) * self.blocks.block_size
        # keep room for everything it may still write in consecutive blocks, and start it there: decode then
        # reads its K/V as a view of the pool instead of a gather (reservations are soft, see BlockPool)
        own = self.blocks.blocks_for(len(req.prompt) + req.params.max_new_tokens) - len(table)
        start = self.blocks.reserve_run(own) if own > 0 else None
        if start is not None:
            req.reserved = range(start, start + own)
            req.table.extend(self.blocks.allocate(1, after=start - 1))
        req.state = State.RUNNING
        self.running.append(req)
        return req

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.state = State.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.blocks.unreserve(req.reserved)
        req.reserved = range(0)
        self.blocks.release(req.table)
        req.table = []
        req.hashes = []
        req.computed = 0

    def _new_blocks(self, req: Request, n: int) -> int:
        return max(0, self.blocks.blocks_for(req.computed + n) - len(req.table))


__all__ = ["Request", "Scheduler", "State", "Step"]
