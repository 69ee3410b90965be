"""Numbers as the report's tables print them: counts as integers, floats with sensible digits.

`number(value, column)` formats one table cell; `markdown(frame)` a whole table (every cell
formatted here, then laid out by tabulate with number parsing off, so nothing reformats it).

- missing (None, NaN): a blank cell;
- counts (integer values, or a column named like one: n, n_train, rounds, flagged, ...):
  integers with thousands separators ("6,000", never "6,000.0"); a count that is not whole
  (a mean over seeds) keeps one decimal ("517.8");
- eps, fractions and learning rates: as written ("0.1", "0.05");
- other floats: `digits` decimals below 10 (".4f" scores: "0.9255", never
  "0.9255000352859497"), fewer as they grow (12.35, 123.5, 1,235).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

COUNT_COLUMN = re.compile(r"^(n|n_\w+|\w*_?count|counts?|flagged|poisoned|rounds|members|"
                          r"samples|size|patch|seed|hidden|epochs|target|source)$")
AS_WRITTEN = frozenset({"eps", "fraction", "lr", "alpha", "fpr"})


def missing(value: Any) -> bool:
    """None or a float NaN."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def number(value: Any, column: Any = "", digits: int = 4) -> str:
    """One table cell as text (module docstring). column: its column's name, which says
    whether a float is a count, an eps or a score; digits: decimals of a score below 10."""
    if missing(value):
        return ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        return str(value)
    name = str(column).strip().lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if name in AS_WRITTEN:
        return f"{v:g}"
    if COUNT_COLUMN.match(name):
        return f"{int(round(v)):,}" if v == round(v) else f"{v:,.1f}"
    size = abs(v)
    if size >= 1000:
        return f"{v:,.0f}"
    if size >= 100:
        return f"{v:.1f}"
    if size >= 10:
        return f"{v:.{min(digits, 2)}f}"
    return f"{v:.{digits}f}"


NUMBER_TEXT = re.compile(r"^([+\-−]?[\d,.]+(e[+\-]\d+)?[×%]?|—)$")  # "+0.0019", "1.16×"


def _numeric(series: pd.Series) -> bool:
    """Whether a column reads as numbers (right-aligned): numbers, or text such as a signed
    delta, a ratio or a dash."""
    values = [v for v in series if not missing(v)]
    return bool(values) and all(
        (isinstance(v, (int, float, np.integer, np.floating))
         and not isinstance(v, (bool, np.bool_)))
        or (isinstance(v, str) and NUMBER_TEXT.match(v) is not None) for v in values)


def markdown(frame: pd.DataFrame, *, index: bool = True, digits: int = 4) -> str:
    """frame as a markdown table, every cell through `number` (numbers right-aligned)."""
    shown = pd.DataFrame({c: [number(v, c, digits) for v in frame[c]] for c in frame.columns},
                         index=frame.index, columns=frame.columns)
    align = ["right" if _numeric(frame[c]) else "left" for c in frame.columns]
    if index:
        shown.index = [number(v, frame.index.name or "", digits) for v in frame.index]
        shown.index.name = frame.index.name
        align = ["left", *align]
    return shown.to_markdown(index=index, disable_numparse=True, colalign=align)
