"""Run under torchrun (2 processes, gloo on CPU): load a tiny model with tp_plan="auto", accelerate it with each
config named on the command line, and write what every rank saw as JSON (one file per rank)."""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist


def main(model_dir: str, out_prefix: str, configs: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    import hfaccel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # 5.x prefers distributed_config=; both work
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
        except TypeError:                                     # a version that dropped tp_plan=
            from transformers import DistributedConfig

            model = AutoModelForCausalLM.from_pretrained(
                model_dir, distributed_config=DistributedConfig(tp_plan="auto")).eval()
    rank = dist.get_rank()
    x = torch.tensor([[5, 7, 9, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53, 59, 61, 67]])
    results = {}
    named = {"none": None, "rtn-int4": {"name": "rtn-int4", "kv_cache": {"type": "paged"},
                                        "quantization": {"method": "rtn", "bits": 4, "group_size": 32}}}
    for name in configs:
        # cpu-fast with its projections fused (the preset itself packs them unfused): fusion on shards
        cfg = hfaccel.config.resolve_config("cpu-fast", fusion={"qkv": True, "gate_up": True}) \
            if name == "cpu-fast" else named.get(name, name)
        report = hfaccel.accelerate_model(model, cfg)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
        with torch.no_grad():
            logits = model(x).logits
        layer = model.model.layers[0]
        pool = getattr(model, "hfaccel_kv_pool", None)
        results[name] = {
            "tokens": out.tolist(),
            "logits": logits[:, -1].tolist(),
            "changes": [[c.feature, c.target, c.after] for c in report.changes],
            "skipped": {s.feature: s.reason for s in report.skipped},
            "notes": report.notes,
            "device": report.device,
            "q_proj": [type(layer.self_attn.q_proj).__name__, layer.self_attn.q_proj.out_features],
            "o_proj": type(layer.self_attn.o_proj).__name__,
            "pool_kv_heads": None if pool is None else pool.keys.shape[1],
        }
        hfaccel.revert_model(model, strict=False)
        again = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
        results[name]["tokens_after_revert"] = again.tolist()
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
