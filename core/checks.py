"""Checks: what a correct run must show, evaluated after the run against its reported metrics.

A check compares one metric with a threshold (`value`) or with another metric (`ref`) that the
module computed independently (a baseline in the same process, a closed-form value, a reference
implementation). Thresholds are chosen so that an untrained or broken implementation fails them.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq,  # for exact quantities (byte counts, integers); floats want a tolerance metric
}


@dataclass(frozen=True)
class Check:
    metric: str
    op: str
    value: float | None = None
    """threshold to compare against (exactly one of value / ref)"""
    ref: str | None = None
    """name of another reported metric to compare against"""
    why: str = ""
    """what the check shows, in one line"""
    presets: tuple[str, ...] | None = None
    """presets the check applies to (None: all)"""
    when: Callable[[Any], bool] | None = None
    """extra condition on the config (e.g. only at gamma=0.99); the reason goes in `why`"""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"check on {self.metric!r}: op must be one of {list(OPS)}, got {self.op!r}")
        if (self.value is None) == (self.ref is None):
            raise ValueError(f"check on {self.metric!r}: give exactly one of value= or ref=")

    def describe(self) -> str:
        target = self.ref if self.ref is not None else f"{self.value:g}"
        return f"{self.metric} {self.op} {target}"

    def applies(self, preset: str, config: Any) -> bool:
        if self.presets is not None and preset not in self.presets:
            return False
        return self.when is None or bool(self.when(config))

    def evaluate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        actual = metrics.get(self.metric)
        target = metrics.get(self.ref) if self.ref is not None else self.value
        ok = (is_number(actual) and is_number(target)
              and OPS[self.op](float(actual), float(target)))
        return {"check": self.describe(), "metric": self.metric, "op": self.op,
                "actual": actual, "target": target, "passed": bool(ok), "why": self.why}


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
