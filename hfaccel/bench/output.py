"""Render a bench result: a rich table with gain columns, a JSON file, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError
from .runner import BASELINE

# (label, getter, format, ratio key)
_ROWS: list[tuple[str, Any, str, str | None]] = [
    ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"], "{:,.1f}", "ttft"),
    ("TPOT p50 (ms)", lambda r: r["tpot_ms"]["p50"], "{:,.2f}", "tpot"),
    ("decode tok/s (batch 1)", lambda r: r["decode_tok_s"], "{:,.1f}", "decode_tok_s"),
    ("end-to-end p50 (ms)", lambda r: r["e2e_ms"]["p50"], "{:,.0f}", "e2e_p50"),
    ("end-to-end p95 (ms)", lambda r: r["e2e_ms"]["p95"], "{:,.0f}", None),
    ("end-to-end p99 (ms)", lambda r: r["e2e_ms"]["p99"], "{:,.0f}", None),
]


def _fmt(fmt: str, value: Any) -> str:
    return "n/a" if value is None else fmt.format(value)


def render_table(result: dict[str, Any]):
    from rich.table import Table

    systems = result["systems"]
    names = list(systems)
    s = result["settings"]
    table = Table(title=(f"hfaccel bench · {result['model']['name']} ({result['model']['model_type']}) · "
                         f"preset {s['preset']} · {result['device']} · prompt {s['prompt_tokens']} tok, "
                         f"{s['new_tokens']} new, {s['runs']} runs"), title_justify="left")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for n in names[1:]:
        table.add_column(f"{n} gain", justify="right")
    rows = list(_ROWS)
    for b in s["batch"]:
        rows.append((f"throughput tok/s (batch {b})", lambda r, b=b: r["throughput_tok_s"].get(str(b)),
                     "{:,.1f}", f"throughput_b{b}"))
    rows += [("peak memory (MiB)", lambda r: r["peak_memory_mb"], "{:,.0f}", "peak_memory"),
             ("memory above idle (MiB)", lambda r: r["peak_memory_delta_mb"], "{:,.1f}", None),
             ("weights (MiB)", lambda r: r["weight_bytes"] / 2**20, "{:,.1f}", "weight_bytes")]
    for label, get, fmt, key in rows:
        cells = [_fmt(fmt, get(systems[n])) for n in names]
        gains = []
        for n in names[1:]:
            g = result["ratios"][n].get(key) if key else None
            gains.append("" if g is None else f"{g:.2f}x")
        table.add_row(label, *cells, *gains)
    return table


def correctness_line(result: dict[str, Any]) -> str:
    c = result["correctness"]
    seqs = c["checked_sequences"]
    if c["lossless"]:
        verdict = ("[green]identical greedy tokens[/]" if c["greedy_match"] else
                   f"[bold red]MISMATCH: lossless config changed greedy tokens ({100 * c['token_agreement']:.1f}% agree)[/]")
        line = f"correctness (lossless config, {seqs} sequences): {verdict}"
    else:
        line = (f"quality (lossy config): greedy token agreement {100 * c['token_agreement']:.1f}% over {seqs} "
                f"sequences")
        p = c["perplexity"]
        if p:
            line += (f"; perplexity {p[BASELINE]:.3f} -> {p['hfaccel']:.3f} ({p['delta_pct']:+.2f}%) "
                     f"on held-out CPython docs")
    lc = result["systems"].get("llama.cpp")
    if lc:
        line += (f"\nllama.cpp ({lc['gguf']}) greedy agreement with transformers: "
                 f"{100 * lc['token_agreement_with_transformers']:.1f}%")
        if lc.get("note"):
            line += f"\n{lc['note']}"
    line += "\ngain: > 1 means better than transformers (faster, more tokens/s, or less memory)"
    return line


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'hfaccel[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    names = list(systems)
    colors = {"transformers": "#888888", "hfaccel": "#e8741c", "llama.cpp": "#3b75af"}
    panels = [("decode tok/s (batch 1)", lambda r: r["decode_tok_s"]),
              ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
              ("end-to-end p50 (ms)", lambda r: r["e2e_ms"]["p50"]),
              ("weights (MiB)", lambda r: r["weight_bytes"] / 2**20)]
    batches = result["settings"]["batch"]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.6))
    for ax, (title, get) in zip(axes, panels):
        vals = [get(systems[n]) or 0 for n in names]
        bars = ax.bar(names, vals, color=[colors.get(n, "#555") for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    ax = axes[-1]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [systems[n]["throughput_tok_s"].get(str(b), 0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=n, color=colors.get(n, "#555"))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"b={b}" for b in batches])
    ax.set_title("throughput tok/s", fontsize=10)
    ax.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{result['model']['name']} · preset {s['preset']} · {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
