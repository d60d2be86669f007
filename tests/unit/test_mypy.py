"""mypy over producer, trainer_worker and inference_worker ([tool.mypy] in pyproject.toml) finds nothing.

Its cache is the repository's .mypy_cache, so a run after the first checks only
what changed (~5 s); a cold one takes under a minute on two cores, as
transformers, vLLM and peft are read as Any (see the overrides).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_the_packages_type_check() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the test extra")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"
