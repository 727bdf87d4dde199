"""The transform report: what each pass changed, as JSON and as a Rich table."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Snapshot:
    """Size of a GraphModule at one point of the pipeline."""

    nodes: int
    params: int
    macs: int | None  # None when no example inputs were given


@dataclass
class PassRow:
    """One pass of a pipeline run."""

    name: str
    spec: str
    modified: bool
    seconds: float  # the pass itself
    verify_seconds: float  # lint, recompile, shape propagation and drift check after it
    after: Snapshot
    nodes_added: int
    nodes_removed: int
    drift_abs: float | None  # max |out - out_reference| over all outputs; None: not checked
    drift_rel: float | None  # drift_abs / max |out_reference|
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    model: str
    pipeline: str
    input_shapes: list[list[int]] | None
    baseline: Snapshot
    passes: list[PassRow] = field(default_factory=list)
    trace_seconds: float = 0.0
    capture: dict[str, Any] | None = None  # front end, why, what torch.export specialised (qcd_fx.capture)

    @property
    def final(self) -> Snapshot:
        return self.passes[-1].after if self.passes else self.baseline

    @property
    def pass_seconds(self) -> float:
        """Time spent in the passes themselves (no verification forwards)."""
        return sum(r.seconds for r in self.passes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["final"] = dataclasses.asdict(self.final)
        d["pass_seconds"] = self.pass_seconds
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self):
        """A ``rich.table.Table`` with one row per pass (plus the baseline). Cells are plain text
        (a spec like ``csc{target=[foo*]}`` is shown as written, not read as Rich markup)."""
        from rich.table import Table
        from rich.text import Text

        t = Table(title=Text(f"qcd-fx transform: {self.model}  [{self.pipeline}]"), title_justify="left")
        for col in ("pass", "changed", "nodes +/-", "params", "MACs", "drift (max abs)", "pass s", "verify s"):
            t.add_column(col, justify="left" if col in ("pass", "changed") else "right", no_wrap=col != "changed")
        b = self.baseline
        t.add_row("(input)", "", str(b.nodes), _num(b.params), _num(b.macs), "", "", "")
        prev = b
        for r in self.passes:
            a = r.after
            t.add_row(
                Text(r.spec),
                Text(changes(r.stats)),
                f"+{r.nodes_added}/-{r.nodes_removed}",
                f"{_num(a.params)} {_pct(a.params, prev.params)}",
                f"{_num(a.macs)} {_pct(a.macs, prev.macs)}",
                "not checked" if r.drift_abs is None else f"{r.drift_abs:.3g}",
                f"{r.seconds:.3f}",
                f"{r.verify_seconds:.3f}",
            )
            prev = a
        return t

    def notes(self) -> list[str]:
        return [f"{r.name}: {n}" for r in self.passes for n in r.notes]

    def warnings(self) -> list[str]:
        """Passes that achieved far less than asked: a pruning ratio r asks for about 1 - (1 - r)^2
        of the MACs (both sides of every pruned layer shrink); under half of that is reported,
        with the channels left alone per reason."""
        out = []
        prev = self.baseline
        for r in self.passes:
            ratio = r.stats.get("requested_ratio")
            if ratio and prev.macs and r.after.macs is not None:
                asked = 1 - (1 - ratio) ** 2
                achieved = 1 - r.after.macs / prev.macs
                if achieved < asked / 2:
                    frozen = r.stats.get("frozen_channels") or {}
                    total = r.stats.get("channels") or 0
                    why = "; ".join(f"{n} for {reason}" for reason, n in sorted(frozen.items(), key=lambda kv: -kv[1])[:3] if n)
                    left = f"; of {total} channels, left alone: {why}" if why else ""
                    out.append(f"{r.spec} removed {achieved:.0%} of the MACs where ratio {ratio:g} asks for about {asked:.0%}{left}")
            prev = r.after
        return out

    def print(self, console=None, max_notes: int = 12) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        if self.capture and (self.capture["front_end"] == "export" or self.capture["reason"]):
            console.print(f"  {capture_line(self.capture)}", markup=False, highlight=False)
        for w in self.warnings():
            console.print(f"  warning: {w}", markup=False, highlight=False, style="yellow")
        notes = self.notes()
        for n in notes[:max_notes]:
            console.print(f"  note: {n}", markup=False, highlight=False)
        if len(notes) > max_notes:
            console.print(f"  … {len(notes) - max_notes} more notes in the JSON report (--report FILE.json)")


def capture_line(capture: dict[str, Any]) -> str:
    """``captured with torch.export (torch.fx failed: …); dynamic: x dim 0 in [1, inf]``."""
    from .capture import CaptureInfo

    return CaptureInfo(**capture).describe()


def changes(stats: dict[str, Any], widths_shown: int = 3) -> str:
    """What a pass changed, in a few words, from its ``stats``: gates and masks inserted, groups
    and channels pruned with the first few new widths (all of them are in the JSON report)."""
    parts = []
    if stats.get("gates"):
        parts.append(f"{stats['gates']} gate{'s' if stats['gates'] != 1 else ''}")
    if stats.get("masks"):
        parts.append(f"{stats['masks']} mask{'s' if stats['masks'] != 1 else ''}")
    if stats.get("branches_removed"):
        parts.append(f"{stats['branches_removed']} branch(es) removed")
    if "groups" in stats:
        asked = f"ratio {stats['requested_ratio']:g}: " if stats.get("requested_ratio") is not None else ""
        parts.append(f"{asked}{stats.get('groups_pruned', 0)}/{stats['groups']} groups pruned, -{stats.get('channels_removed', 0)} channels")
        widths = [(name.split(" (", 1)[0], w) for name, w in (stats.get("widths") or {}).items() if w[0] != w[1]]
        shown = ", ".join(f"{name} {w[0]}->{w[1]}" for name, w in widths[:widths_shown])
        if shown:
            parts.append(shown + (f", +{len(widths) - widths_shown} more" if len(widths) > widths_shown else ""))
    return "; ".join(parts)


def _num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _pct(new: int | None, old: int | None) -> str:
    if new is None or old in (None, 0) or new == old:
        return ""
    return f"({(new - old) / old:+.1%})"
