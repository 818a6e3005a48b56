"""Tables for the command-line reports, printed and written as markdown."""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

from prettytable import PrettyTable, TableStyle


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    table = PrettyTable(list(headers))
    table.add_rows([[_cell(v) for v in row] for row in rows])
    table.set_style(TableStyle.MARKDOWN)
    table.align = "l"
    return table.get_string()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
