"""Continuous batching over the paged KV pool: generate_batch (offline) and Engine (online, thread-safe)."""

from .engine import Engine, EngineCore, GenerationResult, RequestHandle, generate_batch
from .params import SamplingParams

__all__ = ["Engine", "EngineCore", "GenerationResult", "RequestHandle", "SamplingParams", "generate_batch"]
