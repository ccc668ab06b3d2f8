"""The certified head (hfaccel/certified_head.py), its bf16 and int8 copies: the bounds hold, a pick it
certifies is the fp32 argmax, what it cannot rule out is reported and redone with the fp32 head, and greedy
decoding through it is token-exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hfaccel
from hfaccel import certified_head, models
from hfaccel.certified_head import INT8_ROWS, KINDS, CertifiedHead, build, int8_available
from tests.conftest import greedy, needs_default_model, prompts
from tests.test_compile import left_padded


def head_of(v: int = 3000, d: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) * 0.05
    h = torch.randn(16, d, generator=g) * 8
    return w, h


def kinds():
    return [pytest.param(k, marks=pytest.mark.skipif(k == "int8" and not int8_available(),
                                                     reason="hfaccel's int8 CPU kernel is not built here"))
            for k in KINDS]


@pytest.mark.parametrize("kind", kinds())
def test_the_bound_covers_the_copys_error_and_a_certified_pick_is_the_fp32_argmax(kind):
    w, h = head_of()
    w[5] *= 20                                               # one row far larger than the rest (a rare token)
    cert = CertifiedHead(w, kind)
    if kind == "int8":                                       # the rows its int8 copy serves
        h = h[:INT8_ROWS]
    z = h @ w.T
    a = cert.approx(h)
    err = (z - a).abs()
    per_token = cert.token_bounds(h, a)
    assert (err.amax(dim=-1) > 0).all() and (err <= per_token).all()
    assert (per_token <= cert.bound(h, a)[:, None]).all()
    if kind == "int8":                                       # its own row's error, not the largest row's
        assert (per_token[:, 5] > 10 * per_token[:, 4]).all()
    token, checked = cert.pick(h, torch.zeros(w.shape[0], dtype=torch.bool))
    assert checked.all()
    assert torch.equal(token, z.argmax(dim=-1))


@pytest.mark.skipif(not int8_available(), reason="hfaccel's int8 CPU kernel is not built here")
def test_an_int8_head_reads_its_bf16_copy_past_int8_rows_and_shares_it():
    w, h = head_of()
    bf16 = CertifiedHead(w)
    int8 = CertifiedHead(w, "int8", bf16=bf16)
    assert int8.low is bf16.low and int8.bytes == int8.copies[0].bytes + bf16.bytes
    many, few = h[:INT8_ROWS + 1], h[:INT8_ROWS]
    assert torch.equal(int8.approx(many), bf16.approx(many))
    assert not torch.equal(int8.approx(few), bf16.approx(few))
    for rows in (few, many):
        token, checked = int8.pick(rows, torch.zeros(w.shape[0], dtype=torch.bool))
        assert checked.all() and torch.equal(token, (rows @ w.T).argmax(dim=-1))


def test_an_unknown_kind_is_refused_by_name():
    w, _ = head_of(v=64)
    with pytest.raises(ValueError, match="'fp8' is not allowed; allowed: bf16, int8"):
        CertifiedHead(w, "fp8")


def test_the_bf16_copy_is_row_major_when_the_head_is_column_major():
    """weight_layout may leave the fp32 head column-major; a column-major bf16 copy made aten's GEMV 40x slower
    on an AVX2 CPU (186 ms vs 4.7 ms for 49152x576), so the copy is always row-major."""
    w, h = head_of()
    col = w.t().contiguous().t()
    cert = CertifiedHead(col)
    assert cert.weight.data_ptr() == col.data_ptr()                       # the fp32 weight is not copied
    if isinstance(cert.low, nn.Linear):
        assert cert.low.weight.is_contiguous()
    torch.testing.assert_close(cert.approx(h), CertifiedHead(w).approx(h), rtol=0, atol=0)


@pytest.mark.parametrize("kind", kinds())
def test_blocked_tokens_are_never_picked(kind):
    w, h = head_of(seed=1)
    z = h @ w.T
    blocked = torch.zeros(w.shape[0], dtype=torch.bool)
    blocked[z.argmax(dim=-1)] = True                        # every row's favourite
    token, checked = CertifiedHead(w, kind).pick(h, blocked)
    assert checked.all() and not blocked[token].any()
    assert torch.equal(token, z.masked_fill(blocked, float("-inf")).argmax(dim=-1))


@pytest.mark.parametrize("kind", kinds())
def test_a_rival_outside_the_candidates_leaves_the_pick_unchecked_and_ties_go_to_the_lowest_id(kind):
    w, h = head_of(v=500, seed=2)
    h = h[:1]
    best = int((h @ w.T).argmax())
    w[7] = w[best] * (1 + 1e-6)                              # a near twin: within any copy's error of the best
    cert = CertifiedHead(w, kind)
    cert.k = 1                                               # only one candidate: the twin is outside it
    _, checked = cert.pick(h, torch.zeros(500, dtype=torch.bool))
    assert not checked.any()
    w[7] = w[best]                                           # exact twins: both candidates now
    cert = CertifiedHead(w, kind)
    token, checked = cert.pick(h, torch.zeros(500, dtype=torch.bool))
    assert checked.all() and int(token) == min(7, best) == int((h @ w.T).argmax())


def test_refused_where_logits_are_not_the_head_of_the_last_hidden_state():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, final_logit_softcapping=30.0)).eval()
    cert, why = build(model)
    assert cert is None and "capped logits" in why
    model.lm_head = nn.Sequential(model.lm_head)
    assert build(model) == (None, "the head is a Sequential")


@pytest.fixture
def always_used(monkeypatch):
    """The tiny models' heads are too small to be measured faster: use the certified head anyway."""
    monkeypatch.setattr(certified_head, "MIN_GAIN", 0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2"])
def test_greedy_through_the_certified_head_equals_transformers(arch, always_used):
    model, ref = models.tiny(arch), models.tiny(arch)
    report = hfaccel.accelerate_model(model, kv_cache={"type": "paged", "max_cache_tokens": 4096},
                                      compile={"enabled": True})
    assert any(c.target == "lm_head (compiled greedy steps)" for c in report.changes), report.notes
    vocab = ref.config.vocab_size
    one = prompts(vocab, batch=1, length=11)
    assert torch.equal(greedy(model, one, n=20), greedy(ref, one, n=20))
    ids, mask = left_padded(vocab)
    assert torch.equal(greedy(model, ids, mask, n=16), greedy(ref, ids, mask, n=16))
    assert model.hfaccel_compile_stats.compiled_calls == 2


def picks_wrong_and_unchecked(monkeypatch) -> None:
    """Every certified pick returns a wrong token and reports it unchecked: only the fp32 redo can be right."""
    real = CertifiedHead.pick

    def wrong_and_unchecked(self, h, blocked, rows=None):
        token, _ = real(self, h, blocked, rows)
        return (token + 1) % self.weight.shape[0], torch.zeros_like(token, dtype=torch.bool)

    monkeypatch.setattr(CertifiedHead, "pick", wrong_and_unchecked)


def test_a_pick_that_fails_its_check_is_redone_with_the_fp32_head(always_used, monkeypatch):
    picks_wrong_and_unchecked(monkeypatch)
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, compile={"enabled": True})
    ids, mask = left_padded(ref.config.vocab_size)
    before = model.hfaccel_compile_stats.head_fallbacks           # the warm-up's steps
    assert torch.equal(greedy(model, ids, mask, n=12), greedy(ref, ids, mask, n=12))
    assert model.hfaccel_compile_stats.head_fallbacks - before == 11     # every step after the prefill's token


def test_off_by_config_reported_lossless_and_gone_after_revert(always_used):
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, compile={"enabled": True, "certified_head": False})
    assert not any(c.target.startswith("lm_head") for c in report.changes)
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, compile={"enabled": True})
    change = next(c for c in report.changes if c.target == "lm_head (compiled greedy steps)")
    assert change.lossless and change.reversible and report.lossless
    assert "+0 MiB" in change.after and "best 64" in change.after
    cert = model.hfaccel_certified_head
    assert f"{cert.kind} copy" in change.after                                  # the faster of the two here
    vocab, hidden = model.lm_head.weight.shape
    int8_bytes = vocab * hidden + 2 * vocab * 4 + vocab * 2          # codes, scales (fp32, bf16), row bounds
    assert cert.bytes == vocab * hidden * 2 + (int8_bytes if cert.kind == "int8" else 0)
    assert report.weight_bytes_after - report.weight_bytes_before == cert.bytes
    hfaccel.revert_model(model)
    assert "generate" not in model.__dict__ and not hasattr(model, "hfaccel_compile_stats")
    assert not hasattr(model, "hfaccel_certified_head")


@needs_default_model
@pytest.mark.parametrize("kind", kinds())
def test_certifies_every_position_of_real_text_on_the_default_model(default_model, kind):
    import pydoc_data.topics

    model, tok = default_model
    text = pydoc_data.topics.topics["assert"][:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.inference_mode():
        h = model.model(input_ids=ids).last_hidden_state[0]
        want = model.lm_head(h).argmax(dim=-1)
    cert = CertifiedHead(model.lm_head.weight, kind)
    token, checked = cert.pick(h, torch.zeros(cert.weight.shape[0], dtype=torch.bool))
    assert checked.all()
    assert torch.equal(token, want)


@pytest.mark.parametrize("unchecked", [False, True])
def test_speculative_verify_picks_through_the_certified_head(always_used, monkeypatch, unchecked):
    """Under speculative decoding the compiled greedy verify (any width) and the one-token step pick through
    the certified head too; a pick that fails its check is redone with the fp32 head. Tokens stay greedy's,
    EOS and min_new_tokens included."""
    from tests.test_speculative import batch

    if unchecked:
        picks_wrong_and_unchecked(monkeypatch)
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, speculative={"draft": "prompt-lookup", "num_draft_tokens": 4, "adaptive": False},
                             compile={"enabled": True})
    assert "hfaccel_certified_head" in model.__dict__
    ids, mask = batch(ref.config.vocab_size, 4)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = int(free[2, ids.shape[1] + 5])
    before, steps = model.hfaccel_compile_stats.head_fallbacks, 0
    for kw in ({}, {"eos_token_id": eos, "min_new_tokens": 8}):
        kw = {"attention_mask": mask, "max_new_tokens": 24, "do_sample": False, "pad_token_id": 0, **kw}
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw)), kw
        last = model.hfaccel_spec_stats.last
        assert last["accepted"] > 0 and last["undrafted_steps"] < last["steps"], last
        steps += last["steps"]
    if unchecked:                     # every step (one-token or verify) redid its picks once
        assert model.hfaccel_compile_stats.head_fallbacks - before == steps
