"""AccelEvalCallback: at evaluation time, how fast and how faithful the model would be, accelerated.

At each evaluation (every `every`-th one) the callback
1. copies the current weights (copy.deepcopy of the model the Trainer evaluates) and accelerates the copy
   with `preset`; the training model, its optimizer state and the RNG streams are left exactly as they
   were (the RNG states are saved and restored, the training model only runs greedy generation under
   inference_mode, in eval mode, and its train/eval mode is restored);
2. runs greedy generation on the prompt set with both, timing each token with a streamer;
3. measures perplexity of both on held-out text;
4. logs through the Trainer's own `log()` (so TensorBoard, W&B, CSV and `state.log_history` get it):

    hfaccel/ttft_ms, hfaccel/tpot_ms, hfaccel/tok_s        accelerated copy, medians over the prompts
    hfaccel/base_tok_s, hfaccel/speedup                     the unaccelerated model, and the tok/s ratio
    hfaccel/peak_memory_mb                                  peak during the accelerated generations
    hfaccel/ppl, hfaccel/base_ppl, hfaccel/ppl_delta_pct    perplexity, accelerated vs not
    hfaccel/greedy_exact_match                              share of prompts with identical greedy output

Attach it with `AccelEvalCallback(...).attach(trainer)` (or pass `trainer=` to the constructor): Trainer
callbacks are not handed the Trainer, and its `log()` is what reaches the reporting integrations.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from ..bench.metrics import PeakMemory, TokenTimer
from ..config import resolve_config

DEFAULT_PROMPTS = (
    "The Python interpreter reads a program",
    "A list comprehension consists of",
    "Exceptions are raised when",
    "The with statement is used to",
)


class AccelEvalCallback(TrainerCallback):
    def __init__(self, prompts: Sequence[str] | torch.Tensor | None = None, *, tokenizer=None,
                 preset: Any = "cpu-fast", every: int = 1, max_new_tokens: int = 32, ppl_window: int = 128,
                 ppl_windows: int = 2, prefix: str = "hfaccel/", trainer=None):
        if every < 1:
            raise ValueError(f"every = {every} is not allowed; allowed: >= 1 (evaluate every N-th evaluation)")
        if max_new_tokens < 2:
            raise ValueError(f"max_new_tokens = {max_new_tokens} is not allowed; allowed: >= 2 (TPOT needs two)")
        self.config = resolve_config(preset)             # a bad preset fails here, not mid-training
        self.prompts = prompts if prompts is not None else DEFAULT_PROMPTS
        self.tokenizer = tokenizer
        self.every = every
        self.max_new_tokens = max_new_tokens
        self.ppl_window = ppl_window
        self.ppl_windows = ppl_windows
        self.prefix = prefix
        self.trainer = None
        self.evaluations = 0
        self.history: list[dict[str, float]] = []
        self._warned = False
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer) -> "AccelEvalCallback":
        """Add this callback to `trainer` and log through its log()."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # --- TrainerCallback ------------------------------------------------------------------------
    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluations += 1
        if model is None or (self.evaluations - 1) % self.every:
            return
        tokenizer = self.tokenizer or kwargs.get("processing_class")
        metrics = self.measure(model, tokenizer)
        self.history.append(metrics)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            if not self._warned:
                self._warned = True
                warnings.warn("AccelEvalCallback is not attached to a Trainer (use .attach(trainer)): its metrics "
                              "go to state.log_history only, not to the reporting integrations", stacklevel=2)
            state.log_history.append({**metrics, "step": state.global_step})

    # --- measurement ----------------------------------------------------------------------------
    def _prompt_ids(self, tokenizer, vocab: int, device) -> list[torch.Tensor]:
        if isinstance(self.prompts, torch.Tensor):
            return [row[None].to(device) for row in self.prompts]
        if tokenizer is None:
            from ..data import encode

            return [torch.tensor([encode(None, p, vocab)], device=device) for p in self.prompts]
        return [tokenizer(p, return_tensors="pt").input_ids.to(device) for p in self.prompts]

    def _generate(self, model, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, float, float]:
        timer = TokenTimer(ids.device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad_id,
                             max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens, streamer=timer)
        ttft, tpot = timer.timings(start)
        return out[0, ids.shape[1]:], ttft, tpot

    def measure(self, model, tokenizer=None) -> dict[str, float]:
        """The metrics dict for `model` as it is now (also usable outside a Trainer)."""
        from ..api import accelerate_model
        from ..quality import perplexity

        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        was_training = model.training
        device = next(model.parameters()).device
        try:
            model.eval()
            accel = copy.deepcopy(model)
            accelerate_model(accel, self.config)
            pad_id = model.generation_config.pad_token_id
            if pad_id is None:
                pad_id = getattr(tokenizer, "pad_token_id", None) or 0
            prompts = self._prompt_ids(tokenizer, model.config.vocab_size, device)
            with torch.inference_mode():
                base_out, base_tpot = [], []
                for ids in prompts:
                    out, _, tpot = self._generate(model, ids, pad_id)
                    base_out.append(out)
                    base_tpot.append(tpot)
                accel_out, ttft, tpots = [], [], []
                with PeakMemory(device) as mem:
                    for ids in prompts:
                        out, t, tpot = self._generate(accel, ids, pad_id)
                        accel_out.append(out)
                        ttft.append(t)
                        tpots.append(tpot)
                base_ppl = perplexity(model, tokenizer, window=self.ppl_window, max_windows=self.ppl_windows)
                ppl = perplexity(accel, tokenizer, window=self.ppl_window, max_windows=self.ppl_windows)
            del accel
        finally:
            model.train(was_training)
            torch.set_rng_state(rng_cpu)
            if rng_cuda is not None:
                torch.cuda.set_rng_state_all(rng_cuda)
        tok_s = 1.0 / statistics.median(tpots)
        base_tok_s = 1.0 / statistics.median(base_tpot)
        p = self.prefix
        return {
            f"{p}ttft_ms": 1e3 * statistics.median(ttft),
            f"{p}tpot_ms": 1e3 * statistics.median(tpots),
            f"{p}tok_s": tok_s,
            f"{p}base_tok_s": base_tok_s,
            f"{p}speedup": tok_s / base_tok_s,
            f"{p}peak_memory_mb": mem.peak / 2**20,
            f"{p}ppl": ppl["perplexity"],
            f"{p}base_ppl": base_ppl["perplexity"],
            f"{p}ppl_delta_pct": 100 * (ppl["perplexity"] / base_ppl["perplexity"] - 1),
            f"{p}greedy_exact_match": sum(torch.equal(a, b) for a, b in zip(accel_out, base_out)) / len(prompts),
        }
