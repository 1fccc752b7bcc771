"""A figure: evtool's samples beside its baseline's, from one run, and whether the target is met."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Figure:
    """One row of the table. `kind` says how the target reads:

    - "min_ratio": median(evtool) / median(baseline) >= threshold (throughputs);
    - "max_ratio": median(evtool) / median(baseline) <= threshold (times, memory);
    - "max_value": median(evtool) <= threshold (an absolute bound, e.g. a p99 in ms);
    - "info": no target, the ratio is shown for reading (a reference beside the targeted ones).

    `issue` names the issue whose target the row checks.
    """

    key: str
    label: str
    unit: str
    baseline_label: str
    kind: str
    threshold: float
    evtool: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    error: str | None = None
    issue: str = "4"

    @property
    def target(self) -> str:
        if self.kind == "info":
            return "-"
        if self.kind == "min_ratio":
            return f">= {self.threshold:g}x"
        if self.kind == "max_ratio":
            return f"<= {self.threshold:g}x"
        return f"<= {self.threshold:g} {self.unit}"

    @property
    def ratio(self) -> float | None:
        if not self.evtool or not self.baseline or statistics.median(self.baseline) == 0:
            return None
        return statistics.median(self.evtool) / statistics.median(self.baseline)

    @property
    def met(self) -> bool | None:
        if self.error or not self.evtool or self.kind == "info":
            return None
        if self.kind == "max_value":
            return statistics.median(self.evtool) <= self.threshold
        ratio = self.ratio
        if ratio is None:
            return None
        return ratio >= self.threshold if self.kind == "min_ratio" else ratio <= self.threshold

    def as_dict(self) -> dict:
        def stats(xs: list[float]) -> dict | None:
            if not xs:
                return None
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}

        return {"key": self.key, "label": self.label, "unit": self.unit,
                "evtool": stats(self.evtool), "baseline": stats(self.baseline),
                "baseline_label": self.baseline_label, "ratio": self.ratio, "target": self.target,
                "met": self.met, "issue": self.issue,
                "notes": self.notes, "extra": self.extra, "error": self.error}
