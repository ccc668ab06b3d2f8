"""Batched draft-and-verify decoding over one target cache.

The target's cache holds *columns*: every row gets the same columns, and a column a row did not accept is a
hole that its attention mask hides (the way left padding is hidden). Each step:

1. the draft proposes up to k tokens per row (rows may propose fewer: `lengths`);
2. the target runs once over [last token, drafts] for every row (k + 1 columns, padded verification);
3. greedy: a row accepts the longest prefix of its drafts that equals the target's own argmax, and emits
   the target's token after it (so every step emits 1 to k + 1 tokens per row, exactly greedy's tokens);
   sampling: each draft is accepted with probability min(1, p/q), the first rejection resamples from
   norm(max(p - q, 0)) and a fully accepted row samples one more token from p (Leviathan et al. 2023), so
   every emitted token follows the target's distribution;
4. the columns no live row accepted are cropped (`Cache.crop`, the paged pool returns whole blocks); the
   rest stay as holes in the rows that rejected them.

Rows stop on their own EOS or token budget and then only carry padding; the loop ends when all have.

Under a compiled verify (compile.enabled) a greedy step in which no row drafts runs the compiled one-token
step instead (each row at its own buffer column; the certified bf16 head where the compile stage built one),
so a draft that does not pay costs what plain compiled decoding costs, not a width-1 verify with full logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..compat import cache_arg
from .drafts import Draft, DraftState


@dataclass
class SpecStats:
    """What speculative decoding did: `model.hfaccel_spec_stats` (cumulative, and `last` for the latest call)."""

    calls: int = 0
    fallback_calls: int = 0
    fallback_reasons: dict = field(default_factory=dict)
    steps: int = 0                   # target verify forwards (the prefill is not counted)
    drafted: int = 0                 # draft tokens proposed to the target, over live rows
    accepted: int = 0                # of those, accepted
    emitted: int = 0                 # tokens emitted by verify steps, over live rows
    row_steps: int = 0               # (verify step, live row) pairs
    undrafted_calls: int = 0         # calls whose batch size the cost tables ruled drafting out for
                                     # (DraftPolicy.worth_drafting): the draft was not started
    undrafted_steps: int = 0         # of the steps, those in which no row drafted (the compiled greedy step
                                     # under a compiled verify)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    calibration_seconds: float = 0.0   # verify cost tables measured at the first call of a batch size
    last: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean tokens a row gains per verify forward (1.0 = no speed-up from drafting)."""
        return self.emitted / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "last"}
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_target_forward=self.tokens_per_target_forward,
                 last=dict(self.last))
        return d


@dataclass
class Sampling:
    """The target's sampling distribution: temperature, then top-k, then top-p (generate()'s order)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() / self.temperature
        if self.top_k is not None and 0 < self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            srt, idx = torch.sort(x, dim=-1, descending=False)
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1 - self.top_p
            drop[..., -1:] = False                       # keep at least the most likely token
            x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        return x.softmax(dim=-1)


def accept_greedy(target: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per row: the longest prefix with drafts[:, j] == target[:, j] and j < lengths."""
    k = drafts.shape[1]
    ok = (drafts == target[:, :k]) & (torch.arange(k, device=drafts.device) < lengths[:, None])
    return ok.long().cumprod(dim=1).sum(dim=1)


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, lengths: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling. p: [B, k + 1, V] target probabilities; q: [B, k, V] draft probabilities (None: the
    drafts are deterministic, q is one-hot). Returns (accepted per row [B], the token after them [B])."""
    b, k = drafts.shape
    dev = drafts.device
    if k:
        pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        qd = torch.ones_like(pd) if q is None else q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(pd.shape, device=dev, generator=generator)
        ok = (u * qd < pd) & (torch.arange(k, device=dev) < lengths[:, None])
        n = ok.long().cumprod(dim=1).sum(dim=1)
    else:
        n = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    final = p[rows, n].clone()                                     # [B, V]: p at the first rejected position
    rejected = n < lengths
    if bool(rejected.any()):
        idx = n.clamp(max=k - 1)
        if q is None:
            qr = torch.zeros_like(final).scatter_(-1, drafts[rows, idx][:, None], 1.0)
        else:
            qr = q[rows, idx]
        resid = (final - qr).clamp(min=0)
        norm = resid.sum(-1, keepdim=True)
        resid = torch.where(norm > 0, resid / norm.clamp(min=1e-30), final)
        final = torch.where(rejected[:, None], resid, final)
    nxt = torch.multinomial(final, 1, generator=generator)[:, 0]
    return n, nxt


class DraftPolicy:
    """How many tokens to draft, and how wide to verify.

    cost[w] is the target's measured time for a verify forward of width w (1 = plain decode); on CPUs it is
    far from linear (small-M matmuls: widths 2-3 can cost more than 4-8). Adaptive: a draft of k tokens is
    worth E(k) / (cost[k + 1] + k * draft_cost) tokens per second, E(k) = 1 + a + ... + a^k, with `a` the
    acceptance estimate of its class (model drafts: one class; prompt lookup: the length of the n-gram that
    matched, since a 3-gram match continues far more often than a 1-gram one; `plan_rows` weighs the whole
    batch, whose rows share one verify width). `a` is the geometric-model
    estimate accepted / (accepted + rejections), smoothed. k = 0 (plain decode) wins while drafting does not
    pay; a class is still probed after 4, 8, then every 16 such steps, at a step whose proposing rows could
    pay for the probe's width at 90% acceptance. A verify is padded up to the cheapest
    width at least as wide as the proposals (padding is never accepted). Fixed: always k = max_k.
    """

    PROBE_EVERY = 4
    MAX_INTERVAL = 16
    PROBE_CEILING = 0.9

    def __init__(self, max_k: int, adaptive: bool, cost: list[float] | None = None, draft_cost: float = 0.0,
                 prior: float = 0.7, measure=None):
        self.max_k, self.adaptive = max_k, adaptive
        # seconds per verify width (cost[0] unused) and per draft token; without a measurement every width
        # counts the same and the draft's time is left out
        self.cost = list(cost) if cost else [1.0] * (max_k + 2)
        self.draft_cost = draft_cost if cost else 0.0
        # measure(batch, compiled, greedy) -> (cost, draft_cost): verify cost depends on batch x width (the
        # matmuls' M), so each batch bucket (1, 2, 4, 8, 16+) gets its own table, measured at its first call;
        # a compiled verify step (hfaccel.compile) has its own, and there greedy width 1 is the greedy step
        self.measure = measure
        self.tables: dict[tuple, tuple[list[float], float]] = \
            {(False, 1, True): (self.cost, self.draft_cost)} if cost else {}
        self.measure_seconds = 0.0
        # a model draft's observed seconds per proposed token, per table (smoothed): what the policy counts when
        # it exceeds the measured step (see observe_draft)
        self.key: tuple = (False, 1, True)
        self.observed: dict[tuple, float] = {}
        self.prior = prior
        self.alpha: dict = {}
        self.idle: dict = {}
        self.interval: dict = {}

    def use_batch(self, batch: int, compiled=None, greedy: bool = True) -> None:
        if self.measure is None:
            return
        greedy = greedy or compiled is None              # eager: one table for both
        key = (compiled is not None, min(16, 1 << max(0, batch - 1).bit_length()), greedy)
        if key not in self.tables:
            t = time.perf_counter()
            self.tables[key] = self.measure(key[1], compiled, greedy)
            self.measure_seconds += time.perf_counter() - t
        self.key = key
        self.cost, measured = self.tables[key]
        self.draft_cost = max(measured, self.observed.get(key, 0.0))

    def observe_draft(self, seconds: float, tokens: int) -> None:
        """A model draft spent `seconds` proposing `tokens` tokens (its feeds, graph calls and Python). The table's
        draft cost is one compiled draft step alone; the whole propose took more (self-int4 on SmolLM2, 2-core
        CPU: ~10 ms per drafted token against its ~7 ms step), and drafting that only paid at the step's cost
        ran at 0.70-0.77x plain decoding. So the smoothed observation replaces the measurement when larger."""
        if tokens <= 0 or not self.tables:      # no measured table: costs are unit-less, nothing to compare
            return
        per = seconds / tokens
        seen = self.observed.get(self.key)
        self.observed[self.key] = per if seen is None else 0.8 * seen + 0.2 * per
        self.draft_cost = max(self.tables[self.key][1], self.observed[self.key])

    @staticmethod
    def expected_tokens(a: float, k: int) -> float:
        """E(k) = 1 + a + ... + a^k: tokens a row gains from k drafts at acceptance a (clamped to 0..0.99)."""
        a = min(max(a, 0.0), 0.99)
        return (1 - a ** (k + 1)) / (1 - a)

    def _best(self, top: int, a: float) -> int:
        best, best_rate = 0, 0.0
        for k in range(top + 1):
            rate = self.expected_tokens(a, k) / (self.cost[min(k + 1, len(self.cost) - 1)] + k * self.draft_cost)
            if rate > best_rate * 1.0001:
                best, best_rate = k, rate
        return best

    def worth_drafting(self, cls=0) -> bool:
        """Whether any draft length can pay at this batch size's costs with an acceptance of 90% (or the class's
        estimate, when higher). Where not (SmolLM2 at batch 4 on 2 cores: a width-2 verify costs 1.6x the
        one-token step, a width-6 one 2.7x, and a model draft's token ~0.5x), a call does not start the draft
        at all: no draft prefill, no probes, the one-token step throughout."""
        return not self.adaptive or self._best(self.max_k, max(self.PROBE_CEILING, self.alpha.get(cls, 0.0))) > 0

    def choose_k(self, room: int, cls=0) -> int:
        top = max(0, min(self.max_k, room - 1))
        if not self.adaptive:
            return top
        k = self._best(top, self.alpha.get(cls, self.prior))
        if k:
            self.interval[cls] = self.PROBE_EVERY
        elif top:
            self.idle[cls] = self.idle.get(cls, 0) + 1
            if self.idle[cls] >= self.interval.get(cls, self.PROBE_EVERY):
                self.idle[cls] = 0
                self.interval[cls] = min(self.interval.get(cls, self.PROBE_EVERY) * 2, self.MAX_INTERVAL)
                k = self._best(top, self.prior) or 1
        return k

    def _rate(self, w: int, lengths: list[int], classes: list, alpha: dict, live: int) -> float:
        """Expected tokens per second of a verify of width w: every live row gains 1 token, a row with a
        proposal of length ln gains E(min(ln, w - 1)) with its class's acceptance."""
        gain = live
        for ln, c in zip(lengths, classes):
            if ln and w > 1:
                gain += self.expected_tokens(alpha[c], min(ln, w - 1)) - 1
        return gain / self.cost[min(w, len(self.cost) - 1)]

    def _best_width(self, lengths, classes, alpha, live) -> int:
        best, best_rate = 1, 0.0
        for w in range(1, max(lengths) + 2):
            rate = self._rate(w, lengths, classes, alpha, live)
            if rate > best_rate * 1.0001:
                best, best_rate = w, rate
        return best

    def plan_rows(self, lengths: list[int], classes: list, live: int) -> list[int]:
        """Per-row draft lengths for one step of a free draft (prompt lookup: each row's proposal, its class
        the n-gram length that matched). One verify serves the whole batch and its width sets the cost for
        every row, so the step takes the width with the best expected tokens per second summed over the live
        rows, and every row drafts as far as that width allows (a row's shorter proposal adds nothing to the
        cost). Deciding per row instead drafted whenever any one row's match paid for itself: at batch 4 on
        a 2-core CPU a width-2+ verify costs ~2x the one-token step, so that lost to plain decoding.
        Probes are counted per step and class: a class idle for its interval is probed with one draft token
        per row (width 2, the cheapest verify that measures acceptance; a wider probe at batch 4 cost up to
        2.7x a plain step for what one token tells)."""
        if not self.adaptive or not any(lengths):
            return lengths
        present = {c for ln, c in zip(lengths, classes) if ln}
        alpha = {c: self.alpha.get(c, self.prior) for c in present}
        w = self._best_width(lengths, classes, alpha, live)
        if w == 1:
            due = []
            for c in present:
                self.idle[c] = self.idle.get(c, 0) + 1
                if self.idle[c] >= self.interval.get(c, self.PROBE_EVERY):
                    due.append(c)
            # a probe only where these rows could pay for a width-2 verify at the ceiling's acceptance: one row
            # of four proposing never does at batch 4 (2-core CPU, SmolLM2: width 2 costs 1.7x the step), and
            # such probes cost chat prompts ~3% against plain decoding (a due class waits for a step that can)
            ceiling = {c: max(self.PROBE_CEILING, a) for c, a in alpha.items()}
            if due and self._rate(2, lengths, classes, ceiling, live) > self._rate(1, lengths, classes, alpha, live):
                for c in due:
                    self.idle[c] = 0
                    self.interval[c] = min(self.interval.get(c, self.PROBE_EVERY) * 2, self.MAX_INTERVAL)
                w = 2               # the narrowest verify that measures acceptance: one draft token per row
        else:
            for c in present:
                self.idle[c] = 0
                self.interval[c] = self.PROBE_EVERY
        return [min(ln, w - 1) for ln in lengths]

    def width(self, needed: int) -> int:
        """The cheapest verify width >= needed (ties: the narrowest)."""
        if needed >= len(self.cost) - 1:
            return needed
        return min(range(needed, len(self.cost)), key=lambda w: (self.cost[w], w))

    def observe(self, accepted: int, rejections: int, cls=0) -> None:
        if accepted + rejections:
            a = self.alpha.get(cls, self.prior)
            self.alpha[cls] = 0.8 * a + 0.2 * accepted / (accepted + rejections)


class Verifier:
    """One generate() call's speculative loop. `run` returns the new tokens, [B, generated], pad after a row
    ends (the layout generate() returns)."""

    def __init__(self, model, draft: Draft, cache, *, policy: DraftPolicy, stats: SpecStats,
                 sampling: Sampling | None = None, compiled=None):
        self.model, self.draft, self.cache = model, draft, cache
        self.policy, self.stats = policy, stats
        self.sampling = sampling
        # hfaccel.compile.CompiledDecoder: verify steps run compiled over its decode buffers (each row
        # writes at its own column, so a rejected draft is overwritten instead of cropped)
        self.compiled = compiled
        self.buf = self.col = None

    def _verify(self, ids, mask, positions):
        if self.buf is None:
            return self._forward(ids, mask, positions)
        t = time.perf_counter()
        logits = self.compiled.verify(self.buf, ids, positions, self.col)
        self.stats.target_seconds += time.perf_counter() - t
        return logits

    def _greedy_step(self, ids, positions, done, allow_eos) -> torch.Tensor:
        """The next token [B] of every row through the compiled one-token step, each row at its own column."""
        from ..compile import _fresh

        t = time.perf_counter()
        nxt, _ = self.compiled.pick(self.compiled.run_step, self.buf, _fresh(ids), _fresh(positions), self.col,
                                    done, self.eos_mask, self.pad_t, allow_eos[:, None])
        self.stats.target_seconds += time.perf_counter() - t
        return nxt[:, 0]

    def _forward(self, ids, mask, positions, keep: int | None = None):
        t = time.perf_counter()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_arg(self.model, self.cache),
                         use_cache=True, logits_to_keep=keep or 0)
        self.stats.target_seconds += time.perf_counter() - t
        return out.logits

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling is None:
            return logits.argmax(-1)
        probs = self.sampling.probs(logits)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, mask: torch.Tensor | None, new: int, min_new: int, eos: list[int],
            pad: int, streamer=None) -> torch.Tensor:
        stats = self.stats
        b, p = ids.shape
        dev = ids.device
        cols = torch.ones(b, p, dtype=torch.bool, device=dev) if mask is None else mask.to(torch.bool)
        eos_t = torch.tensor(eos or [-1], device=dev)
        steps0, drafted0, accepted0, emitted0, rows0 = (stats.steps, stats.drafted, stats.accepted, stats.emitted,
                                                      stats.row_steps)
        d0, t0, undrafted0 = stats.draft_seconds, stats.target_seconds, stats.undrafted_steps

        def suppress_eos(logits, produced):             # min_new_tokens: no EOS before the minimum
            if eos and min_new:
                early = produced < min_new                   # [B, S]
                if bool(early.any()):
                    logits = logits.clone()
                    logits[..., eos_t] = torch.where(early[..., None], float("-inf"), logits[..., eos_t])
            return logits

        # prefill (what the cache already holds of the prompt, e.g. reused prefix blocks, is skipped)
        have = self.cache.get_seq_length()
        positions = (cols.long().cumsum(1) - 1).clamp(min=0)
        logits = self._forward(ids[:, have:], cols, positions[:, have:], keep=1)[:, -1]
        produced = torch.zeros(b, dtype=torch.long, device=dev)
        last = self._pick(suppress_eos(logits[:, None], produced[:, None])[:, 0])
        policy = self.policy
        if self.compiled is not None:
            from ..compile import columns_for

            # a row's columns end at most max_k past its budget, and a verify writes max_k + 1 beyond that
            room = new + 2 * (self.policy.max_k + 1)
            changed = self.compiled.changed()
            if changed is not None:
                self.compiled.stats.fallback_calls += 1
                self.compiled.stats.fallback_reasons[f"{changed}: eager verify"] += 1
            elif self.compiled.has_room_for(b, columns_for(p, room)):
                policy.use_batch(b, self.compiled, self.sampling is None)   # first: measuring runs the step
                self.buf = self.compiled.load_prefill(self.cache, p, cols, room)
                self.col = torch.full((b,), p, dtype=torch.long, device=dev)
                self.eos_mask, self.pad_t = self.compiled.step_masks(eos, pad, dev)
                self.compiled.stats.compiled_calls += 1
            else:
                self.compiled.stats.fallback_calls += 1
                self.compiled.stats.fallback_reasons["compiled shapes used up: eager verify"] += 1
        out = [[int(t)] for t in last]
        produced += 1
        done = torch.isin(last, eos_t) | (produced >= new)
        if streamer is not None:
            streamer.put(last.cpu())
        state = DraftState(tokens=ids, cols=cols, positions=positions, last=last,
                           history=[row[m].tolist() + [int(t)] for row, m, t in zip(ids, cols, last)],
                           room=new + 2 * (policy.max_k + 1))
        if self.buf is None:
            policy.use_batch(b)
        free = self.draft.free
        drafting = free or policy.worth_drafting()
        if drafting:
            t = time.perf_counter()
            self.draft.begin(state)                       # a model draft prefills the prompt here
            stats.draft_seconds += time.perf_counter() - t
        else:
            stats.undrafted_calls += 1
        if not drafting and self.buf is not None and self.sampling is None and not bool(done.all()):
            # nothing will be drafted this call: the compiled decoder's own greedy loop (the step graph this
            # loop's undrafted steps call, without the per-step bookkeeping: chat at batch 1 ran at 0.94x of it)
            t = time.perf_counter()
            rest = self.compiled.decode(self.buf, last[:, None], p, state.cols.sum(1, keepdim=True), new - 1,
                                        min_new, eos, pad, streamer=streamer)
            stats.target_seconds += time.perf_counter() - t
            stats.steps += rest.shape[1]
            stats.undrafted_steps += rest.shape[1]
            stats.row_steps += rest.numel()
            stats.emitted += rest.numel()
            for r, toks in enumerate(rest.tolist()):
                out[r] += toks
            done[:] = True
        while not bool(done.all()):
            room = int((new - produced)[~done].max())          # tokens the neediest live row may still take
            kk = min(policy.max_k, room - 1) if free else (policy.choose_k(room) if drafting else 0)
            t = time.perf_counter()
            if drafting:
                drafts, lengths, q = self.draft.propose(state, kk, done, self.sampling)
            else:
                drafts, lengths, q = (torch.zeros(b, 0, dtype=torch.long, device=dev),
                                      torch.zeros(b, dtype=torch.long, device=dev), None)
            lengths = torch.where(done, 0, lengths)
            classes = getattr(self.draft, "classes", None) if free else None
            if classes is not None:           # per row, as far as the batch's best verify width allows
                lengths = torch.tensor(policy.plan_rows(lengths.tolist(), classes, int((~done).sum())),
                                       device=dev)
            spent = time.perf_counter() - t
            stats.draft_seconds += spent
            if drafting and not free and kk:
                policy.observe_draft(spent, int(lengths.max()) or kk)
            need = int(lengths.max()) if lengths.numel() else 0    # the longest proposal...
            kk = policy.width(need + 1) - 1 if need else 0         # ...padded to the cheapest width
            if kk > drafts.shape[1]:
                drafts = torch.cat([drafts, drafts.new_zeros(b, kk - drafts.shape[1])], dim=1)
                if q is not None:
                    q = torch.cat([q, q.new_zeros(b, kk - q.shape[1], q.shape[2])], dim=1)
            drafts = drafts[:, :kk]
            q = q[:, :kk] if q is not None else None
            step_ids = torch.cat([state.last[:, None], drafts], dim=1)                       # [B, kk + 1]
            step_mask = torch.cat([state.cols, torch.ones(b, kk + 1, dtype=torch.bool, device=dev)], dim=1)
            step_pos = state.cols.sum(1, keepdim=True) + torch.arange(kk + 1, device=dev)   # next positions
            if kk == 0 and self.buf is not None and self.sampling is None:
                # no row drafts: the compiled greedy step (one token, EOS rule and certified head in the graph)
                n = torch.zeros(b, dtype=torch.long, device=dev)
                nxt = self._greedy_step(step_ids, step_pos, done, produced >= min_new)
            elif self.buf is not None and self.sampling is None:
                # compiled greedy verify: the picks come out of the graph, the logits never do
                t = time.perf_counter()
                allow = (produced[:, None] + torch.arange(kk + 1, device=dev)) >= min_new
                target = self.compiled.verify_greedy(self.buf, step_ids, step_pos, self.col, self.eos_mask, allow)
                stats.target_seconds += time.perf_counter() - t
                n = accept_greedy(target, drafts, lengths)
                nxt = target.gather(1, n[:, None])[:, 0]
            else:
                logits = self._verify(step_ids, step_mask, step_pos)                         # [B, kk + 1, V]
                logits = suppress_eos(logits, produced[:, None] + torch.arange(kk + 1, device=dev))
                if self.sampling is None:
                    target = logits.argmax(-1)
                    n = accept_greedy(target, drafts, lengths)
                    nxt = target.gather(1, n[:, None])[:, 0]
                else:
                    n, nxt = accept_sampled(self.sampling.probs(logits), q, drafts, lengths)
            emitted = torch.cat([drafts, nxt[:, None]], dim=1)
            emitted.scatter_(1, n[:, None], nxt[:, None])                                   # drafts[:n], then nxt
            live = ~done
            stats.steps += 1
            stats.undrafted_steps += kk == 0
            stats.row_steps += int(live.sum())
            stats.drafted += int(lengths[live].sum())
            stats.accepted += int(n[live].sum())
            # emit per row, stopping at EOS or the budget
            em = emitted.tolist()
            for r in range(b):
                if done[r]:
                    continue
                for tok in em[r][:int(n[r]) + 1]:
                    out[r].append(tok)
                    state.history[r].append(tok)
                    stats.emitted += 1
                    if tok in eos or len(out[r]) >= new:
                        done[r] = True
                        break
            if streamer is not None and b == 1:
                for tok in out[0][int(produced[0]):]:              # one token per put, as generate() does
                    streamer.put(torch.tensor([tok]))
            produced = torch.tensor([len(o) for o in out], device=dev)
            # keep the columns some live row accepted: [last, accepted drafts]; crop the rest
            accepted_cols = torch.where(live, n + 1, 0)
            keep = int(accepted_cols.max()) if bool(live.any()) else 1
            if self.buf is not None:
                self.col = self.col + accepted_cols                 # the rest is overwritten by the next verify
            elif keep < kk + 1:
                self.cache.crop(-(kk + 1 - keep))
            new_cols = torch.arange(keep, device=dev) < accepted_cols[:, None]
            state.tokens = torch.cat([state.tokens, step_ids[:, :keep]], dim=1)
            state.cols = torch.cat([state.cols, new_cols], dim=1)
            state.positions = torch.cat([state.positions, step_pos[:, :keep]], dim=1)
            state.last = nxt
            if drafting:
                self.draft.commit(state)
            rejected = (n < lengths) & live
            if classes is not None:
                for r in torch.nonzero(lengths > 0).flatten().tolist():
                    policy.observe(int(n[r]), int(rejected[r]), classes[r])
            else:
                policy.observe(int(n[live].sum()), int(rejected.sum()))
        if streamer is not None:
            streamer.end()
        if drafting:
            self.draft.end()
        longest = max(len(o) for o in out)
        result = torch.full((b, longest), pad, dtype=ids.dtype, device=dev)
        for r, o in enumerate(out):
            result[r, :len(o)] = torch.tensor(o, dtype=ids.dtype)
        drafted, accepted = stats.drafted - drafted0, stats.accepted - accepted0
        stats.last = {
            "drafting": drafting, "steps": stats.steps - steps0, "undrafted_steps": stats.undrafted_steps - undrafted0,
            "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_target_forward": ((stats.emitted - emitted0) / (stats.row_steps - rows0)
                                          if stats.row_steps > rows0 else 0.0),
            "draft_seconds": stats.draft_seconds - d0, "target_seconds": stats.target_seconds - t0}
        return result
