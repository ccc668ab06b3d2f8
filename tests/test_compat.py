"""Transformers-version shims: the cache argument's name (past_key_values before 5.24, cache from 5.24)."""

from __future__ import annotations

from types import SimpleNamespace

from hfaccel.compat import cache_arg, given_cache, output_cache


class Old:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        pass


class New:
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        pass


def test_cache_argument_takes_the_name_forward_declares():
    c = object()
    assert cache_arg(Old(), c) == {"past_key_values": c}
    assert cache_arg(New(), c) == {"cache": c}


def test_a_call_or_an_output_carries_its_cache_under_either_name():
    c = object()
    assert given_cache({"past_key_values": c}) is c and given_cache({"cache": c}) is c
    assert given_cache({"cache": None, "use_cache": True}) is None
    assert output_cache(SimpleNamespace(cache=c)) is c
    assert output_cache(SimpleNamespace(past_key_values=c)) is c
    assert output_cache(SimpleNamespace(sequences=1)) is None
