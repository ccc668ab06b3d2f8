"""`hfaccel export`: quantize a model folder with calibration and write a GPTQ or AWQ checkpoint that serving
engines load (vLLM, Transformers + GPT-QModel) and hfaccel reloads (hfaccel.quant.load_quantized).

The order is the one that leaves nothing half-written: check every argument and that the group size fits
every layer (before loading calibration data or quantizing), quantize through accelerate_model (one
transaction, a report of what it cost), write into a temporary folder beside OUT_DIR, and move it into place
only once every file is written.

What the folder holds, per quantized Linear (in_features K, out_features N, group G): see
hfaccel/quant/formats.py. Everything else is the model's own tensors under their own names, cast to the
export dtype (float16 by default: vLLM runs GPTQ and AWQ kernels in float16), plus config.json with its
quantization_config, generation_config.json and the tokenizer files when the model has a tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import HfaccelError
from .quant.formats import FORMATS, save_quantized
from .quant.layers import INT4_GROUPS, is_linear, linear_weight

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(HfaccelError, ValueError):
    """An export argument that cannot work with this model (named, with what is allowed)."""


@dataclass
class ExportResult:
    out_dir: Path
    fmt: str
    group_size: int
    sym: bool
    files: list[str]
    bytes_written: int
    tensors: int
    quantized_layers: int
    seconds: float
    report: Any = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"wrote {self.out_dir}: {self.fmt} int4 g{self.group_size} {'sym' if self.sym else 'asym'}, "
                f"{self.quantized_layers} quantized layers, {self.tensors} tensors in {len(self.files)} files, "
                f"{self.bytes_written / 2**20:.1f} MiB, {self.seconds:.1f} s")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"OUT_DIR {str(out_dir)!r} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"OUT_DIR {str(out_dir)!r} exists and is not empty; pass --overwrite (overwrite=True) to "
                          f"replace it, or name a new folder")


def _publish_modes(folder: Path) -> None:
    """mkdtemp makes a private folder: give it (and its files) the modes a plain mkdir / open would, so that a
    serving process running as another user can read the export."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def targets(model, quantize_lm_head: bool) -> dict[str, int]:
    """{dotted path: in_features} of the Linear layers an export quantizes."""
    from .quant.feature import head_path

    head = head_path(model)
    return {name: linear_weight(m).shape[1] for name, m in model.named_modules()
            if is_linear(m) and (quantize_lm_head or name != head)}


def pick_group_size(in_features: dict[str, int], requested: int | str) -> int:
    """The requested group size if it divides every layer's in_features; 'auto': the largest of 128, 64, 32
    that does. The formats store whole groups only."""
    if requested == "auto":
        for g in sorted(INT4_GROUPS, reverse=True):
            if all(k % g == 0 for k in in_features.values()):
                return g
        sizes = sorted(set(in_features.values()))
        raise ExportError(f"no group size of {', '.join(map(str, INT4_GROUPS))} divides every layer's in_features "
                          f"({', '.join(map(str, sizes))}): GPTQ and AWQ files store whole groups only")
    if requested not in INT4_GROUPS:
        raise ExportError(f"group size {requested!r} is not allowed; allowed: auto, "
                          f"{', '.join(map(str, INT4_GROUPS))}")
    bad = {name: k for name, k in in_features.items() if k % requested}
    if bad:
        name, k = next(iter(bad.items()))
        fits = [g for g in INT4_GROUPS if all(x % g == 0 for x in in_features.values())]
        raise ExportError(f"group size {requested} does not divide the in_features of {len(bad)} layer(s), e.g. "
                          f"{name} ({k}): GPTQ and AWQ files store whole groups only; "
                          + (f"allowed for this model: {', '.join(map(str, fits))} (or auto)" if fits
                             else "no supported group size fits this model"))
    return requested


def export_config(fmt: str, group_size: int, sym: bool, samples: int, seq_len: int, quantize_lm_head: bool
                  ) -> dict[str, Any]:
    """The accelerate_model config of an export: quantization only; no fusion (the files name the model's own
    q/k/v and gate/up layers), no weight layout, a plain dynamic cache."""
    return {"name": f"export-{fmt}", "description": f"hfaccel export --format {fmt}",
            "fusion": {"qkv": False, "gate_up": False, "rms_norm": False, "rope": False, "weight_layout": False},
            "kv_cache": {"type": "dynamic"},
            "quantization": {"method": fmt, "bits": 4, "group_size": group_size, "sym": sym,
                             "calibration_samples": samples, "calibration_seq_len": seq_len,
                             "quantize_lm_head": quantize_lm_head}}


def export_model(model_dir: str | Path, out_dir: str | Path, fmt: str = "gptq", *, group_size: int | str = "auto",
                 sym: bool = True, dtype: str = "float16", calibration_samples: int = 128,
                 calibration_seq_len: int = 512, calibration: Any = None, quantize_lm_head: bool = False,
                 max_shard_bytes: int | None = 5 * 2**30, overwrite: bool = False, log=None) -> ExportResult:
    """Quantize the model in `model_dir` ('default', 'tiny:ARCH' or a folder) and write a `fmt` checkpoint to
    `out_dir`. Every argument is checked before the model is quantized; `out_dir` appears only complete."""
    from . import accelerate_model, models
    from .config import resolve_config

    started = time.perf_counter()
    say = log or (lambda msg: None)
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)} (the serving kernels' "
                          f"activation dtypes)")
    if fmt == "awq" and quantize_lm_head:
        raise ExportError("quantize_lm_head is not allowed with format awq: AWQ loaders (vLLM, AutoAWQ) keep the "
                          "head in float; use format gptq (its config records lm_head: true)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    # the other settings are checked now, before loading; the group size is set once the layers are known
    cfg = resolve_config(export_config(fmt, 64, sym, calibration_samples, calibration_seq_len, quantize_lm_head))

    say(f"loading {model_dir}")
    model, tok = models.load(str(model_dir))
    group = pick_group_size(targets(model, quantize_lm_head), group_size)
    cfg = resolve_config(cfg, quantization={"group_size": group})
    say(f"quantizing: {fmt} int4 g{group} {'sym' if sym else 'asym'}, calibration {calibration_samples} x "
        f"{calibration_seq_len} tokens")
    report = accelerate_model(model, cfg, tokenizer=tok, calibration=calibration)
    quantized = [c for c in report.changes if c.feature == "quantize"]
    if not quantized:
        reasons = "; ".join(s.reason for s in report.skipped if s.feature in ("quantize", "architecture"))
        raise ExportError(f"nothing was quantized ({reasons or 'no layer to quantize'})")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        say(f"writing {out_dir}")
        save_quantized(model, tmp, fmt, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes)
        if tok is not None:
            tok.save_pretrained(tmp)
        _publish_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out_dir.iterdir())
    from safetensors import safe_open

    tensors = 0
    for f in out_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            tensors += len(list(fh.keys()))
    written = sum(p.stat().st_size for p in out_dir.iterdir())
    return ExportResult(out_dir, fmt, group, sym, files, written, tensors, len(quantized),
                        time.perf_counter() - started, report, list(report.notes))
