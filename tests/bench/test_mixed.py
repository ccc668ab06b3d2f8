"""`hfaccel bench --workload mixed` on a tiny model: every system runs, figures are consistent, the
workload is seeded, greedy tokens agree with the static baseline, bad settings are refused."""

from __future__ import annotations

import json

import pytest

from hfaccel import cli
from hfaccel.bench.mixed import MixedBenchSettings, make_workload, run_mixed_bench


def small(**kw) -> MixedBenchSettings:
    return MixedBenchSettings(**{"model": "tiny:llama", "requests": 10, "prompt_min": 4, "prompt_max": 50,
                                 "new_min": 2, "new_max": 16, "batch": 4, "token_budget": 32, **kw})


def test_all_systems_agree_and_report_percentiles():
    result = run_mixed_bench(small())
    rows = {r["system"]: r for r in result["rows"]}
    assert list(rows) == ["static", "transformers-cb", "hfaccel"]
    for r in rows.values():
        assert r["tokens"] == result["new_tokens"]                   # exact lengths everywhere
        assert r["throughput_tok_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p95"] <= r["ttft_ms"]["p99"]
        assert r["tpot_ms"]["p50"] <= r["tpot_ms"]["p99"]
    assert rows["hfaccel"]["agreement_vs_first"] == 1.0               # greedy, fp32: same tokens
    assert rows["hfaccel"]["reused_tokens"] == 0                      # the warm-up's prompts are not reused
    assert rows["static"]["vs_first"] == 1.0


def test_workload_is_seeded_and_within_ranges():
    s = small(requests=30)
    a = make_workload(s, None, 512)
    assert a == make_workload(s, None, 512) and a != make_workload(small(requests=30, seed=1), None, 512)
    assert all(4 <= len(p) <= 50 and 2 <= n <= 16 for p, n in a)


def test_cli_mixed_writes_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = cli.main(["bench", "--workload", "mixed", "--model", "tiny:qwen2", "--requests", "6", "--prompt-range",
                   "4-30", "--new-range", "2-8", "--batch", "3", "--systems", "static,hfaccel", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["system"] for r in data["rows"]] == ["static", "hfaccel"]
    assert "mixed workload: 6 requests" in capsys.readouterr().out


@pytest.mark.parametrize("kw,message", [({"systems": ["vllm"]}, "unknown system"),
                                        ({"prompt_min": 60}, "bad workload")])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        run_mixed_bench(small(**kw))


def test_cli_rejects_a_bad_range(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--workload", "mixed", "--prompt-range", "16..512"])
    assert "is not a range" in capsys.readouterr().err
