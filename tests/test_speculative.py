"""Speculative decoding: token-exact greedy for every draft type at batch 1 and 4, rejection sampling that keeps
the target distribution (chi-square), attach once / revert, fallbacks, stats, config errors."""

from __future__ import annotations

import copy

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.errors import ConfigError
from hfaccel.quant.layers import QuantLinear
from hfaccel.speculative import DraftPolicy, PromptLookup, accept_sampled
from hfaccel.speculative.drafts import DraftState
from tests.conftest import StreamRecorder, needs_default_model

DRAFTS = ("prompt-lookup", "layer-skip:1", "self-int8", "self-int4", "model-path", "draft_model")


def batch(vocab: int, rows: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of different lengths; each repeats a phrase so that prompt lookup finds n-grams."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for r in range(rows):
        phrase = torch.randint(3, vocab, (6 + r,), generator=g).tolist()
        seqs.append(phrase * 2 + phrase[:3 + r])
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


def accelerated(draft: str, tmp_path, arch: str = "llama", **spec):
    model, ref = models.tiny(arch), models.tiny(arch)
    kw = {}
    # an external draft equal to the target (same seed) accepts everything: the loop's bookkeeping at full
    # acceptance; the quantized and layer-skip drafts cover partial acceptance
    if draft == "model-path":
        models.tiny(arch).save_pretrained(tmp_path / "draft")
        draft = str(tmp_path / "draft")
    elif draft == "draft_model":
        kw["draft_model"], draft = models.tiny(arch), None
    spec = {"draft": draft, "adaptive": False, **spec}       # fixed length: every step drafts
    report = hfaccel.accelerate_model(model, speculative=spec, **kw)
    return model, ref, report


@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_is_token_exact_for_every_draft_type(draft, rows, tmp_path):
    model, ref, report = accelerated(draft, tmp_path)
    assert [c.target for c in report.changes if c.feature == "speculative"] == \
        ["hfaccel_spec_stats", "hfaccel_draft", "generate"]
    ids, mask = batch(ref.config.vocab_size, rows)
    kw = {"attention_mask": mask, "max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
    want = ref.generate(ids, **kw)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    stats = model.hfaccel_spec_stats
    assert stats.calls == 1 and stats.fallback_calls == 0
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1
    assert stats.tokens_per_target_forward >= 1 and stats.steps < 23     # drafting saved target forwards
    assert stats.last["target_seconds"] > 0 and stats.last["draft_seconds"] > 0


def test_confidence_threshold_stops_drafting_early_and_stays_exact(tmp_path):
    ids, mask = batch(512, 4)
    kw = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    drafted = {}
    for threshold in (None, 0.5):
        model, ref, _ = accelerated("self-int8", tmp_path, confidence_threshold=threshold)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
        drafted[threshold] = model.hfaccel_spec_stats.drafted
    assert drafted[0.5] < drafted[None]      # a random tiny model is rarely 50% sure of its next token


def test_rows_finish_at_different_steps_on_eos_and_min_new_tokens(tmp_path):
    model, ref, _ = accelerated("layer-skip:1", tmp_path)
    ids, mask = batch(ref.config.vocab_size, 4)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 3])
    for kw in ({"eos_token_id": eos}, {"eos_token_id": [eos, int(new[2, 6])]},
               {"eos_token_id": eos, "min_new_tokens": 7}):
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=5, **kw)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=5, **kw)
        assert torch.equal(got, want), kw
    assert model.hfaccel_spec_stats.fallback_calls == 0


@pytest.mark.parametrize("kv", ["paged", "dynamic", "static"])
def test_every_cache_type_and_prefix_reuse(kv, tmp_path):
    model, ref = models.tiny("qwen2"), models.tiny("qwen2")
    hfaccel.accelerate_model(model, kv_cache={"type": kv}, speculative={"draft": "prompt-lookup"})
    ids, mask = batch(ref.config.vocab_size, 2)
    kw = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    want = ref.generate(ids, **kw)
    for _ in range(2):                     # the second call finds the prompt's blocks in the pool (paged)
        assert torch.equal(model.generate(ids, **kw), want)
    if kv == "paged":
        one = ids[:1, mask[0].argmax():].repeat(1, 3)      # 3 x a 16+-token row: full blocks to reuse
        first = model.generate(one, max_new_tokens=5)
        reused = model.hfaccel_stats.reused_tokens
        assert torch.equal(model.generate(one, max_new_tokens=5), first)
        assert model.hfaccel_stats.reused_tokens > reused
        assert torch.equal(first, ref.generate(one, max_new_tokens=5))


def test_pool_blocks_all_return_after_calls():
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "prompt-lookup"}, kv_cache={"prefix_reuse": False})
    pool = model.hfaccel_kv_pool
    free = pool.blocks.num_free
    ids, mask = batch(model.config.vocab_size, 4)
    model.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    assert pool.blocks.num_free == free


def test_streamer_gets_the_prompt_then_each_token_then_end(tmp_path):
    model, ref, _ = accelerated("prompt-lookup", tmp_path)
    ids, _ = batch(ref.config.vocab_size, 1)

    want, got = StreamRecorder(), StreamRecorder()
    a = ref.generate(ids, max_new_tokens=20, do_sample=False, streamer=want)
    b = model.generate(ids, max_new_tokens=20, do_sample=False, streamer=got)
    assert torch.equal(a, b) and got.calls == want.calls
    assert model.hfaccel_spec_stats.calls == 1


def test_assisted_arguments_take_precedence_and_other_calls_fall_back(tmp_path):
    model, ref, _ = accelerated("prompt-lookup", tmp_path)
    ids, _ = batch(ref.config.vocab_size, 1)
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3), want)
    assistant = models.tiny("llama", seed=7)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant), want)
    beams = ref.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False), beams)
    reasons = model.hfaccel_spec_stats.fallback_reasons
    assert reasons == {"assisted generation asked for by the call": 2, "num_beams=2": 1}
    assert model.hfaccel_spec_stats.calls == 0


def test_attached_once_and_revert_detaches(tmp_path):
    model, ref, _ = accelerated("layer-skip:1", tmp_path)
    before = dict(model.state_dict())
    assert "generate" in model.__dict__ and "hfaccel_draft" in model.__dict__
    assert hfaccel.revert_model(model) == []
    assert "generate" not in model.__dict__ and "hfaccel_draft" not in model.__dict__
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2   # the draft cut nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids, _ = batch(ref.config.vocab_size, 2)
    assert torch.equal(model.generate(ids, max_new_tokens=8), ref.generate(ids, max_new_tokens=8))


def test_mask_inferred_from_pad_as_generate_does(tmp_path):
    model, ref, _ = accelerated("prompt-lookup", tmp_path)
    ids, mask = batch(ref.config.vocab_size, 3)            # padded with 0 = pad_token_id, not an EOS
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), want)
    assert model.hfaccel_spec_stats.fallback_calls == 0


# ---------------------------------------------------------------------------------------------- sampling

def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probs (bins with expected < 5 merged)."""
    n = counts.sum()
    expected = probs.double() * n
    keep = expected >= 5
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:                                        # fold a small remainder into the last kept bin
        obs, exp = torch.cat([obs[:-2], (obs[-2] + obs[-1])[None]]), torch.cat([exp[:-2], (exp[-2] + exp[-1])[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(deterministic_draft):
    torch.manual_seed(0)
    v, k, n = 12, 3, 60000
    p = torch.softmax(torch.randn(k + 1, v) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v) * 1.5, -1)
    if deterministic_draft:
        drafts = torch.multinomial(q, 1)[:, 0].expand(n, k).clone()    # prompt lookup: fixed tokens, q one-hot
        qq = None
    else:
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True) for j in range(k)], 1)
        qq = q.expand(n, k, v)
    g = torch.Generator().manual_seed(1)
    accepted, nxt = accept_sampled(p.expand(n, k + 1, v), qq, drafts, torch.full((n,), k), generator=g)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)                 # the first token emitted per row
    assert chi_square_p(torch.bincount(first, minlength=v), p[0]) > 1e-3
    # the second emitted token, among rows whose first was a draft (the target's row-1 distribution; the
    # test uses context-free p, so the conditional equals p[1])
    rows = accepted > 0
    second = torch.where(accepted[rows] > 1, drafts[rows, 1], nxt[rows])
    assert chi_square_p(torch.bincount(second, minlength=v), p[1]) > 1e-3
    # negative control: taking every draft (no rejection) is detected as the wrong distribution
    if not deterministic_draft:
        assert chi_square_p(torch.bincount(drafts[:, 0], minlength=v), p[0]) < 1e-6


def test_sampled_generate_follows_the_target_distribution():
    """End to end on a tiny model: the 2nd sampled token's marginal over 3000 rows equals the exact one."""
    torch.manual_seed(0)
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "self-int4", "adaptive": False},
                             kv_cache={"type": "dynamic"})
    prompt = torch.tensor([[5, 9, 13, 5, 9]])
    n, top_k, temp = 3000, 8, 0.7
    out = model.generate(prompt.expand(n, -1), attention_mask=torch.ones(n, 5, dtype=torch.long), do_sample=True,
                         top_k=top_k, temperature=temp, max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    assert model.hfaccel_spec_stats.calls == 1 and model.hfaccel_spec_stats.drafted > 0
    from hfaccel.speculative import Sampling

    warp = Sampling(temperature=temp, top_k=top_k)
    with torch.inference_mode():
        p1 = warp.probs(ref(prompt).logits[:, -1])[0]                                  # [V]
        firsts = torch.arange(ref.config.vocab_size)[:, None]
        p2 = warp.probs(ref(torch.cat([prompt.expand(len(firsts), -1), firsts], 1)).logits[:, -1])   # [V, V]
    marginal = (p1[:, None] * p2).sum(0)
    assert chi_square_p(torch.bincount(out[:, 6], minlength=ref.config.vocab_size), marginal) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 5], minlength=ref.config.vocab_size), p1) > 1e-3


# ---------------------------------------------------------------------------------------------- parts

def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    lookup = PromptLookup()
    h = [[1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]]
    state = DraftState(torch.tensor(h), torch.ones(1, len(h[0]), dtype=torch.bool), torch.arange(14)[None],
                       torch.tensor([3]), h)
    lookup.begin(state)
    drafts, lengths, q = lookup.propose(state, 4, torch.tensor([False]))
    assert drafts.tolist() == [[7, 8, 1, 2]] and lengths.tolist() == [4] and q is None   # latest "1 2 3"
    state.history[0] += [7, 8]                              # the index grows with the output
    drafts, lengths, _ = lookup.propose(state, 4, torch.tensor([False]))
    assert drafts[0, :3].tolist() == [1, 2, 3] and lengths.tolist() == [4]


def test_policy_pads_to_the_cheapest_width_and_adapts():
    cost = [0, 1.0, 1.6, 1.9, 1.4, 1.4, 1.5]
    pol = DraftPolicy(5, adaptive=True, cost=cost)
    assert pol.width(2) == 4 and pol.width(4) == 4 and pol.width(6) == 6 and pol.width(9) == 9
    for _ in range(20):
        pol.observe(9, 1)                        # 9 accepted, 1 rejection per step: a -> 0.9
    assert abs(pol.alpha[0] - 0.9) < 0.02 and pol.choose_k(100) == 5 and pol.choose_k(3) == 2
    for _ in range(20):
        pol.observe(0, 4, cls=1)                 # another class that never pays
    ks = [pol.choose_k(100, cls=1) for _ in range(60)]
    assert [i for i, k in enumerate(ks) if k] == [3, 11, 27, 43, 59]    # probes after 4, 8, then every 16
    assert pol.choose_k(100) == 5                 # class 0 unaffected
    assert DraftPolicy(5, adaptive=False, cost=cost).choose_k(100) == 5
    asked = []
    pol = DraftPolicy(5, adaptive=True, cost=cost, measure=lambda b, compiled=None, greedy=True: (asked.append(b), ([0] + [b * 1.0] * 6, 0.1))[1])
    for b in (1, 3, 4, 2, 9, 40, 3):
        pol.use_batch(b)
    assert asked == [4, 2, 16] and pol.cost[1] == 4.0       # buckets 1, 2, 4, 8, 16+, each measured once


def test_a_draft_slower_than_its_measured_step_stops_drafting():
    """The table counts one compiled draft step; when proposing really takes longer (feeds, Python), the
    observed cost per token takes over, and drafting that no longer pays stops (probes aside)."""
    cost = [0, 10.0, 12.5, 13.8, 15.2]
    pol = DraftPolicy(3, adaptive=True, cost=cost, draft_cost=2.0)
    for _ in range(20):
        pol.observe(9, 1)                                   # a -> 0.9
    assert pol.choose_k(100) == 3 and pol.worth_drafting()
    pol.observe_draft(0.5, 0)                               # nothing proposed: nothing learned
    pol.observe_draft(1.0, 1)                               # cheaper than measured: the measurement stands
    assert pol.draft_cost == 2.0
    for _ in range(30):
        pol.observe_draft(30.0, 3)                          # 10 per token, as slow as the target's step
    assert 9.9 < pol.draft_cost <= 10.0 and pol.choose_k(100) == 0 and not pol.worth_drafting()
    pol.use_batch(1)                                        # no measure(): the table and what was seen stay
    assert pol.draft_cost > 9.9
    unmeasured = DraftPolicy(3, adaptive=True)              # unit-less costs: seconds mean nothing there
    unmeasured.observe_draft(30.0, 3)
    assert unmeasured.draft_cost == 0.0


# ---------------------------------------------------------------------------------------------- config

def test_free_drafts_choose_one_verify_width_for_the_whole_batch():
    """A verify costs its width for every row: one good match among four rows does not pay for a width that
    costs twice the one-token step, two do; at batch 1 the same match does. Probes come per step, not per row."""
    pol = DraftPolicy(10, adaptive=True, cost=[0, 1.0] + [2.0] * 11)
    pol.alpha[3] = 0.9
    assert pol.plan_rows([5, 0, 0, 0], [3, None, None, None], live=4) == [0, 0, 0, 0]
    assert pol.plan_rows([5, 7, 0, 0], [3, 3, None, None], live=4) == [5, 7, 0, 0]
    assert pol.plan_rows([9, 2, 0, 0], [3, 3, None, None], live=4) == [9, 2, 0, 0]
    one = DraftPolicy(10, adaptive=True, cost=[0, 1.0] + [1.4] * 11)
    one.alpha[3] = 0.9
    assert one.plan_rows([5], [3], live=1) == [5]
    assert DraftPolicy(10, adaptive=False, cost=[0, 1.0] + [2.0] * 11).plan_rows([5, 0], [3, None], live=2) == [5, 0]
    pol.alpha[1] = 0.05            # a width that costs 2x the step cannot pay even at the probe ceiling's 90%
    assert not any(any(pol.plan_rows([4, 4, 4, 4], [1, 1, 1, 1], live=4)) for _ in range(40))
    cheaper = DraftPolicy(10, adaptive=True, cost=[0, 1.0] + [1.7] * 11)
    cheaper.alpha[1] = 0.05                            # a class that never pays: probed after 4, 8, then 16 steps
    drafted = [i for i in range(40) if any(cheaper.plan_rows([4, 4, 4, 4], [1, 1, 1, 1], live=4))]
    assert drafted == [3, 11, 27], drafted
    # a probe only where the proposing rows could pay at 90%: one row of four cannot (4.9 / 1.7 < 4 tokens per
    # step); the class stays due and is probed at the first step where all four propose
    again = DraftPolicy(10, adaptive=True, cost=[0, 1.0] + [1.7] * 11)
    again.alpha[1] = 0.05
    assert not any(any(again.plan_rows([4, 0, 0, 0], [1, None, None, None], live=4)) for _ in range(10))
    assert again.plan_rows([4, 4, 4, 4], [1, 1, 1, 1], live=4) == [1, 1, 1, 1]


def test_a_batch_size_where_no_draft_length_can_pay_does_not_start_the_draft(tmp_path, monkeypatch):
    # the measured shape of SmolLM2 at batch 4 on 2 cores: verify widths cost 1.6-2.7x the one-token step
    batch4 = DraftPolicy(5, adaptive=True, cost=[0, 13.8, 22.7, 25.6, 29.5, 34.7, 37.4], draft_cost=7.0)
    batch1 = DraftPolicy(5, adaptive=True, cost=[0, 10.1, 13.6, 16.2, 13.2, 16.2, 17.8], draft_cost=4.0)
    assert not batch4.worth_drafting() and batch1.worth_drafting()
    batch4.alpha[0] = 0.995                      # a draft measured to agree almost always: worth it again
    assert batch4.worth_drafting()
    assert DraftPolicy(5, adaptive=False, cost=[0, 13.8, 22.7, 25.6, 29.5, 34.7, 37.4],
                       draft_cost=7.0).worth_drafting()
    model, ref, _ = accelerated("self-int8", tmp_path)
    monkeypatch.setattr(DraftPolicy, "worth_drafting", lambda self, cls=0: False)
    draft = model.hfaccel_draft
    monkeypatch.setattr(draft, "begin", lambda state: pytest.fail("the draft was started"))
    ids, mask = batch(ref.config.vocab_size, 4)
    kw = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    stats = model.hfaccel_spec_stats
    assert stats.undrafted_calls == 1 and stats.drafted == 0 and stats.last["drafting"] is False
    assert stats.last["undrafted_steps"] == stats.last["steps"] == 15


def test_an_undrafted_compiled_call_runs_the_compiled_decoders_own_loop(monkeypatch):
    """When no draft will be tried (a model draft that cannot pay at this batch size), the call hands the
    rest to the compiled decode loop instead of stepping through the speculative loop's bookkeeping: same
    tokens, same streamer calls as plain compiled decoding, no verify step, no draft prefill."""
    from hfaccel.speculative.loop import Verifier

    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "self-int8"}, compile={"enabled": True})
    monkeypatch.setattr(DraftPolicy, "worth_drafting", lambda self, cls=0: False)
    monkeypatch.setattr(model.hfaccel_draft, "begin", lambda state: pytest.fail("the draft was started"))
    monkeypatch.setattr(Verifier, "_greedy_step", lambda *a: pytest.fail("stepped through the speculative loop"))
    for rows, seed in ((1, 3), (3, 5)):
        ids, mask = batch(ref.config.vocab_size, rows, seed)
        kw = {"attention_mask": mask, "max_new_tokens": 14, "do_sample": False, "pad_token_id": 0}
        got, want = StreamRecorder(), StreamRecorder()
        assert torch.equal(model.generate(ids, streamer=got, **kw), ref.generate(ids, streamer=want, **kw))
        if rows == 1:                                       # generate() streams batch 1 only
            assert got.calls == want.calls
        last = model.hfaccel_spec_stats.last
        assert last["drafting"] is False and last["undrafted_steps"] == last["steps"] == 13
    assert model.hfaccel_compile_stats.fallback_calls == 0


def test_bad_drafts_are_refused_before_any_change(tmp_path):
    model = models.tiny("llama")
    with pytest.raises(ConfigError, match=r"layer-skip:2' is not allowed for a model of 2 layers; allowed: "
                                          r"layer-skip:1 to layer-skip:1"):
        hfaccel.accelerate_model(model, speculative={"draft": "layer-skip:2"})
    with pytest.raises(ConfigError, match="neither prompt-lookup, self-int8, self-int4, layer-skip:N nor a model"):
        hfaccel.accelerate_model(model, speculative={"draft": str(tmp_path / "nothing")})
    other = models.tiny("llama", vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary has 300 entries, the target's 512"):
        hfaccel.accelerate_model(model, draft_model=other)
    assert "generate" not in model.__dict__ and "_hfaccel_state" not in model.__dict__


def test_skips_with_reasons():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, "cpu-int8", speculative={"draft": "self-int8"})
    reason = next(s.reason for s in report.skipped if s.feature == "speculative")
    assert "the target is already quantized (rtn, 8 bit)" in reason
    assert not any(s.feature == "compile" and "speculative" in s.reason for s in report.skipped)
    gemma = models.tiny("gemma")
    if any(t != "full_attention" for t in (getattr(gemma.config, "layer_types", None) or [])):
        rep = hfaccel.accelerate_model(gemma, speculative={"draft": "prompt-lookup"})
        assert any(s.feature == "speculative" and "sliding" in s.reason for s in rep.skipped)


@pytest.mark.parametrize("draft", ["prompt-lookup", "self-int8"])
def test_compiled_verify_step_is_token_exact_without_recompiling(draft, tmp_path):
    model, ref = models.tiny("llama"), models.tiny("llama")
    report = hfaccel.accelerate_model(model, speculative={"draft": draft, "adaptive": False, "num_draft_tokens": 4},
                                      compile={"enabled": True})
    assert "hfaccel_compiled_verify" in [c.target for c in report.changes if c.feature == "compile"]
    assert not any(s.feature == "compile" for s in report.skipped)
    stats = model.hfaccel_compile_stats
    assert stats.compilations == 2 and stats.warmup_seconds > 0      # width 1, and widths 2-5 in one graph
    built = []
    for rows, seed in ((1, 3), (1, 8), (4, 3), (4, 5)):
        ids, mask = batch(ref.config.vocab_size, rows, seed)
        kw = {"attention_mask": mask, "max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw)), (rows, seed)
        assert model.hfaccel_spec_stats.last["accepted"] > 0
        built.append(stats.compilations)
    # batch 1 needs nothing new; batch 4 builds its dynamic-width graph, and its width-1 graph only if a
    # verify is padded to width 1 (the cheapest width >= what is needed, from measured costs, so it varies
    # with the machine's load): never more than the two graphs per batch size
    assert built[:2] == [2, 2] and 3 <= built[2] <= built[3] <= 4, built
    assert stats.compiled_calls == 4 and stats.fallback_calls == 0
    # sampling runs through the same compiled verify: top_k=1 is greedy
    ids, mask = batch(ref.config.vocab_size, 2, 11)
    kw = {"attention_mask": mask, "max_new_tokens": 12, "pad_token_id": 0}
    got = model.generate(ids, do_sample=True, top_k=1, temperature=0.7, **kw)
    assert torch.equal(got, ref.generate(ids, do_sample=False, **kw)) and stats.compiled_calls == 5
    hfaccel.revert_model(model)
    assert "hfaccel_compiled_verify" not in model.__dict__ and model.config._attn_implementation == \
        ref.config._attn_implementation


def test_compiled_greedy_step_takes_the_steps_no_row_drafts(tmp_path):
    """A step in which no row drafts runs the compiled one-token step, each row at its own column (rows have
    accepted different numbers of drafts before it), EOS and min_new_tokens per row: still greedy's tokens."""
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "prompt-lookup", "adaptive": False, "num_draft_tokens": 3},
                             compile={"enabled": True, "certified_head": False})
    draft = model.hfaccel_draft
    propose, calls = draft.propose, []

    def every_other_step(state, k, done, sampling=None):        # no row drafts on every second step
        drafts, lengths, q = propose(state, k, done, sampling)
        calls.append(1)
        return drafts, lengths * (len(calls) % 2), q

    draft.propose = every_other_step
    ids, mask = batch(ref.config.vocab_size, 4)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 9])
    for kw in ({}, {"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 12}):
        kw = {"attention_mask": mask, "max_new_tokens": 30, "do_sample": False, "pad_token_id": 5, **kw}
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw)), kw
        last = model.hfaccel_spec_stats.last
        assert last["undrafted_steps"] >= 3 and last["accepted"] > 0, last
    assert model.hfaccel_compile_stats.compiled_calls == 3 and model.hfaccel_compile_stats.fallback_calls == 0


@pytest.mark.parametrize("draft", ["layer-skip:1", "self-int4", "draft_model"])
def test_compiled_model_drafts_are_token_exact_and_keep_each_rows_history_in_its_columns(draft, tmp_path):
    """A model draft runs through a compiled step of its own. Greedy output stays exact at batch 1 and 4,
    nothing recompiles on later calls, and after a call every row's buffer columns hold the K/V an eager
    forward over that row's history gives (what greedy tokens of a random tiny model would hardly show)."""
    from transformers import DynamicCache

    model, ref = models.tiny("llama"), models.tiny("llama")
    user_draft = models.tiny("llama")                 # the target itself: everything is accepted
    before = user_draft.config._attn_implementation
    kw = {"draft_model": user_draft} if draft == "draft_model" else {}
    spec = {"draft": None if draft == "draft_model" else draft, "num_draft_tokens": 4, "adaptive": False}
    report = hfaccel.accelerate_model(model, speculative=spec, compile={"enabled": True}, **kw)
    assert "hfaccel_draft.compiled" in [c.target for c in report.changes if c.feature == "compile"]
    d = model.hfaccel_draft
    stats = d.compiled.stats
    # bf16 anywhere in the draft (its parameters, or the activations its int layers round to bf16 around their
    # kernels) leaves compiled and eager K/V a bf16 rounding step apart; a wrong column is off by far more
    rounded = any(p.dtype == torch.bfloat16 for p in d.model.parameters()) or \
        any(isinstance(m, QuantLinear) for m in d.model.modules())
    tol = {"rtol": 2e-2, "atol": 2e-2} if rounded else {}
    for rows, seed in ((1, 3), (4, 3), (4, 5), (1, 8)):
        ids, mask = batch(ref.config.vocab_size, rows, seed)
        kw = {"attention_mask": mask, "max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
        got = model.generate(ids, **kw)
        assert torch.equal(got, ref.generate(ids, **kw)), (rows, seed)
        assert model.hfaccel_spec_stats.last["accepted"] > 0
        if rows == 4 and seed == 3:
            compilations = stats.compilations
        buf = d.compiled._buffers
        for r in range(rows):
            history = ids[r][mask[r].bool()].tolist() + got[r, ids.shape[1]:].tolist()
            seq = torch.tensor([history[:d.seen[r]]])
            with torch.inference_mode():
                cache = DynamicCache(config=d.model.config)
                d.model(input_ids=seq, past_key_values=cache, use_cache=True)
            for layer in range(len(buf.keys)):
                cols = slice(d.offset[r], d.offset[r] + d.seen[r])
                torch.testing.assert_close(buf.keys[layer][r, :, cols], cache.layers[layer].keys[0], **tol)
                torch.testing.assert_close(buf.values[layer][r, :, cols], cache.layers[layer].values[0], **tol)
    assert stats.compiled_calls == 4 and stats.fallback_calls == 0 and stats.compilations == compilations
    hfaccel.revert_model(model)
    assert "hfaccel_draft" not in model.__dict__
    assert user_draft.config._attn_implementation == before      # the user's draft model is given back as it was


def test_compiled_verify_logits_follow_each_rows_own_columns():
    """Logits of two compiled verify steps, rows advancing by different accepted counts, against a plain
    forward over each row's own tokens (sensitive to every cached column, unlike greedy tokens of a tiny
    random model)."""
    from transformers import DynamicCache

    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "prompt-lookup", "num_draft_tokens": 3},
                             compile={"enabled": True})
    dec = model.hfaccel_compiled_verify
    ids, mask = batch(ref.config.vocab_size, 3)
    b, p = ids.shape
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        buf = dec.load_prefill(cache, p, mask.bool(), 40)
        dec.verify_costs(b, 4)                      # measuring must not touch a decode in progress
        col = torch.full((b,), p)
        rows = [ids[r][mask[r].bool()].tolist() for r in range(b)]
        for accepted in ([1, 3, 0], [2, 0, 4]):
            step = torch.randint(3, ref.config.vocab_size, (b, 4), generator=g)
            pos = torch.tensor([len(r) for r in rows])[:, None] + torch.arange(4)
            got = dec.verify(buf, step, pos, col)
            for r in range(b):
                seq = torch.tensor([rows[r] + step[r].tolist()])
                want = ref(seq).logits[0, -4:]
                torch.testing.assert_close(got[r], want, rtol=1e-4, atol=1e-4)
                rows[r] += step[r, :accepted[r]].tolist()
            col = col + torch.tensor(accepted)


def test_layer_skip_draft_shares_parameters_and_leaves_the_target_whole():
    from hfaccel.speculative import layer_skip

    model = models.tiny("qwen2")
    draft = layer_skip(model, 1)
    assert draft.model.layers[0] is model.model.layers[0] and len(draft.model.layers) == 1
    assert draft.lm_head.weight is model.lm_head.weight and len(model.model.layers) == 2
    assert model.config.num_hidden_layers == 2 and draft.config.num_hidden_layers == 1
    ids = torch.tensor([[4, 5, 6]])
    with torch.inference_mode():
        full = copy.deepcopy(model)
        full.model.layers = full.model.layers[:1]
        full.config.num_hidden_layers = 1
        assert torch.allclose(draft(ids).logits, full(ids).logits)


@pytest.mark.slow
@needs_default_model
@pytest.mark.parametrize("preset, draft", [("low-latency", "prompt-lookup"), (None, "self-int8")])
def test_default_model_speculative_is_token_exact(default_model, preset, draft):
    model, tok = default_model
    fast = copy.deepcopy(model)
    report = hfaccel.accelerate_model(fast, preset, speculative={"draft": draft})
    assert report.lossless and any(c.feature == "speculative" for c in report.changes)
    tok = copy.copy(tok)
    tok.padding_side = "left"
    passage = "The quick brown fox jumps over the lazy dog. " * 3
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in (f"Repeat this text exactly: {passage}", "Write a haiku about autumn.",
                       "def fibonacci(n):", "Name three colours.")]
    enc = tok(texts, return_tensors="pt", padding=True)
    for rows in (1, 4):
        ids, mask = enc.input_ids[:rows], enc.attention_mask[:rows]
        if rows == 1:
            ids, mask = ids[:, mask[0].argmax():], mask[:, mask[0].argmax():]
        want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        assert torch.equal(got, want)
    stats = fast.hfaccel_spec_stats
    assert stats.calls == 2 and stats.accepted > 0
