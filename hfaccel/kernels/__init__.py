"""Pure ops with no transformers import: torch reference versions (reference.py) and Triton versions for
CUDA (triton_ops.py, imported lazily; its tests run it on CPU under TRITON_INTERPRET=1)."""
