"""The layering of shared/STYLE.md, checked by import-linter with the contracts in pyproject.toml:
launcher > tuning > trainers > dataprep > cluster | runconfig, each importing only the layers below
it, and no import cycle among the modules of a package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_imports_only_the_layers_below_it_and_no_cycles():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout
