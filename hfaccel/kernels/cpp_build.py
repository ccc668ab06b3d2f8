"""Build (or load the cached build of) one of hfaccel's C++ CPU kernels with torch.utils.cpp_extension.

The .so lands in the hfaccel cache, one folder per source, torch version and build; cpp_extension rebuilds
when the source or the flags change. Loading registers the source's TORCH_LIBRARY ops in this process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch


def portable_flags(avx512: bool = False) -> list[str]:
    """-O3 -fopenmp (at::parallel_for is OpenMP in a header) plus the vector ISA this CPU has: AVX2 + FMA, and
    AVX-512F if asked for and present. Not -march=native, so that a cache shared by two CPUs stays valid."""
    from ..device import cpu_flags

    flags = ["-O3", "-fopenmp"]
    have = cpu_flags()
    if {"avx2", "fma"} <= have:
        flags += ["-mavx2", "-mfma"]
    if avx512 and "avx512f" in have:
        flags += ["-mavx512f"]
    return flags


def build_ops(name: str, source: Path, flags: list[str], fakes: dict | None = None) -> tuple[bool, str]:
    """build_extension, then register a fake (shape-only) implementation for each op in `fakes` ({"ns::op":
    fn}), so that torch.compile can trace the ops."""
    ok, why = build_extension(name, source, flags)
    if ok:
        for op, fn in (fakes or {}).items():
            torch.library.register_fake(op)(fn)
    return ok, why


def build_extension(name: str, source: Path, flags: list[str]) -> tuple[bool, str]:
    """(loaded, how / why not). Never raises: a missing compiler or a failed build is a reason."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return False, "no C++ compiler found (set CXX or install g++)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    from ..models import cache_root

    tag = f"torch{torch.__version__.split('+')[0]}-{torch.__version__.partition('+')[2] or 'cpu'}"
    # one folder per instruction set too: a cache shared by an AVX-512 and an AVX2 machine would otherwise
    # rebuild on every switch (torch's JIT versioner sees the flags change) instead of keeping both builds
    isa = "avx512" if "-mavx512f" in flags else "avx2" if "-mavx2" in flags else "generic"
    tag += f"-{isa}"
    build_dir = cache_root() / "kernels" / f"{source.stem}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's JIT versioner hashes the sources and flags, not the headers they include: the headers' hash goes
    # into the flags, so an edited simd.h rebuilds its kernels instead of loading a stale build
    headers = hashlib.sha1(b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))).hexdigest()[:12]
    flags = [*flags, f"-DHFACCEL_HEADERS={headers}"]
    start = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    except Exception as e:                      # a compiler error, a missing header: the caller keeps its fallback
        lines = str(e).splitlines() or [type(e).__name__]
        first = next((line for line in lines if "error" in line.lower() and source.name in line), lines[0])
        return False, f"building {source.name} failed: {first.strip()[:300]}"
    return True, f"built or loaded from {build_dir} in {time.perf_counter() - start:.1f} s"
