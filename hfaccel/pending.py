"""Features a config can name that this version does not implement yet.

Each is reported as "not available in this version" whenever a config asks for it: a preset that names
a future feature is never a silent no-op. When a feature lands it registers its own planner for the
same name (registry.register_feature replaces the entry) and its line here is deleted.
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import UNAVAILABLE, register_feature
from .report import Skip


def _pending(name: str, stage: str, asked: Callable[[object, object], str | None]) -> None:
    def planner(model, ctx, cfg):
        what = asked(ctx, cfg)
        return None if what is None else Skip(name, what, UNAVAILABLE)

    register_feature(name, stage=stage)(planner)


def _rope(ctx, cfg) -> str | None:
    if ctx.spec is not None and ctx.spec.rotary == "none":
        return None
    return ("fused rotary embedding in eager mode (the compiled decode step fuses it; fusion.py fuses "
            "q/k/v, gate/up and RMSNorm)") if cfg.fusion.rope else None


_pending("fuse_rope", "fuse", _rope)
