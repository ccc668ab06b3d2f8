"""Greedy picks from a bf16 or int8 copy of an fp32 head, each one checked against an error bound.

A greedy step needs only the argmax of the fp32 logits z = W h, and on the CPU the head is the largest single
read of a small model's step (SmolLM2-135M: 49152x576, 113 MB of the ~540 MB read per token). The compiled
step can read a bf16 copy of W instead (half the bytes), take the K best bf16 logits a, recompute those K in
fp32 from rows of the fp32 weight, and check that no other token can reach them. For every token j:

    |z_j - a_j| <= E = c * ||h||_2 * max_i ||W_i||_2 + 2^-8 * max_i |a_i|,   c = 2^-8 + 2^-16 + d * 2^-23

- rounding W and h to bf16 moves each product by at most (2^-9 + 2^-9 + 2^-18) |h_k| |W_jk|, and
  Cauchy-Schwarz bounds the sum over the row by ||h|| ||W_j||;
- the fp32 sums (oneDNN's and the recomputation's) add at most d * 2^-24 relative each: d * 2^-23 covers
  both;
- rounding the output to bf16 moves a_j by at most 2^-9 |a_j|, counted twice over.

If the K-th best a_j plus E is below the best recomputed logit, no token outside the K can be the argmax, and
the pick is the fp32 head's up to the order of the fp32 sums (the class of difference packed weights already
make; greedy tokens are tested equal, not assumed). Otherwise the step reports the row unchecked and the
caller runs the full fp32 head for that token (counted in `hfaccel_compile_stats.head_fallbacks`).

Measured on SmolLM2-135M over 1024 positions of the CPython docs: the bound is 7-10x the actual largest
error, and the best 64 certified every position (the best 32: 99.8%).

The copy can also be int8 with a scale per row (kind "int8", where hfaccel's int8 kernel is built: a quarter
of the fp32 bytes, fp32 activations, fp32 sums). Its error is known row by row when the copy is made,
e_j = W_j - s_j q_j, so each token j gets its own bound

    |z_j - a_j| <= E_j = ||h||_2 * (||e_j||_2 + d * 2^-23 * max_i max(||W_i||_2, ||s_i q_i||_2)) + 2^-23 * max_i |a_i|

- Cauchy-Schwarz on sum_k h_k e_jk;
- the fp32 sums of the kernel and of the recomputation, d * 2^-24 relative each;
- the kernel's one multiplication by s_j, 2^-24 |a_j|, counted twice over;
and the pick is certified when every token outside the K candidates has a_j + E_j below the best recomputed
logit. The int8 copy serves up to INT8_ROWS rows (its kernel computes in fp32); more rows (a batch, a
speculative verify) read the bf16 copy, which an int8 head therefore holds too. Per row rather than the largest row's: on SmolLM2 over 1024 positions of the CPython docs the largest
||e_j|| is 2.9x the median (rare tokens' rows), and one bound for all certified 73% of the positions with the
best 64, per-row bounds 100% (the best 16: 98.2%). `build` times both copies and keeps the faster (SmolLM2's
49152x576 head on a 2-core AMX Xeon, one row, weights not in cache: int8 1.08 ms, bf16 2.79, fp32 4.00).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .packed import PackedLinear, available

TOP = 64                    # candidates recomputed in fp32 per row
MIN_GAIN = 1.05             # used only where a step's head is measured at least this much faster
REPS = 5


KINDS = ("bf16", "int8")


def int8_available() -> bool:
    """hfaccel's int8 kernel (fp32 activations and sums, the bound's premise) is built for this CPU."""
    from .kernels import cpu_woq

    return cpu_woq.use_native(torch.device("cpu"))


INT8_ROWS = 6   # the int8 copy for up to this many rows, the bf16 copy above: hfaccel's int8 kernel computes
                # in fp32 (AMX Xeon, 49152x576, cold: 1.0 / 1.35 / 2.5 / 4.6 ms at 1 / 4 / 8 / 16 rows against
                # oneDNN bf16's 2.9 / 2.4 / 2.8 / 3.0)


class _Copy:
    """One low-precision copy of the head and its error bound."""

    def __init__(self, weight: torch.Tensor, kind: str):
        v, d = weight.shape
        self.kind = kind
        if kind == "int8":
            from .quant.layers import Int8Linear, quantize_int8_per_channel

            q, scale = quantize_int8_per_channel(weight)
            self.low = Int8Linear(q, scale)
            deq = self.low.dequantize()
            norm = max(float(weight.norm(dim=1).max()), float(deq.norm(dim=1).max()))
            self.row_coef = (weight - deq).norm(dim=1) + norm * d * 2 ** -23             # [V]
            self.coef = float(self.row_coef.max())
            self.rel = 2 ** -23
            self.bytes = sum(t.numel() * t.element_size() for t in self.low.buffers()) + v * 4
            return
        low = nn.Linear(d, v, bias=False, device="meta")
        # row-major whatever the fp32 weight's layout (weight_layout may have made the head column-major):
        # aten's bf16 GEMV over a column-major copy took 186 ms instead of 4.7 ms (49152x576, Zen 3)
        low.weight = nn.Parameter(weight.to(torch.bfloat16, memory_format=torch.contiguous_format),
                                  requires_grad=False)
        # oneDNN-reordered where oneDNN has a bf16 path; elsewhere (an AVX2-only CPU) aten's bf16 GEMV, which
        # there still beat the fp32 head: 49152x576 at one row, 4.3 ms bf16 vs 11.5 ms fp32 (2 threads, Zen 3)
        self.low = PackedLinear(low) if available(torch.bfloat16) is None else low
        self.coef = float(weight.norm(dim=1).max()) * (2 ** -8 + 2 ** -16 + d * 2 ** -23)
        self.row_coef = None                                # one bound for every token
        self.rel = 2 ** -8
        self.bytes = v * d * 2

    def approx(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return self.low(h)
        return self.low(h.to(torch.bfloat16)).float()


class CertifiedHead:
    """Low-precision copies of an fp32 head weight and what the check needs: a bf16 copy (oneDNN-reordered
    where it can be), and with kind "int8" also an int8 copy with a scale per row, read for up to INT8_ROWS
    rows at a time."""

    def __init__(self, weight: torch.Tensor, kind: str = "bf16", bf16: "CertifiedHead | None" = None):
        """bf16: a bf16 CertifiedHead of the same weight whose copy an int8 one reuses."""
        if kind not in KINDS:
            raise ValueError(f"certified head kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        if kind == "int8" and not int8_available():
            raise RuntimeError("an int8 certified head needs hfaccel's int8 CPU kernel, which is not built here")
        self.weight = weight.detach()                       # the model's own fp32 [V, d] weight, not a copy
        self.kind = kind
        self.k = min(TOP, self.weight.shape[0])
        same = bf16 is not None and bf16.weight.data_ptr() == self.weight.data_ptr()
        shared = bf16.copies[-1] if same else None
        self.copies = [_Copy(self.weight, "int8")] if kind == "int8" else []
        self.copies.append(shared or _Copy(self.weight, "bf16"))
        self.bytes = sum(c.bytes for c in self.copies)

    @property
    def low(self) -> nn.Module:
        """The bf16 copy's layer."""
        return self.copies[-1].low

    def copy_for(self, rows: int) -> _Copy:
        return self.copies[0] if rows <= INT8_ROWS else self.copies[-1]

    def approx(self, h: torch.Tensor) -> torch.Tensor:
        """The copy's logits [B, V] (float) for fp32 hidden states h [B, d]."""
        return self.copy_for(h.shape[0]).approx(h)

    def bound(self, h: torch.Tensor, a: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """[B]: no |fp32 logit - approx logit| of a row exceeds this (the module docstring derives it)."""
        c = self.copy_for(h.shape[0] if rows is None else rows)
        return c.coef * h.norm(dim=-1) + c.rel * a.abs().amax(dim=-1)

    def token_bounds(self, h: torch.Tensor, a: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """[B, V]: |fp32 logit - approx logit| <= this, token by token (an int8 copy's rows differ; a bf16
        copy's bound is the same for every token)."""
        c = self.copy_for(h.shape[0] if rows is None else rows)
        if c.row_coef is None:
            return self.bound(h, a, rows)[:, None].expand_as(a)
        return h.norm(dim=-1, keepdim=True) * c.row_coef + c.rel * a.abs().amax(dim=-1, keepdim=True)

    def pick(self, h: torch.Tensor, blocked: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, d] fp32 hidden states; blocked [V] bool, tokens that may not be picked (EOS before
        min_new_tokens). Returns (token [B], certified [B] bool). rows (default B) chooses the copy: a graph
        whose B is dynamic passes a static one."""
        c = self.copy_for(h.shape[0] if rows is None else rows)
        a = c.approx(h)
        per_token = c.row_coef is not None
        if per_token:
            reach = a + self.token_bounds(h, a, rows)                              # no fp32 logit is above
        else:
            bound = self.bound(h, a, rows)
        a = a.masked_fill(blocked, float("-inf"))
        top, idx = a.topk(self.k, dim=-1)                                          # [B, K]
        z = (self.weight[idx] * h[:, None, :]).sum(-1)                             # [B, K] fp32
        z = z.masked_fill(top == float("-inf"), float("-inf"))                     # blocked stays blocked
        best = z.amax(dim=-1, keepdim=True)
        # the lowest token id among equal maxima, as argmax over the whole vocabulary picks
        token = torch.where(z == best, idx, a.shape[-1]).amin(dim=-1)
        if not per_token:                          # the K-th best + the bound is above every token outside
            return token, top[:, -1] + bound < best[:, 0]
        outside = reach.masked_fill(blocked, float("-inf")).scatter(1, idx, float("-inf")).amax(dim=-1)
        return token, outside < best[:, 0]


def head_weight(model: nn.Module) -> tuple[torch.Tensor | None, str]:
    """(the dense fp32 weight of the model's head, "") or (None, why not); why is "" for a head that is not
    fp32 at all (bf16, quantized): there is nothing to certify."""
    head = model.get_output_embeddings()
    floats = [t.dtype for t in (*head.parameters(), *head.buffers()) if t.is_floating_point()]
    if isinstance(head, PackedLinear):
        floats.append(head.dtype)
    if torch.float32 not in floats:
        return None, ""
    if isinstance(head, PackedLinear):
        w = head.shared_weight
        if w is None:
            return None, "the head's fp32 weight is held only in oneDNN's layout (untied)"
    elif type(head) is nn.Linear:
        w = head.weight
    else:
        return None, f"the head is a {type(head).__name__}"
    if head.bias is not None:
        return None, "the head has a bias"
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return None, f"the head is {w.dtype} on {w.device.type} (fp32 on the CPU only)"
    return w, ""


def _best_of(fn) -> float:
    best = float("inf")
    with torch.inference_mode():
        fn()
        for _ in range(REPS):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def build(model: nn.Module) -> tuple[CertifiedHead | None, str]:
    """A CertifiedHead for this model where it qualifies and one token through it is measured faster than
    through the head as it is, with the label for the report; else (None, why not)."""
    w, why = head_weight(model)
    if w is None:
        return None, why
    base = getattr(model, model.base_model_prefix, None)
    if not isinstance(base, nn.Module) or base is model:
        return None, f"{type(model).__name__} has no base model under {model.base_model_prefix!r}"
    head = model.get_output_embeddings()
    vocab = w.shape[0]
    ids = torch.tensor([[1, 2, 3, 4]], device=w.device) % vocab
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, -1:]
        if not torch.equal(head(hidden)[:, -1], full):
            return None, (f"{type(model).__name__}'s logits are not its head applied to its base model's last "
                          "hidden state (scaled or capped logits)")
    h = hidden[:, -1].float().contiguous()
    blocked = torch.zeros(vocab, dtype=torch.bool, device=w.device)
    now = _best_of(lambda: head(h[:, None]))
    bf16 = CertifiedHead(w)
    timed = [(_best_of(lambda: bf16.pick(h, blocked)), "bf16", bf16)]     # (s, kind, head): the faster is kept
    if int8_available():
        int8 = CertifiedHead(w, "int8", bf16=bf16)
        timed.append((_best_of(lambda: int8.pick(h, blocked)), "int8", int8))
    fast, kind, cert = min(timed, key=lambda t: t[0])
    others = "".join(f"; {k} {t * 1e3:.2f} ms" for t, k, _ in timed if k != kind)
    if now < fast * MIN_GAIN:
        return None, (f"not faster here ({now * 1e3:.2f} ms per token as it is, {fast * 1e3:.2f} ms with a "
                      f"{kind} copy)")
    what = (f"an int8 copy of the head (up to {INT8_ROWS} rows a step, its bf16 copy for more)" if kind == "int8"
            else "a bf16 copy of the head")
    return cert, (f"greedy steps read {what} and recompute the best {cert.k} in fp32, each pick checked against "
                  f"an error bound ({now * 1e3:.2f} -> {fast * 1e3:.2f} ms per token eager{others}, "
                  f"+{cert.bytes / 2**20:.0f} MiB)")


__all__ = ["CertifiedHead", "build", "head_weight"]
