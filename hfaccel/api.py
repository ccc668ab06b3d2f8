"""accelerate_model / revert_model: resolve -> plan -> apply -> report."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from . import __version__
from .config import AccelConfig, resolve_config
from .device import Context, weight_bytes
from .errors import AccelError, RevertError
from .placement import adapter_layers
from .registry import Plan, features
from .report import AccelReport, Change, Skip
from .rewrite import Rewriter

_STATE = "_hfaccel_state"


@dataclass
class _State:
    config: AccelConfig
    rewriter: Rewriter
    report: AccelReport


def _unwrap_peft(model: Any) -> tuple[Any, str | None]:
    """(the Transformers model to rewrite, a note) for a PEFT model (PeftModel, PeftModelForCausalLM: adapters
    injected, not merged); (model, None) for anything else."""
    if not type(model).__module__.startswith("peft.") or not callable(getattr(model, "get_base_model", None)):
        return model, None
    base = model.get_base_model()
    adapters = adapter_layers(base)
    kinds = sorted({type(base.get_submodule(p)).__module__.split(".")[-2] for p in adapters})
    note = (f"PEFT {type(model).__name__}: accelerated the {type(base).__name__} inside it; {len(adapters)} adapter "
            f"layers ({', '.join(kinds) or '-'}) are left as they are - fusion and quantization skip them "
            f"(model.merge_and_unload() first to include them)")
    return base, note


def _check_model(model: Any) -> None:
    from transformers import GenerationMixin, PreTrainedModel

    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, nn.Module) and isinstance(inner, PreTrainedModel):
        raise TypeError(f"accelerate_model got a torch.compile wrapper ({type(model).__name__}) around "
                        f"{type(inner).__name__}; pass the model itself (wrapper._orig_mod) and let hfaccel's "
                        f"compile: section compile the decode step")
    if not isinstance(model, PreTrainedModel) or not isinstance(model, GenerationMixin):
        raise TypeError(f"accelerate_model expects a loaded transformers causal LM (a PreTrainedModel with "
                        f"generate(), e.g. from AutoModelForCausalLM.from_pretrained), got {type(model).__name__}")
    from .placement import Placement

    placement = Placement.detect(model)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"
            and not (placement and placement.is_offloaded(n.rpartition(".")[0]))]
    if meta:
        raise ValueError(f"the model has {len(meta)} parameter(s) on the meta device (e.g. {meta[0]}): its weights "
                         f"are not loaded; load them (from_pretrained, or load_state_dict(assign=True)) first")


def plan_features(model: nn.Module, ctx: Context, cfg: AccelConfig) -> tuple[list[Plan], list[Skip]]:
    """Ask every registered feature, in stage order, what it would do. Touches nothing."""
    plans: list[Plan] = []
    skips: list[Skip] = []
    for entry in features():
        outcome = entry.planner(model, ctx, cfg)
        if isinstance(outcome, Plan):
            plans.append(outcome)
        elif isinstance(outcome, Skip):
            skips.append(outcome)
    if ctx.spec is None:
        skips.append(Skip("architecture", f"generic features only: {ctx.spec_problem}"))
    return plans, skips


def accelerate_model(model: nn.Module, config: Any = None, *, tokenizer: Any = None, calibration: Any = None,
                     draft_model: Any = None, **overrides: Any) -> AccelReport:
    """Rewrite `model` in place for speed and return what was done.

    config: a preset name (`hfaccel presets`), a YAML path, a dict, an AccelConfig, or None for the
    lossless defaults. Keyword overrides use the config's own section names, e.g.
    `quantization={"method": "awq", "bits": 4}`. model.generate() keeps its signature.
    tokenizer, calibration: for calibrated quantization (gptq): the tokenizer of the calibration text
    (default: the one saved beside the model) and the text itself (a string, a list of strings or a
    datasets.Dataset with a "text" column; default: the CPython docs' calibration slice).
    draft_model: an already-loaded causal LM sharing the model's tokenizer, used as the speculative draft
    (instead of speculative.draft).
    """
    cfg = resolve_config(config, **overrides)           # 1. resolve: ConfigError before any change
    model, peft_note = _unwrap_peft(model)
    _check_model(model)
    state: _State | None = model.__dict__.get(_STATE)
    if state is not None:
        note = "already accelerated: this call changed nothing"
        if state.config != cfg:
            note += (f" (it asked for config {cfg.name!r}, the model has {state.config.name!r}; "
                     f"call hfaccel.revert_model(model) first to apply another config)")
            warnings.warn(note, stacklevel=2)
        return replace(state.report, noop=True, notes=[*state.report.notes, note])

    ctx = Context.detect(model)
    ctx.tokenizer, ctx.calibration, ctx.draft_model = tokenizer, calibration, draft_model
    plans, skips = plan_features(model, ctx, cfg)        # 2. plan: complete before the model is touched
    if model.training:
        warnings.warn("hfaccel: the model is in training mode; generate-time features apply, fused projections "
                      "are refused (their fused weights would get no gradients); call model.eval() for "
                      "inference", stacklevel=2)

    before = weight_bytes(model)
    rw = Rewriter(model)
    for plan in plans:                                   # 3. apply, as one transaction
        rw.feature = plan.feature
        try:
            plan.apply(rw)
        except Exception as e:
            stuck = rw.rollback()
            assert not stuck, "every change is reversible until commit"
            raise AccelError(f"accelerate_model failed in step {plan.feature!r} ({type(e).__name__}: {e}); "
                             f"the model was restored to its prior state", step=plan.feature) from e
    rw.commit()

    notes = [n for p in plans for n in p.notes] + ([peft_note] if peft_note else [])   # 4. report
    report = AccelReport(
        config_name=cfg.name, config=cfg.to_dict(), device=ctx.describe(), architecture=ctx.model_type,
        spec=ctx.spec.family if ctx.spec else None, changes=rw.changes, skipped=skips,
        weight_bytes_before=before, weight_bytes_after=weight_bytes(model), notes=notes,
        hfaccel_version=__version__, placement=ctx.placement.describe() if ctx.placement else [])
    model.__dict__[_STATE] = _State(cfg, rw, report)
    model.__dict__["hfaccel_report"] = report
    return report


def revert_model(model: nn.Module, *, strict: bool = True) -> list[Change]:
    """Undo accelerate_model. Returns the changes that could not be undone (empty when exact).

    strict=True (the default) refuses, before touching anything, when a lossy change kept no original
    (pass keep_original=True when accelerating to make those reversible). strict=False undoes what it
    can and returns the rest.
    """
    model, _ = _unwrap_peft(model)
    state: _State | None = model.__dict__.get(_STATE)
    if state is None:
        return []
    irreversible = [c for c in state.rewriter.changes if not c.reversible]
    if irreversible and strict:
        listed = "; ".join(f"{c.feature}: {c.target} {c.before} -> {c.after}" for c in irreversible)
        raise RevertError(f"cannot revert exactly: {listed} kept no original (accelerate with "
                          f"keep_original=True to allow it, or call revert_model(model, strict=False))")
    stuck = state.rewriter.rollback()
    del model.__dict__[_STATE]
    model.__dict__.pop("hfaccel_report", None)
    return stuck
