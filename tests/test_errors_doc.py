"""docs/errors.md: every row of its tables names a test that exists, and every section that
this project fills has rows. Tests are found by reading the test files' syntax trees, not by
collecting (importing) them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
HEADER = ["What happened", "What you see", "What is kept", "What to do", "Test"]
SECTIONS = ["Start-up and input", "Checkpoints and disk", "Tokenizer and hosts", "Divergence",
            "Signals, dead and hung ranks"]
MAY_BE_EMPTY = {"Divergence", "Signals, dead and hung ranks"}  # filled by the guards and lifecycle work
NODE_RE = re.compile(r"^`(tests/[\w/]+\.py)::([\w:]+)(\[[^\]]*\])?`$")


def cells(line: str) -> list[str]:
    """The cells of a markdown table row; a `|` inside backticks is no separator."""
    out, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def parse(text: str) -> dict[str, list[list[str]]]:
    """Section title -> its table's rows (header and separator left out). Raises AssertionError
    naming the line for a table row with another shape or a second header."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            current = line[3:].strip()
            assert current not in sections, f"line {n}: section {current!r} appears twice"
            sections[current] = []
        elif line.startswith("|") and current is not None:
            row = cells(line)
            if row == HEADER or all(set(c) <= set("-: ") for c in row):
                continue
            assert len(row) == len(HEADER), f"line {n}: {len(row)} cells, the table has {len(HEADER)}: {line}"
            sections[current].append(row)
    return sections


def test_functions(path: Path) -> set[str]:
    """'name' and 'Class::name' of every test function in a test file."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


test_functions.__test__ = False  # a helper, not a test


def problems(text: str, root: Path = ROOT) -> list[str]:
    """What is wrong with an errors doc: missing sections, empty ones, rows whose Test cell does
    not name an existing test."""
    sections = parse(text)
    out = [f"section {s!r} is missing" for s in SECTIONS if s not in sections]
    out += [f"section {s!r} has no rows" for s in SECTIONS if s in sections and not sections[s]
            and s not in MAY_BE_EMPTY]
    for section, rows in sections.items():
        for row in rows:
            m = NODE_RE.match(row[-1])
            if not m:
                out.append(f"{section}: Test cell {row[-1]!r} is not a pytest node id in backticks")
                continue
            path, name = root / m.group(1), m.group(2)
            if not path.is_file():
                out.append(f"{section}: {m.group(1)} does not exist")
            elif name not in test_functions(path):
                out.append(f"{section}: {m.group(1)} has no test {name}")
            if any(not c for c in row[:-1]):
                out.append(f"{section}: a row for {row[-1]} has an empty cell")
    return out


def test_every_row_names_an_existing_test_and_every_section_has_rows():
    assert problems(DOC.read_text()) == []


def test_the_check_finds_a_missing_test_a_bad_cell_and_an_empty_section():
    ok = "`tests/test_errors_doc.py::test_the_check_finds_a_missing_test_a_bad_cell_and_an_empty_section`"
    head = "| " + " | ".join(HEADER) + " |\n|---|---|---|---|---|\n"
    good = "".join(f"## {s}\n\n{head}" + ("" if s in MAY_BE_EMPTY else f"| a | b | c | d | {ok} |\n")
                   for s in SECTIONS)
    assert problems(good) == []
    missing = good.replace(ok, "`tests/test_errors_doc.py::test_no_such_thing`", 1)
    assert problems(missing) == [f"{SECTIONS[0]}: tests/test_errors_doc.py has no test test_no_such_thing"]
    no_file = good.replace(ok, "`tests/test_nowhere.py::test_x`", 1)
    assert problems(no_file) == [f"{SECTIONS[0]}: tests/test_nowhere.py does not exist"]
    bare = good.replace(ok, "test_x", 1)
    assert "is not a pytest node id" in problems(bare)[0]
    empty = good.replace(f"| a | b | c | d | {ok} |\n", "", 1)
    assert problems(empty) == [f"section {SECTIONS[0]!r} has no rows"]
    short = good.replace(f"| a | b | c | d | {ok} |", f"| a | b | {ok} |", 1)
    with pytest.raises(AssertionError, match="3 cells"):
        problems(short)
