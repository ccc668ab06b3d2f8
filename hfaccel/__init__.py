"""hfaccel: make a loaded Hugging Face Transformers causal LM fast, in place.

    report = hfaccel.accelerate_model(model, "cpu-fast")
    model.generate(...)            # unchanged
    hfaccel.revert_model(model)
"""

__version__ = "0.1.0"

from . import models  # noqa: E402
from .api import accelerate_model, revert_model  # noqa: E402
from .config import AccelConfig, list_presets, resolve_config  # noqa: E402
from .errors import AccelError, ConfigError, HfaccelError, MissingDependencyError, RevertError  # noqa: E402
from .report import AccelReport, Change, Skip  # noqa: E402
from .integrations.wrapper import patch_transformers, unpatch_transformers  # noqa: E402

__all__ = [
    "AccelConfig", "AccelError", "AccelReport", "Change", "ConfigError", "HfaccelError", "MissingDependencyError",
    "RevertError", "Skip", "__version__", "accelerate_model", "list_presets", "models", "patch_transformers", "resolve_config",
    "revert_model", "unpatch_transformers",
]
