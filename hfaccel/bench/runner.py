"""The benchmark: same prompts, same process, plain Transformers against the accelerated model.

Order of work, for every system:
1. correctness first: greedy tokens compared (lossless configs must match exactly; lossy ones get a
   perplexity difference on held-out text and a token agreement rate);
2. latency: `runs` batch-1 generations, systems interleaved run by run so drift hits both alike;
   each gives TTFT, TPOT and end-to-end time;
3. throughput at each batch size;
4. peak memory of each system in a fresh child process (memprobe.py), never overlapping a timed run.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__, models
from ..api import accelerate_model
from ..cache.feature import clear_prefix_cache
from ..config import resolve_config
from ..data import encode, held_out_text
from ..device import weight_bytes
from ..errors import MissingDependencyError
from ..quality import perplexity, token_agreement
from .memprobe import probe_in_subprocess
from .metrics import TokenTimer, summary

SCHEMA = "hfaccel.bench/1"
BASELINE = "transformers"
ACCEL = "hfaccel"
LLAMA_CPP = "llama.cpp"


@dataclass
class BenchSettings:
    model: str = "default"
    preset: str | None = None          # preset name or YAML path; None: per-device default preset
    batch: list[int] = field(default_factory=lambda: [1])
    prompt_tokens: int = 100
    new_tokens: int = 128
    runs: int = 5
    threads: int | None = None
    device: str = "auto"
    compare: list[str] = field(default_factory=list)
    ppl_windows: int = 4
    ppl_window: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("prompt_tokens", self.prompt_tokens, 1), ("new_tokens", self.new_tokens, 2),
                  ("runs", self.runs, 1), ("ppl_windows", self.ppl_windows, 1), ("ppl_window", self.ppl_window, 2)]
        for name, value, low in checks:
            if value < low:
                raise ValueError(f"--{name.replace('_', '-')} = {value} is too small; allowed: >= {low}")
        if not self.batch or any(b < 1 for b in self.batch):
            raise ValueError(f"--batch = {self.batch} is not allowed; allowed: sizes >= 1, e.g. 1,4")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads = {self.threads} is not allowed; allowed: >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device = {self.device!r} is not allowed; allowed: auto, cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device = 'cuda' but torch sees no CUDA device")
        for c in self.compare:
            if c != LLAMA_CPP:
                raise ValueError(f"--compare = {c!r} is not allowed; allowed: {LLAMA_CPP}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_preset(self) -> str:
        if self.preset:
            return self.preset
        return "gpu-throughput" if self.torch_device.type == "cuda" else "cpu-fast"


def make_prompts(tokenizer, vocab_size: int, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] prompt ids cut from the held-out docs text at seeded offsets (no padding needed)."""
    ids = encode(tokenizer, held_out_text(), vocab_size)
    if len(ids) < length + 1:
        raise ValueError(f"--prompt-tokens = {length} is longer than the prompt text ({len(ids)} tokens)")
    rng = random.Random(seed)
    rows = [ids[o: o + length] for o in (rng.randrange(0, len(ids) - length) for _ in range(n))]
    return torch.tensor(rows)


class _System:
    """One HF model under test: greedy generation with token timestamps."""

    def __init__(self, name: str, model, settings: BenchSettings, pad_id: int):
        self.name, self.model, self.s = name, model, settings
        self.device = settings.torch_device
        self.kw = dict(do_sample=False, max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                       pad_token_id=pad_id)

    def generate(self, prompts: torch.Tensor) -> tuple[torch.Tensor, float, float, float | None]:
        """(new tokens [B, T], end-to-end s, TTFT s, TPOT s)."""
        x = prompts.to(self.device)
        clear_prefix_cache(self.model)   # every run prefills from scratch, as plain Transformers does
        timer = TokenTimer(self.device)
        start = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), streamer=timer, **self.kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        e2e = time.perf_counter() - start
        ttft, tpot = timer.timings(start)
        return out[:, x.shape[1]:].cpu(), e2e, ttft, tpot


class _LlamaCpp:
    """llama.cpp through llama-cpp-python on the same GGUF file, same threads, same prompt tokens."""

    def __init__(self, gguf: Path, settings: BenchSettings):
        from .llamacpp import load

        threads = settings.threads or torch.get_num_threads()
        self.s = settings
        self.llm, self.note = load(gguf, n_ctx=settings.prompt_tokens + settings.new_tokens + 16, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, verbose=False, seed=0)
        self.gguf = gguf

    def generate(self, prompt: list[int]) -> tuple[list[int], float, float, float | None]:
        self.llm.reset()   # no prompt reuse between runs: every run prefills from scratch, as HF does
        times, out = [], []
        start = time.perf_counter()
        for tok in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            out.append(tok)
            if len(out) >= self.s.new_tokens:
                break
        e2e = time.perf_counter() - start
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return out, e2e, times[0] - start, tpot


def _versions() -> dict[str, str]:
    out = {"hfaccel": __version__, "torch": torch.__version__}
    for pkg in ("transformers", "llama-cpp-python"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _gain(base: float | None, new: float | None, higher_is_better: bool) -> float | None:
    if not base or not new:
        return None
    return new / base if higher_is_better else base / new


def ratios(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    """Improvement factors of `other` over `base`; > 1 means `other` is better."""
    out = {
        "ttft": _gain(base["ttft_ms"]["p50"], other["ttft_ms"]["p50"], False),
        "tpot": _gain(base["tpot_ms"]["p50"], other["tpot_ms"]["p50"], False),
        "decode_tok_s": _gain(base["decode_tok_s"], other["decode_tok_s"], True),
        "e2e_p50": _gain(base["e2e_ms"]["p50"], other["e2e_ms"]["p50"], False),
        "peak_memory": _gain(base.get("peak_memory_mb"), other.get("peak_memory_mb"), False),
        "weight_bytes": _gain(base.get("weight_bytes"), other.get("weight_bytes"), False),
    }
    for b, v in other.get("throughput_tok_s", {}).items():
        out[f"throughput_b{b}"] = _gain(base.get("throughput_tok_s", {}).get(b), v, True)
    return out


def run_bench(settings: BenchSettings, progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run the whole benchmark; returns the JSON-able result. `progress(label, steps_done)` is called."""
    tick = progress or (lambda label, n: None)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = settings.torch_device
    preset = settings.resolved_preset()
    cfg = resolve_config(preset)       # a bad preset fails here, before any model is loaded
    if LLAMA_CPP in settings.compare:
        _check_llama_cpp(settings)

    base_model, tok = models.load(settings.model)
    base_model.to(device)
    accel_model = copy.deepcopy(base_model)
    report = accelerate_model(accel_model, cfg)
    tick("loaded models", 1)
    pad_id = base_model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    systems = [_System(BASELINE, base_model, settings, pad_id), _System(ACCEL, accel_model, settings, pad_id)]
    max_b = max(settings.batch)
    prompts = make_prompts(tok, base_model.config.vocab_size, max(max_b, 4), settings.prompt_tokens, settings.seed)

    # 1. correctness (doubles as warm-up)
    check = prompts[: min(4, len(prompts))]
    outs = [s.generate(check)[0] for s in systems]
    exact = torch.equal(outs[0], outs[1])
    correctness: dict[str, Any] = {
        "lossless": report.lossless, "greedy_match": exact, "token_agreement": token_agreement(outs[0], outs[1]),
        "checked_sequences": int(check.shape[0]), "perplexity": None}
    if not report.lossless:
        ppl = [perplexity(s.model, tok, window=settings.ppl_window, max_windows=settings.ppl_windows)["perplexity"]
               for s in systems]
        correctness["perplexity"] = {BASELINE: ppl[0], ACCEL: ppl[1], "delta_pct": 100 * (ppl[1] / ppl[0] - 1)}
    tick("checked correctness", 1)

    # 2. latency at batch 1, interleaved
    lat: dict[str, dict[str, list[float]]] = {s.name: {"ttft": [], "tpot": [], "e2e": []} for s in systems}
    for r in range(settings.runs):
        for s in systems:
            _, e2e, ttft, tpot = s.generate(prompts[r % len(prompts)][None])
            lat[s.name]["ttft"].append(ttft * 1e3)
            lat[s.name]["e2e"].append(e2e * 1e3)
            if tpot is not None:
                lat[s.name]["tpot"].append(tpot * 1e3)
        tick(f"latency run {r + 1}/{settings.runs}", 1)

    # 3. throughput per batch size
    thr: dict[str, dict[str, float]] = {s.name: {} for s in systems}
    for b in settings.batch:
        for s in systems:
            new, e2e, _, _ = s.generate(prompts[:b])
            thr[s.name][str(b)] = new.numel() / e2e
        tick(f"throughput batch {b}", 1)

    # 4. peak memory at the largest batch, each system in a fresh process (see memprobe.py)
    mem = {s.name: probe_in_subprocess(settings.model, preset if s.name == ACCEL else None, max_b,
                                       settings.prompt_tokens, settings.new_tokens, device.type, settings.threads,
                                       settings.seed) for s in systems}
    tick("peak memory", 1)

    results: dict[str, dict[str, Any]] = {}
    for s in systems:
        tpot = summary(lat[s.name]["tpot"])
        results[s.name] = {
            "ttft_ms": summary(lat[s.name]["ttft"]), "tpot_ms": tpot, "e2e_ms": summary(lat[s.name]["e2e"]),
            "decode_tok_s": 1e3 / tpot["p50"] if tpot["n"] else None, "throughput_tok_s": thr[s.name],
            **mem[s.name],
            "weight_bytes": weight_bytes(s.model)}

    if LLAMA_CPP in settings.compare:
        results[LLAMA_CPP] = _bench_llama_cpp(settings, prompts, outs[0][0].tolist(), tick)

    return {
        "schema": SCHEMA, "versions": _versions(), "settings": {**asdict(settings), "preset": preset},
        "device": report.device, "model": {"name": settings.model, "model_type": report.architecture,
                                           "parameters": sum(p.numel() for p in base_model.parameters())},
        "report": report.to_dict(), "correctness": correctness, "systems": results,
        "ratios": {name: ratios(results[BASELINE], r) for name, r in results.items() if name != BASELINE},
    }


def _check_llama_cpp(settings: BenchSettings) -> None:
    if settings.model not in ("default", models.DEFAULT_MODEL_NAME):
        raise ValueError("--compare llama.cpp needs the GGUF file of the model; it is known only for the "
                         "default model (--model default)")
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingDependencyError("--compare llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                                     "(it compiles llama.cpp, ~20 minutes on 2 cores)")
    try:                            # before any system runs: installed with --no-deps, it lacked diskcache (seen)
        importlib.import_module("llama_cpp")
    except ImportError as e:
        raise MissingDependencyError(f"--compare llama.cpp: llama-cpp-python is installed but cannot be imported "
                                     f"({e}); install what it names") from e


def _bench_llama_cpp(settings: BenchSettings, prompts: torch.Tensor, hf_greedy: list[int], tick) -> dict[str, Any]:
    gguf = models.default_gguf_path()
    runner = _LlamaCpp(gguf, settings)
    first, *_ = runner.generate(prompts[0].tolist())            # warm-up and agreement check
    lat: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}
    for r in range(settings.runs):
        _, e2e, ttft, tpot = runner.generate(prompts[r % len(prompts)].tolist())
        lat["ttft"].append(ttft * 1e3)
        lat["e2e"].append(e2e * 1e3)
        if tpot is not None:
            lat["tpot"].append(tpot * 1e3)
    tick("llama.cpp", 1)
    tpot = summary(lat["tpot"])
    n = min(len(first), len(hf_greedy))
    agree = sum(a == b for a, b in zip(first[:n], hf_greedy[:n])) / max(n, 1)
    return {"ttft_ms": summary(lat["ttft"]), "tpot_ms": tpot, "e2e_ms": summary(lat["e2e"]),
            "decode_tok_s": 1e3 / tpot["p50"] if tpot["n"] else None,
            "throughput_tok_s": {"1": settings.new_tokens / (summary(lat["e2e"])["p50"] / 1e3)},
            "peak_memory_mb": None, "peak_memory_delta_mb": None, "weight_bytes": gguf.stat().st_size,
            "token_agreement_with_transformers": agree, "gguf": gguf.name, "note": runner.note}


def total_steps(settings: BenchSettings) -> int:
    return 4 + settings.runs + len(settings.batch) + (1 if LLAMA_CPP in settings.compare else 0)
