"""How numbers and tables read in every report: `fmt` (one number formatter) and `markdown_table` (one table builder).

Findings, the dashboard, study tables and stage tables all call these two, so a loss, a p-value or
a parameter count reads the same wherever it appears.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def fmt(value: Any, unit: str = "", *, digits: int = 4, decimals: int | None = None, sign: bool = False) -> str:
    """A value as a reader wants it: 4 significant digits (`digits`), or a fixed number of `decimals` (losses: 4);
    thousands separators; '%' shows a fraction as a percentage; `sign` writes a + on gains; — for missing.

    Lists and tuples read (a, b), mappings k=v, booleans yes/no; a unit follows the number.
    """
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and math.isnan(value):
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, digits=digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(fmt(v, digits=digits) for v in value) + ")"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and unit == "%":
        return f"{100 * value:.1f}%"
    plus = "+" if sign else ""
    if isinstance(value, numbers.Integral):  # numpy's integers too, as pandas hands them over
        text = f"{int(value):{plus},}"
    elif isinstance(value, numbers.Real):
        value = float(value)
        if decimals is not None:
            text = f"{value:{plus}.{decimals}f}"
        else:
            text = f"{value:{plus},.0f}" if abs(value) >= 1e4 else f"{value:{plus}.{digits}g}"
    else:
        return str(value)
    return f"{text} {unit}".strip()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; cells are written as given (format numbers with `fmt`), pipes and newlines escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)
