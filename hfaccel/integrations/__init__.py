"""Where users already work: the Trainer callback and the zero-code wrapper around from_pretrained."""

from .wrapper import patch_transformers, unpatch_transformers

__all__ = ["AccelEvalCallback", "patch_transformers", "unpatch_transformers"]


def __getattr__(name: str):
    if name == "AccelEvalCallback":           # imported on use: it pulls in the Trainer stack
        from .trainer import AccelEvalCallback

        return AccelEvalCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
