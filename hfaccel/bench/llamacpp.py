"""Loading llama.cpp (llama-cpp-python) for the comparisons, also on CPUs where its repacked weights crash.

Seen on 2026-12-02 on a 2-core Xeon with AMX (llama-cpp-python 0.3.36 built from source, native CPU flags): an
eval of one token ran, any eval of two or more (every prefill) died with a segmentation fault inside llama.cpp;
with the model parameter `use_extra_bufts = False` (no repacked / AMX weight buffers) it ran, at 86-91 tok/s
decode on the default model. A segmentation fault cannot be caught in the process that has it, so the first
load of a file in a process evaluates a few tokens in a subprocess; if that dies, the model loads without the
extra buffer types and the returned note says so (the benchmarks print it beside llama.cpp's figures).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False)
llm.eval(llm.tokenize(b"Hello there, how are you today?"))
"""


@functools.cache
def extra_buffers_work(path: str) -> tuple[bool, str]:
    """(a short prefill runs with llama.cpp's default buffers, what happened) for the GGUF at `path`."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "a 7-token prefill with llama.cpp's default buffers did not finish in 300 s"
    if r.returncode == 0:
        return True, ""
    return False, (f"a 7-token prefill with llama.cpp's default (repacked) weight buffers exited with "
                   f"{r.returncode} ({(r.stderr.strip().splitlines() or ['no message'])[-1][:160]})")


def load(path: Path | str, **kwargs: Any):
    """(llama_cpp.Llama for the GGUF at `path`, note): the note is empty, or says why the model runs without
    llama.cpp's extra (repacked) weight buffers."""
    import llama_cpp
    import llama_cpp.llama as module

    ok, why = extra_buffers_work(str(path))
    if ok:
        return llama_cpp.Llama(model_path=str(path), **kwargs), ""
    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = default
    return llm, f"llama.cpp ran without its extra weight buffers (use_extra_bufts=False): {why}"
