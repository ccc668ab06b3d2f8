"""Continuous batching over the paged KV pool: EngineCore (one step at a time), generate_batch (offline) and
Engine (a background thread serving submit() from any thread, with streaming and cancellation).

A step runs at most two forwards of the unchanged model:
- every decoding request, one token each, as one batch: a PagedCache view whose rows are the requests'
  own block tables, right-aligned (row r is left-padded by T - computed_r, padding maps to the pool's null
  block and is masked), positions per row. With hfaccel_paged attention each row attends over its own K/V
  only, read in place from the pool (attention.decode_rows: on the CPU in float32 one C++ call per layer
  for all rows, else one sdpa per row over a view): a request reserves consecutive blocks for its whole
  length when it is admitted (BlockPool.reserve_run), so its blocks stay consecutive while every request grows;
- one prefill chunk of one request (batch 1), its size set by the step's token budget.
The view is rebuilt every step from the requests' tables (cheap bookkeeping, no K/V copies), so requests
join and leave between any two steps. Blocks a step allocates land in the requests' own tables; a
finished, cancelled or preempted request returns its blocks at once, and full prompt blocks stay in the
pool's prefix index, so live and later requests that share a prefix share those blocks.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import attention as paged_attention
from ..cache.paged import KVPool, PagedCache
from ..compat import cache_arg
from .params import SamplingParams, sample
from .scheduler import Request, Scheduler, State

DEFAULT_POOL_TOKENS = 32768


@dataclass
class GenerationResult:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]                 # generated tokens only
    finish_reason: str                   # "eos" | "length" | "stop" | "cancelled" | "error: ..."
    text: str | None = None              # with a tokenizer
    ttft_s: float | None = None          # submit -> first token
    latency_s: float | None = None       # submit -> finish
    token_times: list[float] | None = None
    preemptions: int = 0
    reused_tokens: int = 0               # prompt tokens found in the prefix cache at (last) admission


class EngineCore:
    """The scheduler plus the model: add requests, call step() until has_work is False."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, token_budget: int = 512,
                 max_cache_tokens: int | None = None, block_size: int = 16, prefix_reuse: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        pool = model.__dict__.get("hfaccel_kv_pool")
        if pool is None:                         # a plain model: a pool of our own, gathered attention
            pool = KVPool.for_model(model, max_cache_tokens or DEFAULT_POOL_TOKENS, block_size)
            mode = "gather"
        else:
            mode = "paged" if paged_attention.is_paged(model.config._attn_implementation) else "gather"
        self.pool, self.mode = pool, mode
        self.device = pool.keys.device
        self.scheduler = Scheduler(pool.blocks, max_batch=max_batch, token_budget=token_budget,
                                   prefix_reuse=prefix_reuse)
        self.generators: dict[int, torch.Generator] = {}
        self.on_token: Callable[[Request, int], None] | None = None
        self.on_finish: Callable[[Request], None] | None = None
        self.steps = 0
        self.forward_tokens = 0

    # --- requests -------------------------------------------------------------------------------
    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer= or give token ids")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.device.type == "meta" or prompt.is_floating_point():
                raise ValueError(f"a tensor prompt must hold token ids (an integer tensor with data); got "
                                 f"{prompt.dtype} on {prompt.device}")
            if prompt.dim() != 1 and not (prompt.dim() == 2 and prompt.shape[0] == 1):
                raise ValueError(f"a tensor prompt must be 1-D token ids (or [1, T]); got shape {list(prompt.shape)}")
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"a prompt is a string, a list of token ids or a 1-D tensor; got {type(prompt).__name__}")
        vocab = self.model.config.get_text_config().vocab_size
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            raise ValueError(f"prompt of {len(ids)} tokens reaches the model's max_position_embeddings ({limit})")
        return ids

    def new_request(self, prompt: Any, params: SamplingParams) -> Request:
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer=")
        req = Request(self.encode(prompt), params, arrival=time.perf_counter())
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and len(req.prompt) + params.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(req.prompt)}) + max_new_tokens ({params.max_new_tokens}) exceed the "
                             f"model's max_position_embeddings ({limit})")
        return req

    def add(self, req: Request) -> None:
        self.scheduler.add(req)
        g = torch.Generator(device="cpu")
        g.manual_seed(req.params.seed if req.params.seed is not None else int(torch.randint(2**62, ())))
        self.generators[req.id] = g

    def cancel(self, req: Request) -> None:
        if req.state != State.FINISHED:
            self._finish(req, "cancelled")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        step = self.scheduler.schedule()
        self.steps += 1
        if step.decodes:
            logits = self._forward(step.decodes, 1)
            for r, row in zip(step.decodes, logits):
                r.computed += 1
                self._emit(r, row)
        if step.prefill is not None:
            r, n = step.prefill, step.prefill_tokens
            logits = self._forward([r], n)
            r.computed += n
            if r.pending == 0:                    # the chunk reached the end: its logits give a token
                self._emit(r, logits[0])

    def _forward(self, reqs: list[Request], n: int) -> torch.Tensor:
        """Feed tokens[computed:computed + n] of every request; [B, V] logits of each row's last token."""
        longest = max(r.computed for r in reqs)
        cache = PagedCache(self.pool, attention=self.mode)
        cache._compacted = True                   # rows keep their blocks where they are
        cache.row_views = True                    # decode: each row over its own blocks, no padded gather
        cache.tables.extend(r.table for r in reqs)   # the requests' own lists: new blocks land in them
        cache.offsets = [longest - r.computed for r in reqs]
        if n > 1:                                 # register full prompt blocks in the prefix index
            cache.prompts = [reqs[0].tokens]
            cache._hashes = [reqs[0].hashes]
        for layer in cache.layers:
            layer.length = longest
            layer.is_initialized = True
        ids = torch.tensor([r.tokens[r.computed:r.computed + n] for r in reqs], device=self.device)
        pos = torch.tensor([[r.computed + i for i in range(n)] for r in reqs], device=self.device)
        mask = torch.ones(len(reqs), longest + n, dtype=torch.long, device=self.device)
        for i, off in enumerate(cache.offsets):
            mask[i, :off] = 0
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             cache_position=torch.arange(longest, longest + n, device=self.device),
                             use_cache=True, logits_to_keep=1, **cache_arg(self.model, cache))
        finally:
            cache.tables.clear()                  # the blocks belong to the requests, not to this view
        self.forward_tokens += len(reqs) * n
        return out.logits[:, -1]

    def _emit(self, r: Request, logits: torch.Tensor) -> None:
        p = r.params
        if p.eos_token_id and len(r.output) < p.min_new_tokens:
            logits = logits.clone()
            logits[list(p.eos_token_id)] = float("-inf")
        token = sample(logits, p, self.generators[r.id])
        now = time.perf_counter()
        r.output.append(token)
        r.token_times.append(now)
        if r.first_token_at is None:
            r.first_token_at = now
        if self.on_token is not None:
            self.on_token(r, token)
        if token in p.eos_token_id and len(r.output) >= p.min_new_tokens:
            self._finish(r, "eos")
        elif len(r.output) >= p.max_new_tokens:
            self._finish(r, "length")
        elif p.stop_strings and self._stopped(r):
            self._finish(r, "stop")

    def _stopped(self, r: Request) -> bool:
        longest = max(len(s) for s in r.params.stop_strings)
        tail = self.tokenizer.decode(r.output[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in r.params.stop_strings)

    def _finish(self, r: Request, reason: str) -> None:
        self.scheduler.finish(r, reason)
        r.finished_at = time.perf_counter()
        self.generators.pop(r.id, None)
        if self.on_finish is not None:
            self.on_finish(r)

    def result(self, r: Request) -> GenerationResult:
        text = self.tokenizer.decode(r.output, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(
            r.id, list(r.prompt), list(r.output), r.finish_reason or "", text,
            (r.first_token_at - r.arrival) if r.first_token_at else None,
            (r.finished_at - r.arrival) if r.finished_at else None, list(r.token_times), r.preemptions, r.reused)


def generate_batch(model, prompts: Sequence[Any], generation_config=None, *, tokenizer=None, max_batch: int = 16,
                   token_budget: int = 512, max_cache_tokens: int | None = None, prefix_reuse: bool = True,
                   **sampling) -> list[GenerationResult]:
    """Generate for every prompt with continuous batching; results in the order of `prompts`.

    Sampling settings come from `generation_config` (default: the model's) overridden by keywords
    (max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id, stop_strings, ...). Every
    setting is checked and every prompt encoded before anything runs.
    """
    core = EngineCore(model, tokenizer, max_batch=max_batch, token_budget=token_budget,
                      max_cache_tokens=max_cache_tokens, prefix_reuse=prefix_reuse)
    params = SamplingParams.from_kwargs(generation_config or model.generation_config, **sampling)
    reqs = [core.new_request(p, params) for p in prompts]
    try:
        for r in reqs:
            core.add(r)
        while core.has_work:
            core.step()
    finally:                                     # an error or an interrupt: give every block back to the pool
        for r in list(core.scheduler.running) + list(core.scheduler.waiting):
            core.scheduler.finish(r, "error")
    return [core.result(r) for r in reqs]


# --- the online engine ---------------------------------------------------------------------------

_DONE = object()


class RequestHandle:
    """What Engine.submit returns: stream() the tokens as they come, result() when done, cancel()."""

    def __init__(self, engine: "Engine", req: Request):
        self._engine = engine
        self.request = req
        self._tokens: queue.Queue = queue.Queue()
        self._done = threading.Event()

    @property
    def id(self) -> int:
        return self.request.id

    def stream(self) -> Iterator[int]:
        """Token ids as they are generated (ends when the request finishes, however it finishes)."""
        while True:
            t = self._tokens.get()
            if t is _DONE:
                return
            yield t

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self._engine.core.result(self.request)

    def cancel(self) -> None:
        self._engine._cancel(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Engine:
    """A background thread that runs EngineCore.step() while there is work. submit() is thread-safe."""

    def __init__(self, model, tokenizer=None, *, generation_config=None, max_batch: int = 16,
                 token_budget: int = 512, max_cache_tokens: int | None = None, prefix_reuse: bool = True):
        self.core = EngineCore(model, tokenizer, max_batch=max_batch, token_budget=token_budget,
                               max_cache_tokens=max_cache_tokens, prefix_reuse=prefix_reuse)
        self.generation_config = generation_config or model.generation_config
        self.core.on_token = self._on_token
        self.core.on_finish = self._on_finish
        self._handles: dict[int, RequestHandle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[RequestHandle] = []
        self._cancels: list[RequestHandle] = []
        self._closing = False
        self._abort = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="hfaccel-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: Any, **sampling) -> RequestHandle:
        params = SamplingParams.from_kwargs(self.generation_config, **sampling)
        req = self.core.new_request(prompt, params)            # bad input raises here, in the caller's thread
        handle = RequestHandle(self, req)
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is shut down; create a new Engine")
            self._inbox.append(handle)
            self._wake.notify()
        return handle

    def shutdown(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; finish those in flight (or cancel them), then stop the thread."""
        with self._lock:
            self._closing = True
            self._abort = cancel_pending
            self._wake.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def free_blocks(self) -> int:
        return self.core.pool.blocks.num_free

    # --- the engine thread ------------------------------------------------------------------------
    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._cancels.append(handle)
            self._wake.notify()

    def _on_token(self, req: Request, token: int) -> None:
        self._handles[req.id]._tokens.put(token)

    def _on_finish(self, req: Request) -> None:
        h = self._handles.pop(req.id, None)
        if h is not None:
            h._tokens.put(_DONE)
            h._done.set()

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or core.has_work or self._closing):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                closing, abort = self._closing, self._abort
            for h in inbox:
                self._handles[h.id] = h
                try:
                    core.add(h.request)
                except ValueError as e:
                    h.request.state = State.FINISHED
                    h.request.finish_reason = f"error: {e}"
                    self._on_finish(h.request)
            for h in cancels:
                core.cancel(h.request)
            if closing and (abort or not core.has_work):
                for r in list(core.scheduler.running) + list(core.scheduler.waiting):
                    core.cancel(r)
                return
            if core.has_work:
                try:
                    core.step()
                except BaseException as e:           # fail every request in flight, keep serving
                    self.error = e
                    for r in list(core.scheduler.running) + list(core.scheduler.waiting):
                        core._finish(r, f"error: {type(e).__name__}: {e}")


__all__ = ["Engine", "EngineCore", "GenerationResult", "RequestHandle", "generate_batch"]
