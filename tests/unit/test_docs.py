"""The documentation describes the project: figures carry their provenance, links resolve, bench/README stays a reference."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_README = ROOT / "bench" / "README.md"
MAX_BENCH_README_LINES = 350

# Words about how the project was made rather than what it is. Built from pieces so
# that this file does not match its own pattern.
_S = "ses" + "sion"
NARRATION = re.compile("|".join([_S + r" [0-9]", _S + r"s [0-9]", "le" + "nt for", "col" + "league"]), re.IGNORECASE)

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
COMMIT = re.compile(r"^`?([0-9a-f]{7,40})`?$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = _git("ls-files", "-z")
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return [ROOT / name for name in listed.stdout.split("\0") if name]


def test_no_file_narrates_how_the_project_was_made(tracked_files: list[Path]) -> None:
    hits = []
    for path in tracked_files:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if NARRATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def test_bench_readme_is_a_reference_not_a_log() -> None:
    lines = BENCH_README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_BENCH_README_LINES, f"bench/README.md has {len(lines)} lines"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table_after(marker: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first table after the line ``marker`` in bench/README.md."""
    lines = BENCH_README.read_text(encoding="utf-8").splitlines()
    assert marker in lines, f"bench/README.md has no line {marker!r}"
    table: list[str] = []
    for line in lines[lines.index(marker) + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("## "):
            break
    assert len(table) > 2, f"bench/README.md has no table after {marker!r}"
    return _cells(table[0]), [_cells(line) for line in table[2:]]


def summary() -> list[dict[str, str]]:
    header, rows = _table_after("## Summary")
    for column in ("benchmark", "metric", "target", "figure", "date", "commit", "machine", "command"):
        assert column in header, f"the summary table has no {column!r} column: {header}"
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_every_summary_row_names_its_date_commit_machine_and_command() -> None:
    _, machine_rows = _table_after("Machines:")
    machines = {row[0] for row in machine_rows}
    for row in summary():
        where = f"summary row {row['benchmark']} / {row['metric']}"
        assert row["figure"], f"{where}: no figure"
        assert DATE.match(row["date"]), f"{where}: date {row['date']!r} is not YYYY-MM-DD"
        assert COMMIT.match(row["commit"]), f"{where}: commit {row['commit']!r} is not a commit hash"
        assert row["machine"] in machines, f"{where}: machine {row['machine']!r} is not under Machines"
        assert "bench/" in row["command"], f"{where}: command {row['command']!r} runs no benchmark"


def test_summary_commits_are_in_the_history(tracked_files: list[Path]) -> None:
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        pytest.skip("a shallow clone lacks older commits")
    commits = sorted({COMMIT.match(row["commit"]).group(1) for row in summary()})  # type: ignore[union-attr]
    checked = subprocess.run(["git", "cat-file", "--batch-check"], cwd=ROOT, capture_output=True, text=True,
                             input="".join(f"{c}^{{commit}}\n" for c in commits), check=True).stdout.splitlines()
    unknown = [line for line in checked if line.endswith(("missing", "ambiguous"))]
    assert not unknown, unknown


DOCS = [ROOT / "README.md", BENCH_README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_point_to_files_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same file
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"
