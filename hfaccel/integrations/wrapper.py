"""Zero-code acceleration: every causal LM loaded through the Auto classes is accelerated on load.

    hfaccel run --preset cpu-fast script.py args...      # an unmodified script
    hfaccel.patch_transformers("cpu-fast")               # in a notebook; unpatch_transformers() undoes it

This is the one place hfaccel patches a class: the `from_pretrained` entry point of
`transformers.AutoModelForCausalLM` (and any other `AutoModel*ForCausalLM` the installed Transformers
exports), never a model class. The patch is explicit, global for the process, and undone exactly by
unpatch_transformers(). Each model it loads is accelerated with the given config and its report is
printed once (to stderr).
"""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

_MISSING = object()
_lock = threading.Lock()
_patched: dict[type, Any] = {}          # Auto class -> its own `from_pretrained` entry before patching
_state: dict[str, Any] = {}


def entry_points() -> list[type]:
    import transformers

    names = sorted(n for n in dir(transformers) if n.startswith("AutoModel") and n.endswith("ForCausalLM"))
    return [getattr(transformers, n) for n in names]


def patch_transformers(config: Any = "cpu-fast", *, report: bool = True, stream=None, **overrides: Any) -> list[str]:
    """Accelerate every model loaded through AutoModel*ForCausalLM.from_pretrained from now on.

    config/overrides as for accelerate_model (checked now, before anything is patched). Calling it again
    replaces the config. Returns the names of the patched entry points.
    """
    from ..config import resolve_config

    cfg = resolve_config(config, **overrides)
    with _lock:
        _state.update(config=cfg, report=report, stream=stream, models=0)
        for cls in entry_points():
            if cls in _patched:
                continue
            own = cls.__dict__.get("from_pretrained", _MISSING)
            original = inspect.getattr_static(cls, "from_pretrained").__func__

            def from_pretrained(klass, *args, __original=original, **kwargs):
                model = __original(klass, *args, **kwargs)
                _accelerate_loaded(model)
                return model

            from_pretrained.__doc__ = original.__doc__
            from_pretrained.__wrapped__ = original
            _patched[cls] = own
            cls.from_pretrained = classmethod(from_pretrained)
        return [c.__name__ for c in _patched]


def unpatch_transformers() -> None:
    """Restore the Auto classes' own from_pretrained. Models already loaded stay accelerated
    (hfaccel.revert_model undoes one)."""
    with _lock:
        for cls, own in _patched.items():
            if own is _MISSING:
                del cls.from_pretrained
            else:
                cls.from_pretrained = own
        _patched.clear()
        _state.clear()


def is_patched() -> bool:
    return bool(_patched)


def _accelerate_loaded(model) -> None:
    from transformers import GenerationMixin, PreTrainedModel

    from ..api import accelerate_model

    cfg = _state.get("config")
    if cfg is None or not isinstance(model, (PreTrainedModel, GenerationMixin)):
        return
    report = accelerate_model(model, cfg)
    _state["models"] = _state.get("models", 0) + 1
    if _state.get("report", True):
        from rich.console import Console

        Console(file=_state.get("stream") or sys.stderr).print(report)
