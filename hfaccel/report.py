"""AccelReport: everything accelerate_model changed, skipped or could not do, and what it cost."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Change:
    """One rewrite of the model, as recorded by hfaccel.rewrite."""

    feature: str          # "attention", "dtype", ...
    target: str           # module path or attribute ("model", "config._attn_implementation")
    before: str
    after: str
    reversible: bool      # revert_model can restore the exact prior state
    lossless: bool        # greedy tokens unchanged


@dataclass
class Skip:
    """A feature that was asked for (or considered) and not applied, with the reason."""

    feature: str
    reason: str
    status: str = "skipped"   # "skipped" | "not available in this version" | "not requested"


@dataclass
class AccelReport:
    config_name: str
    config: dict[str, Any]
    device: str
    architecture: str                      # model_type
    spec: str | None                       # patches/ spec used, None when the family has none
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    noop: bool = False
    notes: list[str] = field(default_factory=list)
    hfaccel_version: str = ""
    placement: list[str] = field(default_factory=list)   # device_map models: where each module lives

    @property
    def lossless(self) -> bool:
        return all(c.lossless for c in self.changes)

    @property
    def reversible(self) -> bool:
        return all(c.reversible for c in self.changes)

    @property
    def unavailable(self) -> list[Skip]:
        return [s for s in self.skipped if s.status == "not available in this version"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lossless"] = self.lossless
        d["reversible"] = self.reversible
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        head = (f"[bold]hfaccel[/] {self.hfaccel_version} · config [bold]{self.config_name}[/] · "
                f"{self.architecture} (spec: {self.spec or 'none'}) · {self.device}")
        if self.noop:
            head += " · [yellow]no-op: already accelerated[/]"
        changes = Table(title="changes", title_justify="left", expand=False)
        for col in ("feature", "target", "before", "after", "lossless", "reversible"):
            changes.add_column(col)
        for c in self.changes:
            changes.add_row(c.feature, c.target, c.before, c.after, _yes(c.lossless), _yes(c.reversible))
        if not self.changes:
            changes.add_row("-", "(none)", "", "", "", "")
        skipped = Table(title="not applied", title_justify="left")
        skipped.add_column("feature")
        skipped.add_column("status")
        skipped.add_column("reason")
        for s in self.skipped:
            skipped.add_row(s.feature, s.status, s.reason)
        mb = 1 / 2**20
        mem = (f"weights: {self.weight_bytes_before * mb:,.1f} MiB -> {self.weight_bytes_after * mb:,.1f} MiB"
               f"   lossless: {_yes(self.lossless)}   reversible: {_yes(self.reversible)}")
        parts = [head, changes]
        if self.skipped:
            parts.append(skipped)
        parts.append(mem)
        parts.extend(f"[dim]placement:[/] {line}" for line in self.placement)
        parts.extend(f"[dim]note:[/] {n}" for n in self.notes)
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, force_terminal=False, color_system=None).print(self)
        return buf.getvalue().rstrip()


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"
