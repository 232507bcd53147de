"""Results and the table: medians with min-max over repeats, ours beside each baseline.

A :class:`Row` is one case of one scenario: our figure (a :class:`Series` of samples, one per
repeat) and its baselines, measured in the same run. Each baseline cell shows its median and
the ratio ours/baseline of the medians. A series that failed shows ``n/a (error: ...)``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Series:
    label: str
    values: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, value: float) -> None:
        self.values.append(value)

    def fail(self, error: BaseException | str) -> None:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.error = self.error or text[:200]

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and self.error is None else None


@dataclass
class Row:
    scenario: str
    case: str
    unit: str
    ours: Series
    baselines: list[Series]
    lower_is_better: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    ratios: bool = True  # False: the "baselines" are further figures, not comparable to ours

    def ratio(self, base: Series) -> float | None:
        a, b = self.ours.median, base.median
        if not self.ratios:
            return None
        if a is None or b is None or b <= 0 or a < 0:
            return None  # e.g. an "added latency" that noise made negative: no ratio
        return a / b

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["median"] = self.ours.median
        out["ratios"] = {b.label: self.ratio(b) for b in self.baselines}
        return out


def num(x: float) -> str:
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.2f}M"
    if a >= 1e4:
        return f"{x / 1e3:.1f}k"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def cell(s: Series, notes: dict[str, int] | None = None) -> str:
    """``median [min-max]``; a failed series reads ``n/a (error: ...)`` (or a note number)."""
    if s.error is not None:
        if notes is None:
            return f"n/a (error: {s.error})"
        return f"n/a (error [{notes.setdefault(s.error, len(notes) + 1)}])"
    if not s.values:
        return "n/a"
    med = num(statistics.median(s.values))
    if len(s.values) == 1:
        return med
    return f"{med} [{num(min(s.values))}-{num(max(s.values))}]"


def format_table(rows: list[Row], header: list[str]) -> str:
    """One block per scenario; errors are numbered and spelled out once, under the table."""
    out = [*header, ""]
    notes: dict[str, int] = {}
    for scenario in dict.fromkeys(r.scenario for r in rows):
        lines: list[list[str]] = []
        for r in (r for r in rows if r.scenario == scenario):
            unit = r.unit + (" (lower=better)" if r.lower_is_better else "")
            line = [r.case, unit, f"{r.ours.label}: {cell(r.ours, notes)}"]
            for b in r.baselines:
                ratio = r.ratio(b)
                shown = f" -> {ratio:.2f}x" if ratio is not None else " -> -"
                line.append(f"| {b.label}: {cell(b, notes)}{shown if r.ratios else ''}")
            lines.append(line)
        widths = [max(len(x[i]) for x in lines if i < len(x)) for i in range(max(map(len, lines)))]
        out.append(f"== {scenario} ==")
        out.extend(
            "  ".join(x.ljust(widths[i]) for i, x in enumerate(line)).rstrip() for line in lines
        )
        out.append("")
    out.extend(f"error [{n}]: {text}" for text, n in notes.items())
    return "\n".join(out).rstrip() + "\n"
