"""GPTQ and AWQ checkpoint formats: save hfaccel's Int4Linear layers, load such folders back.

A quantized layer `P` (a Linear of in_features K, out_features N, groups of G) is stored as:

GPTQ (checkpoint_format "gptq", i.e. v1, what Transformers + GPT-QModel and vLLM read):
    P.qweight  int32 [K/8, N]   eight 4-bit codes along K per int32, code of row 8i+j in bits 4j..4j+3
    P.qzeros   int32 [K/G, N/8] eight zero points along N per int32, stored as zero - 1 (the v1 quirk)
    P.scales   fp16  [K/G, N]
    P.g_idx    int32 [K]        group of each input row
    w[k, n] = scales[g_idx[k], n] * (q[k, n] - (stored_zero[g, n] + 1))
  checkpoint_format "gptq_v2" is read too: the same without the -1.
AWQ (version "gemm"):
    P.qweight  int32 [K, N/8]   eight codes along N per int32, columns in the order 0 2 4 6 1 3 5 7
    P.qzeros   int32 [K/G, N/8] zero points, same packing
    P.scales   fp16  [K/G, N]
    w[k, n] = scales[k // G, n] * (q[k, n] - zero[k // G, n])
Plus P.bias when the layer has one, every other tensor of the model as it is, and config.json with a
`quantization_config` (quant_method, bits, group_size, sym, desc_act, checkpoint_format / version).

hfaccel's Int4Linear keeps w = (q - 8) * scale + zero with bf16 scale/zero (what the packed kernels read):
the integer zero point is zc = 8 - zero / scale. Layers whose in_features were padded to a whole group are
saved at their padded size only in their codes' group count: K in the file is the real in_features, which
must then be a multiple of G (files from other tools always are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import HfaccelError
from .layers import INT4_GROUPS, Int4Linear, Int8Linear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = ("gptq", "awq")


class CheckpointError(HfaccelError, ValueError):
    """A quantized checkpoint that is malformed, truncated or does not match its config."""


# --- packing (int32 words of eight 4-bit values) ------------------------------------------------------

def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> [R/8, C] int32, value of row 8i+j in bits 4j."""
    r, c = codes.shape
    v = codes.to(torch.int64).reshape(r // 8, 8, c)
    word = sum(v[:, j] << (4 * j) for j in range(8))
    return _to_int32(word)


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (4 * j)) & 15 for j in range(8)]
    return torch.stack(parts, dim=1).reshape(-1, words.shape[1]).to(torch.uint8)


def pack_cols(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] codes -> [R, C/8] int32; word position j holds column 8i + order[j]."""
    r, c = codes.shape
    v = codes.to(torch.int64).reshape(r, c // 8, 8)
    word = sum(v[:, :, order[j]] << (4 * j) for j in range(8))
    return _to_int32(word)


def unpack_cols(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*w.shape, 8, dtype=torch.uint8)
    for j in range(8):
        out[..., order[j]] = ((w >> (4 * j)) & 15).to(torch.uint8)
    return out.reshape(w.shape[0], -1)


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    word = word & 0xFFFFFFFF
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


# --- one layer ----------------------------------------------------------------------------------------

def layer_tensors(layer: Int4Linear, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of one Int4Linear in format `fmt` (names without the module prefix)."""
    if layer.padded:
        raise CheckpointError(f"a layer with in_features {layer.in_features} padded to groups of {layer.group_size} "
                              f"cannot be written as {fmt}: the format needs in_features to be a multiple of the "
                              f"group size (quantize with group_size dividing {layer.in_features})")
    q = layer.codes().cpu()                                   # [N, K]
    scale = layer.scales.cpu()                                # [K/G, N]
    zc = torch.round(8 - layer.zeros.cpu() / scale).clamp(0, 15).to(torch.uint8)
    k, g = layer.in_features, layer.group_size
    out: dict[str, torch.Tensor] = {"scales": scale.to(torch.float16).contiguous()}
    if fmt == "gptq":
        out["qweight"] = pack_rows(q.T.contiguous())
        out["qzeros"] = pack_cols((zc.to(torch.int64) - 1).clamp(min=0))
        if bool((zc == 0).any()):
            raise CheckpointError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1): use "
                                  "sym quantization or the awq format")
        out["g_idx"] = (torch.arange(k) // g).to(torch.int32)
    elif fmt == "awq":
        out["qweight"] = pack_cols(q.T.contiguous(), AWQ_ORDER)
        out["qzeros"] = pack_cols(zc, AWQ_ORDER)
    else:
        raise ValueError(f"format {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(torch.float16).cpu()
    return out


def _expect(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]):
    t = tensors.get(name)
    if t is None:
        raise CheckpointError(f"tensor {name} is missing (expected shape {list(shape)})")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    return t


def layer_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, in_features: int, out_features: int,
                       qc: dict[str, Any], device: torch.device | str = "cpu") -> Int4Linear:
    """Rebuild one Int4Linear from its tensors (validated against the expected shapes)."""
    fmt = qc["quant_method"]
    g = qc["group_size"]
    k, n = in_features, out_features
    if k % g or k % 8 or n % 8:
        raise CheckpointError(f"{prefix}: in_features {k} / out_features {n} do not fit groups of {g} and words of 8")
    scale = _expect(tensors, f"{prefix}.scales", (k // g, n), (torch.float16, torch.bfloat16, torch.float32)).float()
    if fmt == "gptq":
        q = unpack_rows(_expect(tensors, f"{prefix}.qweight", (k // 8, n), (torch.int32,))).T
        zc = unpack_cols(_expect(tensors, f"{prefix}.qzeros", (k // g, n // 8), (torch.int32,))).to(torch.int64)
        if qc.get("checkpoint_format", "gptq") != "gptq_v2":
            zc = zc + 1
        g_idx = tensors.get(f"{prefix}.g_idx")
        if g_idx is not None:
            if tuple(g_idx.shape) != (k,):
                raise CheckpointError(f"tensor {prefix}.g_idx has shape {list(g_idx.shape)}, expected [{k}]")
            if g_idx.dtype not in (torch.int32, torch.int64):
                raise CheckpointError(f"tensor {prefix}.g_idx has dtype {g_idx.dtype}, expected torch.int32")
            if not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
                raise CheckpointError(f"{prefix}.g_idx is not contiguous (act-order without static groups): "
                                      f"the packed kernels need groups of consecutive input rows")
    else:
        q = unpack_cols(_expect(tensors, f"{prefix}.qweight", (k, n // 8), (torch.int32,)), AWQ_ORDER).T
        zc = unpack_cols(_expect(tensors, f"{prefix}.qzeros", (k // g, n // 8), (torch.int32,)),
                         AWQ_ORDER).to(torch.int64)
    zero = (8 - zc.float()) * scale
    bias = tensors.get(f"{prefix}.bias")
    return Int4Linear(q.contiguous().to(device), scale.to(device), zero.to(device), g,
                      bias.float().to(device) if bias is not None else None, in_features=k)


# --- whole models -------------------------------------------------------------------------------------

def save_quantized(model, path: str | Path, fmt: str = "gptq", *, dtype: torch.dtype | None = None,
                   max_shard_bytes: int | None = None) -> Path:
    """Write `model` (with hfaccel Int4Linear layers) as a GPTQ or AWQ checkpoint folder.

    An Int8Linear (an int8 head under int4 layers, `lm_head_bits: 8`) is written as the float weight it
    computes, since both formats hold 4-bit layers only; the config then unties the head.

    dtype: cast every floating tensor outside the quantized layers to this dtype and record it as the
    config's dtype (serving engines run GPTQ / AWQ kernels in float16; None keeps the model's dtypes).
    max_shard_bytes: split model.safetensors into model-0000i-of-0000n.safetensors files of at most this
    size plus model.safetensors.index.json, as Transformers' save_pretrained does (None: one file).
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not allowed; allowed: torch.float16, torch.bfloat16, torch.float32")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes} is not allowed; allowed: >= 1 or None")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    if not layers:
        raise CheckpointError("the model has no Int4Linear layer: quantize it first "
                              "(accelerate_model(model, quantization={'method': 'gptq', 'bits': 4}))")
    groups = {m.group_size for m in layers.values()}
    if len(groups) != 1:
        raise CheckpointError(f"layers use group sizes {sorted(groups)}: a checkpoint has one")
    group = groups.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, t in layer_tensors(layer, fmt).items():
            tensors[f"{name}.{key}"] = t
    # an int8 layer (lm_head_bits: 8) has no GPTQ v1 / AWQ GEMM form: it is written as the float weight it computes
    int8 = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    for name, layer in int8.items():
        tensors[f"{name}.weight"] = layer.dequantize().detach().cpu().to(dtype or torch.float32).contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype or layer.bias.dtype).contiguous()
    quantized = {**layers, **int8}
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized or any(owner.startswith(f"{name}.") for name in quantized):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and getattr(model.config, "tie_word_embeddings", False):
            continue                                   # a tied head: Transformers re-ties it on load
        seen[ptr] = key
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    qc: dict[str, Any] = {"quant_method": fmt, "bits": 4, "group_size": group,
                          "sym": all(bool((m.zeros == 0).all()) for m in layers.values())}
    head = model.get_output_embeddings()
    if fmt == "gptq":
        qc.update(desc_act=False, checkpoint_format="gptq", static_groups=True, true_sequential=True,
                  lm_head=isinstance(head, Int4Linear))
    else:
        qc.update(version="gemm", zero_point=True)
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config["architectures"] = [type(model).__name__]    # serving engines pick the model class by this name
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    if isinstance(head, (Int4Linear, Int8Linear)):
        config["tie_word_embeddings"] = False          # the head is its own (quantized or dequantized) copy
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return out


def _shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[list[str]]:
    """Tensor names split into consecutive groups of at most `limit` bytes (a bigger tensor gets its own)."""
    if limit is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def read_quant_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from e
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_file} has no quantization_config")
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(f"quantization_config.quant_method = {method!r} is not allowed; allowed: "
                              f"{', '.join(FORMATS)}")
    if qc.get("bits") != 4:
        raise CheckpointError(f"quantization_config.bits = {qc.get('bits')!r} is not supported; allowed: 4")
    if qc.get("group_size") not in INT4_GROUPS:
        raise CheckpointError(f"quantization_config.group_size = {qc.get('group_size')!r} is not supported; "
                              f"allowed: {', '.join(map(str, INT4_GROUPS))}")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"AWQ version {qc.get('version')!r} is not supported; allowed: gemm")
    if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported; "
                              f"allowed: gptq, gptq_v2")
    return qc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_file = path / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file.name} is not a safetensors index ({type(e).__name__}: {e})") from e
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            raise CheckpointError(f"{index_file.name} names shard(s) that are missing: {', '.join(absent)}")
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickled:
            raise CheckpointError(f"{path} holds only pickle files ({', '.join(pickled)}): refused, loading them "
                                  f"can run arbitrary code; convert them to safetensors")
        raise CheckpointError(f"{path} has no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f.name} is not a readable safetensors file ({e})") from e
    lost = [name for name in weight_map if name not in tensors]
    if lost:
        raise CheckpointError(f"{index_file.name} lists tensors that no shard holds: {', '.join(lost[:5])}")
    return tensors


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GPTQ (v1/v2) or AWQ (GEMM) checkpoint folder into a Transformers model with hfaccel Int4Linear
    layers. Needs neither AutoGPTQ, AutoAWQ nor GPT-QModel. Returns the model (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = read_quant_config(path)
    tensors = _read_tensors(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{path}/config.json is not a Transformers config ({type(e).__name__}: {e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config          # Transformers would hand the model to a GPTQ/AWQ backend
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not prefixes:
        raise CheckpointError(f"{path}: quantization_config says {qc['quant_method']} but no tensor ends in .qweight")
    for prefix in prefixes:
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointError(f"tensor {prefix}.qweight names no module of {type(model).__name__}") from None
        from .layers import linear_weight

        n, k = linear_weight(linear).shape
        layer = layer_from_tensors(tensors, prefix, k, n, qc, device)
        parent, _, name = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layer)
    quant_keys = {f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    rest = {k: v for k, v in tensors.items() if k not in quant_keys}
    own = model.state_dict()
    expected = {k for k in own if not any(k.startswith(p + ".") for p in prefixes)}
    for key, t in rest.items():                     # load_state_dict would raise a bare RuntimeError, or copy
        want = own.get(key)                         # integers into a float parameter without a word
        if want is None:
            continue
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, expected {list(want.shape)}")
        if t.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"tensor {key} has dtype {t.dtype}, expected "
                                  f"{'a floating dtype' if want.is_floating_point() else want.dtype}")
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k in expected]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        head = model.get_output_embeddings()
        missing = [k for k in missing if head is None or not k.startswith(_name_of(model, head))]
    if missing:
        raise CheckpointError(f"{path}: tensors missing for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: tensors that match no parameter: {', '.join(unexpected[:5])}")
    model.to(device).eval()
    model.__dict__["hfaccel_quantization"] = qc
    return model


def _name_of(model, module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "")
