"""The exceptions hfaccel raises on purpose. Anything else escaping is a bug."""

from __future__ import annotations


class HfaccelError(Exception):
    """Base class of every error hfaccel raises on purpose."""


class ConfigError(HfaccelError, ValueError):
    """A configuration is malformed: names the key, the bad value and what is allowed.

    Raised while resolving a config, always before the model is touched.
    """

    def __init__(self, message: str, *, key: str | None = None, value: object = None, allowed: object = None):
        super().__init__(message)
        self.key = key
        self.value = value
        self.allowed = allowed


class AccelError(HfaccelError, RuntimeError):
    """A rewrite step failed; the model was rolled back to its exact prior state."""

    def __init__(self, message: str, *, step: str | None = None):
        super().__init__(message)
        self.step = step


class RevertError(HfaccelError, RuntimeError):
    """revert_model cannot restore the model exactly (a lossy change kept no original)."""


class MissingDependencyError(HfaccelError, ImportError):
    """An optional package or data file is needed for this and is not installed."""
