"""`hfaccel bench`: plain Transformers and the accelerated model, measured side by side in one process."""

from .runner import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
