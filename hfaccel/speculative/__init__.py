"""Speculative decoding behind an unchanged generate(): draft sources and the batched verify loop."""

from .drafts import (
           Draft,
           DraftState,
           ModelDraft,
           PromptLookup,
           layer_skip,
           quantized_copy,
)
from .loop import (
           DraftPolicy,
           Sampling,
           SpecStats,
           Verifier,
           accept_greedy,
           accept_sampled,
)

__all__ = ["Draft", "DraftPolicy", "DraftState", "ModelDraft", "PromptLookup", "Sampling", "SpecStats", "Verifier",
           "accept_greedy", "accept_sampled", "layer_skip", "quantized_copy"]
