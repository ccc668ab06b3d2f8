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
from .quant.formats import load_quantized, save_quantized  # noqa: E402
from .batching import Engine, GenerationResult, SamplingParams, generate_batch  # noqa: E402

__all__ = [
    "AccelConfig", "AccelError", "AccelReport", "Change", "ConfigError", "Engine", "GenerationResult", "HfaccelError",
    "MissingDependencyError", "RevertError", "SamplingParams", "Skip", "__version__", "accelerate_model",
    "generate_batch", "list_presets", "load_quantized", "models",
    "patch_transformers", "resolve_config", "revert_model", "save_quantized", "unpatch_transformers",
]
