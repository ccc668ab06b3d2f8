"""English text that ships with CPython: the pydoc topic pages (~460 KB), for perplexity and calibration.

The text is split once, deterministically: the first 80% is the calibration slice, the rest the
held-out slice. Perplexity is always measured on the held-out slice, never on calibration text.
"""

from __future__ import annotations

import functools

HELD_OUT_FRACTION = 0.2


@functools.cache
def docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def calibration_text() -> str:
    text = docs_text()
    return text[: int(len(text) * (1 - HELD_OUT_FRACTION))]


def held_out_text() -> str:
    text = docs_text()
    return text[int(len(text) * (1 - HELD_OUT_FRACTION)):]


def encode(tokenizer, text: str, vocab_size: int) -> list[int]:
    """Token ids of `text`; without a tokenizer (tiny test models), bytes folded into the vocabulary."""
    if tokenizer is not None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    low = 3   # keep clear of pad/bos/eos ids 0-2
    return [low + b % (vocab_size - low) for b in text.encode("utf-8")]
