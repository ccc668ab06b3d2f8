"""Draft sources: what proposes the tokens the target verifies.

- PromptLookup: the continuation of the latest earlier occurrence of the row's last n-gram (n = 3, 2, 1) in
  its prompt and output. No model, no cost to speak of; strong on input-grounded text (summaries, edits).
- ModelDraft: a smaller causal LM with its own DynamicCache, decoding greedily (or sampling, for sampled
  calls) k tokens per step. Built from a path or a loaded model, from the target's first N layers
  (`layer_skip`), or from a quantized copy of the target (`quantized_copy`).

A ModelDraft's cache mirrors the target's columns (holes included): after each verify step it is cropped to
the columns the target kept, and the next proposal first feeds whatever columns it has not seen. Under a
compiled config (compile.enabled with a model draft) the draft decodes through a compiled step of its own
instead, over decode buffers that hold each row's history contiguously (see ModelDraft).
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import cache_arg


@dataclass
class DraftState:
    """The target's columns as the loop keeps them (one row per batch row)."""

    tokens: torch.Tensor          # [B, C] token of every cached column
    cols: torch.Tensor            # [B, C] bool: the column is real for this row (not padding, not a rejected draft)
    positions: torch.Tensor       # [B, C] position id of each column
    last: torch.Tensor            # [B] the newest token, emitted but not yet in the cache
    history: list[list[int]]      # per row: real prompt tokens + every emitted token
    room: int = 0                 # columns a row may still take past the prompt in this call (new tokens plus
                                  # drafts fed beyond them): what a draft's decode buffers must hold


class Draft(abc.ABC):
    name = "draft"
    free = False          # proposing costs (next to) nothing: the loop may ask for more tokens at no charge

    def begin(self, state: DraftState) -> None:
        pass

    @abc.abstractmethod
    def propose(self, state: DraftState, k: int, done: torch.Tensor, sampling=None):
        """(drafts [B, k] long, lengths [B] long, draft probabilities [B, k, V] or None when deterministic)."""

    def commit(self, state: DraftState) -> None:
        """The target has verified the last proposal; state now has its kept columns."""

    def end(self) -> None:
        pass


class PromptLookup(Draft):
    """n-gram lookup in each row's own tokens, with an incremental index (O(n) per new token)."""

    name = "prompt-lookup"
    free = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, state: DraftState) -> None:
        self.index: list[dict[tuple, int]] = [{} for _ in state.history]
        self.seen = [0] * len(state.history)
        for r in range(len(state.history)):
            self._extend(r, state.history[r])

    def _extend(self, r: int, h: list[int]) -> None:
        # n-grams ending at e are indexed once token e + 1 exists, so a row's current suffix never matches itself
        idx = self.index[r]
        for e in range(max(0, self.seen[r] - 1), len(h) - 1):
            for n in range(1, self.max_ngram + 1):
                if e - n + 1 >= 0:
                    idx[tuple(h[e - n + 1:e + 1])] = e
        self.seen[r] = len(h)

    def propose(self, state: DraftState, k: int, done: torch.Tensor, sampling=None):
        b = len(state.history)
        drafts = torch.zeros(b, k, dtype=torch.long)
        lengths = torch.zeros(b, dtype=torch.long)
        self.classes = [None] * b          # per row: the n-gram length that matched (the policy's class)
        if k:
            for r, h in enumerate(state.history):
                if done[r]:
                    continue
                self._extend(r, h)
                for n in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
                    e = self.index[r].get(tuple(h[-n:]))
                    if e is not None:
                        cont = h[e + 1:e + 1 + k]
                        drafts[r, :len(cont)] = torch.tensor(cont)
                        lengths[r] = len(cont)
                        self.classes[r] = n
                        break
        dev = state.last.device
        return drafts.to(dev), lengths.to(dev), None


class ModelDraft(Draft):
    """A causal LM proposing tokens from its own cache. `model` must share the target's vocabulary.

    With `compiled` (an hfaccel.compile.CompiledDecoder of the draft model, set by the compile stage) a call
    prefills the prompt eagerly, then drafts through the compiled verify step over decode buffers: each row
    keeps its own tokens contiguous in the buffer (column = history index + the row's left padding), feeds
    whatever of its history it has not seen (rows padded to the longest at their ends, each row's logits
    read at its own last token), then one token per step. After the target's verdict a row keeps the fed
    drafts that match what was emitted; the columns past them are overwritten by the next feed.
    """

    def __init__(self, model: nn.Module, name: str, confidence_threshold: float | None = None):
        self.model = model
        self.name = name
        self.threshold = confidence_threshold
        self.cache = None
        self.compiled = None          # the draft's CompiledDecoder, when the compile stage built one
        self.buf = None

    def begin(self, state: DraftState) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.buf = None
        if self.compiled is None or not state.room:
            return
        from ..compile import columns_for

        b, p = state.tokens.shape
        if not self.compiled.has_room_for(b, columns_for(p, state.room)):
            self.compiled.stats.fallback_calls += 1
            self.compiled.stats.fallback_reasons["compiled shapes used up: eager draft"] += 1
            return
        if not self.compiled._verify_checked:
            self.compiled.verify_costs(b, 2, reps=1)        # checks the step reaches every layer's attention
        with torch.inference_mode():
            self.model(input_ids=state.tokens, attention_mask=state.cols, position_ids=state.positions,
                       **cache_arg(self.model, self.cache), use_cache=True, logits_to_keep=1)
            self.buf = self.compiled.load_prefill(self.cache, p, state.cols, state.room)
        self.cache = None
        real = state.cols.sum(1)
        self.seen = real.tolist()                           # history tokens whose K/V the buffer holds, per row
        self.offset = (p - real).tolist()                   # left padding: column = history index + offset
        self.fed: list[list[int]] = [[] for _ in range(b)]  # drafts fed past the history, per row
        self.compiled.stats.compiled_calls += 1

    def _compiled_forward(self, ids: list[list[int]], start: list[int]) -> torch.Tensor:
        """Feed row r's tokens ids[r] at history index start[r] onward; logits [B, V] at each row's last one."""
        dev = self.buf.valid.device
        w = max(len(t) for t in ids)
        tokens = torch.tensor([t + [t[-1]] * (w - len(t)) for t in ids], dtype=torch.long, device=dev)
        first = torch.tensor(start, dtype=torch.long, device=dev)
        positions = first[:, None] + torch.arange(w, device=dev)
        col = first + torch.tensor(self.offset, dtype=torch.long, device=dev)
        logits = self.compiled.verify(self.buf, tokens, positions, col)
        at = torch.tensor([len(t) - 1 for t in ids], device=dev)
        return logits[torch.arange(len(ids), device=dev), at]

    def _forward(self, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_arg(self.model, self.cache),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _draw(self, logits: torch.Tensor, alive: torch.Tensor, sampling):
        """(token [B], draft probabilities [B, V] or None, rows still drafting [B])."""
        if sampling is None:
            p = logits.softmax(-1) if self.threshold is not None else None
            tok = logits.argmax(-1)
        else:
            p = sampling.probs(logits)
            tok = torch.multinomial(p, 1)[:, 0]
        if self.threshold is not None:
            alive = alive & (p.gather(-1, tok[:, None])[:, 0] >= self.threshold)
        return tok, (p if sampling is not None else None), alive

    @torch.inference_mode()
    def propose(self, state: DraftState, k: int, done: torch.Tensor, sampling=None):
        b = state.tokens.shape[0]
        dev = state.last.device
        if k == 0:
            return torch.zeros(b, 0, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev), None
        if self.buf is not None:
            return self._propose_compiled(state, k, done, sampling)
        seen = self.cache.get_seq_length()
        ones = torch.ones(b, 1, dtype=torch.bool, device=dev)
        nxt_pos = state.cols.sum(1, keepdim=True)
        fed = {"ids": torch.cat([state.tokens[:, seen:], state.last[:, None]], dim=1),   # columns not yet seen,
               "pos": torch.cat([state.positions[:, seen:], nxt_pos], dim=1),           # then last
               "mask": torch.cat([state.cols, ones], dim=1)}

        def advance(tok):
            fed.update(ids=tok[:, None], pos=fed["pos"][:, -1:] + 1, mask=torch.cat([fed["mask"], ones], dim=1))

        return self._drafting(k, ~done, sampling, lambda: self._forward(fed["ids"], fed["mask"], fed["pos"]),
                              advance)

    def _drafting(self, k: int, alive: torch.Tensor, sampling, forward, advance):
        """Draw up to k tokens per row: forward() gives the logits of the next one, advance(tok) feeds them.
        Returns (drafts [B, n], each row's number of live drafts, their probabilities or None)."""
        lengths = torch.zeros(alive.shape[0], dtype=torch.long, device=alive.device)
        drafts, probs = [], []
        for j in range(k):
            tok, p, alive = self._draw(forward(), alive, sampling)
            if p is not None:
                probs.append(p)
            lengths += alive.long()
            drafts.append(tok)
            if not bool(alive.any()) or j == k - 1:
                break
            advance(tok)
        return torch.stack(drafts, dim=1), lengths, (torch.stack(probs, dim=1) if probs else None)

    def _propose_compiled(self, state: DraftState, k: int, done: torch.Tensor, sampling):
        # a live row always has `last` to feed; a finished row feeds its last token again past its history
        fed = {"ids": [h[s:] or h[-1:] for h, s in zip(state.history, self.seen)], "start": list(self.seen)}
        self.seen = [len(h) for h in state.history]

        def advance(tok):
            fed.update(start=[s + len(t) for s, t in zip(fed["start"], fed["ids"])], ids=[[t] for t in tok.tolist()])

        d, lengths, q = self._drafting(k, ~done, sampling,
                                       lambda: self._compiled_forward(fed["ids"], fed["start"]).float(), advance)
        self.fed = [row[:-1] for row in d.tolist()]                    # the last draft is never fed
        return d, lengths, q

    def commit(self, state: DraftState) -> None:
        if self.buf is not None:
            for r, h in enumerate(state.history):          # keep the fed drafts the target emitted, in order
                tail, m = h[self.seen[r]:], 0
                while m < len(self.fed[r]) and m < len(tail) and self.fed[r][m] == tail[m]:
                    m += 1
                self.seen[r] += m
            return
        extra = self.cache.get_seq_length() - state.cols.shape[1]
        if extra > 0:
            self.cache.crop(-extra)       # the columns the target dropped; kept ones match the target's tokens

    def token_cost(self, batch: int, reps: int) -> float | None:
        """Seconds of one compiled draft token for `batch` rows (None without a compiled step)."""
        return None if self.compiled is None else self.compiled.verify_costs(batch, 2, reps=reps)[1]

    def end(self) -> None:
        self.cache = None
        self.buf = None


# ------------------------------------------------------------------------------------------ building drafts

def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module holding the decoder layers, its attribute name, the ModuleList)."""
    n = model.config.get_text_config().num_hidden_layers
    base = getattr(model, model.base_model_prefix, None)
    if isinstance(base, nn.Module):
        for name, child in base.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return base, name, child
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {n} decoder layers under "
                     f"`{model.base_model_prefix}`, so a layer-skip draft cannot be cut from it")


def layer_skip(model: nn.Module, n: int) -> nn.Module:
    """A view of `model` that runs its first n decoder layers, its final norm and its head. Shares every
    parameter (no memory beyond two module shells); the target is not modified."""
    base, attr, layers = _layer_list(model)
    total = len(layers)
    if not 1 <= n < total:
        raise ValueError(f"layer-skip:{n} is not allowed for a model of {total} layers; allowed: 1 to {total - 1}")
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config()
    text.num_hidden_layers = n
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:n]
    inner = copy.copy(base)
    inner.__dict__["_modules"] = dict(base._modules)
    inner._modules[attr] = nn.ModuleList(list(layers)[:n])
    inner.__dict__["config"] = cfg
    outer = copy.copy(model)
    outer.__dict__["_modules"] = dict(model._modules)
    outer._modules[model.base_model_prefix] = inner
    outer.__dict__["config"] = cfg
    for k in [k for k in outer.__dict__ if k.startswith("hfaccel") or k in ("generate", "_hfaccel_state")]:
        del outer.__dict__[k]                        # the target's instance rewrites are not the draft's
    return outer


def quantized_copy(model: nn.Module, bits: int) -> nn.Module:
    """A copy of `model` with RTN int8 (per channel) or int4 (group 64) weight layers, an int8 head and bf16
    activations where the device runs bf16 natively, built by hfaccel itself. Reads the target's tensors; the float
    weights it quantizes are not duplicated (the copy starts as tensors shared with the target)."""
    from ..api import accelerate_model

    with torch.device("meta"):
        draft = type(model)(copy.deepcopy(model.config))
    draft.load_state_dict(model.state_dict(), assign=True, strict=False)
    buffers = dict(model.named_buffers())
    for name, buf in list(draft.named_buffers()):
        if buf.is_meta:                               # non-persistent buffers (rotary inv_freq, ...)
            mod_path, _, leaf = name.rpartition(".")
            mod = draft.get_submodule(mod_path) if mod_path else draft
            mod._buffers[leaf] = buffers[name]
    if any(p.is_meta for p in draft.parameters()):
        missing = [n for n, p in draft.named_parameters() if p.is_meta]
        raise ValueError(f"self-int{bits} draft: parameters {missing[:3]} were not found in the target's state_dict")
    draft.tie_weights()
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.eval()
    # the head too, int8 per channel (a draft's head is read at every drafted token; its rounding only moves
    # acceptance: the target verifies every token)
    quant = {"method": "rtn", "bits": bits, "group_size": -1 if bits == 8 else 64, "quantize_lm_head": True,
             "lm_head_bits": 8}
    accelerate_model(draft, {"name": f"self-int{bits} draft", "dtype": "auto", "quantization": quant,
                             "kv_cache": {"type": "dynamic"}})
    return draft
