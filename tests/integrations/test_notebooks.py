"""The research notebooks, executed top to bottom as `nox -s notebooks` runs them (notebooks/run.py: a Jupyter
kernel per notebook, 1 thread), one test each, so that the suite and the notebooks share one environment. A cell's
failing assertion fails its notebook's test, with the cell's error in the message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_every_notebook_is_collected():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name):
    done = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "run.py"), name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert f"{name}.py: ok" in done.stdout, done.stdout
    assert (ROOT / "results" / "notebooks" / f"{name}.ipynb").is_file()
