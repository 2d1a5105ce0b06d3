"""docs/reliability.md maps the 72 cases of the reliability checklist to tests: every case exactly once, in
its section, with a status from the page's legend, and every test it names exists. Whether a test asserts
what its row claims is for the audit to judge (the page says how)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
STATUSES = ("tested", "partly", "n/a", "open")
PENDING = "[issue-13-jobs]"  # tests of a branch not merged yet: see the legend
SECTIONS = {"A": range(1, 8), "B": range(8, 14), "C": range(14, 21), "D": range(21, 24), "E": range(24, 32),
            "F": range(32, 38), "G": range(38, 45), "H": range(45, 57), "I": range(57, 67), "J": range(67, 73)}
ROW = re.compile(r"^\| *([A-J])(\d+) *\|")
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _rows() -> list[tuple[str, int, list[str]]]:
    """(section letter, case number, cells) for each row of the table."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append((match.group(1), int(match.group(2)), cells))
    return rows


def _exists(path: str, name: str) -> bool:
    file = REPO / path
    return file.is_file() and f"def {name}(" in file.read_text(encoding="utf-8")


def test_every_case_appears_once_in_its_section():
    rows = _rows()
    assert sorted(number for _letter, number, _cells in rows) == list(range(1, 73))
    misplaced = [f"{letter}{number}" for letter, number, _cells in rows if number not in SECTIONS[letter]]
    assert misplaced == []


def test_every_row_has_a_status_from_the_legend_and_says_why():
    legend = DOC.read_text(encoding="utf-8").split("## The cases")[0]
    assert all(f"- `{status}`:" in legend for status in STATUSES)
    for letter, number, cells in _rows():
        assert len(cells) == 4, f"{letter}{number}: {len(cells)} cells (a '|' inside a cell?)"
        status = cells[2].replace(PENDING, "").strip()
        assert status in STATUSES, f"{letter}{number}: status {cells[2]!r}"
        assert cells[1] and len(cells[3]) > 20, f"{letter}{number}: no title or no explanation"
        if status == "tested":
            assert REF.search(cells[3]), f"{letter}{number}: tested but names no test"
        if status == "partly":
            assert "Missing:" in cells[3], f"{letter}{number}: partly without saying what is missing"


@pytest.mark.parametrize("letter, number, cells", [pytest.param(*row, id=f"{row[0]}{row[1]}") for row in _rows()])
def test_every_named_test_exists(letter, number, cells):
    text = cells[3]
    refs = REF.findall(text)
    assert text.count(".py::") == len(refs), f"{letter}{number}: a test named without `tests/...py::name`"
    missing = [f"{path}::{name}" for path, name in refs if not _exists(path, name)]
    if PENDING not in cells[2]:
        assert missing == [], f"{letter}{number}: no such test: {missing}"
    else:
        assert missing, f"{letter}{number}: every test it names exists now: remove {PENDING} from its status"
