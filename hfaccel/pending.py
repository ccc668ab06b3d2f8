"""Features a config can name that this version does not implement yet.

Each is reported as "not available in this version" whenever a config asks for it: a preset that names
a future feature is never a silent no-op. When a feature lands it registers its own planner for the
same name (registry.register_feature replaces the entry) and its line here is deleted.
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import UNAVAILABLE, register_feature
from .report import Skip


def _pending(name: str, stage: str, asked: Callable[[object], str | None]) -> None:
    def planner(model, ctx, cfg):
        what = asked(cfg)
        return None if what is None else Skip(name, what, UNAVAILABLE)

    register_feature(name, stage=stage)(planner)


def _fusion(cfg) -> str | None:
    on = [k for k in ("qkv", "gate_up", "rms_norm", "rope") if getattr(cfg.fusion, k)]
    return f"fused kernels ({', '.join(on)})" if on else None


_pending("fuse", "fuse", _fusion)
