"""The formatting every experiment's section of tables.md uses: picking records, numbers and
times as text, a markdown table with the line that says how to read it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mlshift_jax.core import fmt

MEASURES = ("accuracy", "precision", "recall", "f1", "confidence")


PRF = ("precision", "recall", "f1", "confidence")


def records_of(records: pd.DataFrame, *, kind: str | None = None,
               block: str | None = None) -> pd.DataFrame:
    """The records of one kind and/or block (an empty frame when there are none)."""
    if records.empty or "kind" not in records:
        return records.iloc[0:0]
    keep = np.ones(len(records), bool)
    if kind is not None:
        keep &= (records["kind"] == kind).to_numpy()
    if block is not None:
        keep &= (records["block"] == block).to_numpy()
    return records[keep]


def finite(value: Any) -> bool:
    """Whether value is a finite number (None, NaN, inf and text are not)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt_time(seconds: Any) -> str:
    """1.23 s, 45.6 ms, 789 µs; "—" when missing."""
    if not finite(seconds):
        return "—"
    s = float(seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale or unit == "µs":
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def md(frame: pd.DataFrame, note: str, *, index: bool = True, floatfmt: str = ".4f") -> str:
    """A markdown table and the line under it that says how to read it: numbers through
    `fmt.number` (scores to `floatfmt`'s decimals, counts as integers, eps as written, NaN
    blank)."""
    digits = int(floatfmt.strip(".f"))
    return f"{fmt.markdown(frame, index=index, digits=digits)}\n\n*{note}*\n"


def delta(ours: Any, theirs: Any) -> str:
    """ours - theirs as a signed string, "—" where either is missing."""
    return f"{float(ours) - float(theirs):+.4f}" if finite(ours) and finite(theirs) else "—"


def ratio(num: Any, den: Any) -> str:
    """num / den as "1.23×", or "—" when either is missing or not positive."""
    if not (finite(num) and finite(den)) or num <= 0 or den <= 0:
        return "—"
    return f"{num / den:.3g}×"

