"""Timing and memory probes. No transformers import beyond the streamer base class."""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer


class TokenTimer(BaseStreamer):
    """A generate() streamer that timestamps every put(): the prompt first, then each new token."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def timings(self, start: float) -> tuple[float, float | None]:
        """(TTFT, TPOT) in seconds from a generate() started at `start`."""
        # times[0] is the prompt being put, times[1] the first generated token.
        ttft = self.times[1] - start
        steps = len(self.times) - 2
        tpot = (self.times[-1] - self.times[1]) / steps if steps > 0 else None
        return ttft, tpot


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else float("nan"), "n": len(values)}


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while the block runs: max allocated on CUDA, sampled RSS on CPU.

    ru_maxrss is a whole-process high-water mark and cannot tell two phases apart, so on CPU a thread
    samples /proc/self/statm every `interval` seconds. `peak` is absolute, `delta` is above the level
    at entry (activations, KV cache, temporaries).
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)
