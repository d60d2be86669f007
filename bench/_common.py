"""What every benchmark shares: percentiles, the machine line, and the table printer.

Benchmarks run as scripts (``python bench/<name>.py``), so this module is
imported as ``_common`` from the script's own folder.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run from bench/; tests.support lives at the root
    sys.path.insert(0, str(ROOT))

__all__ = ["ROOT", "machine_line", "median", "percentile", "print_table", "verdict"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; with fewer than 100 values p99 is the slowest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def machine_line() -> str:
    """Date, commit, CPU, load average and Python: the context every figure needs on a shared box."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"{now}  commit {commit()}  {platform.machine()} {cpu_model()} x{os.cpu_count()}  "
        f"load average {load_average()}  python {sys.version.split()[0]}"
    )


def commit() -> str:
    """The checkout's commit (``+`` when it has uncommitted changes), or ``unknown``."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` under ``headers``: text left-aligned, numbers right-aligned.

    Cells are printed as given (format numbers before passing them as strings
    where the precision matters); a cell that parses as a number is right-aligned.
    """
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and i > 0 for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line(list(headers)))
    print("-" * len(line(list(headers))))
    for row in cells:
        print(line(row))


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").replace("x", "").replace("+", "").strip()
    try:
        float(stripped)
    except ValueError:
        return text in ("-", "n/a", "")
    return True


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"
