"""Shared fixtures: tiny configs and a helper that runs the pretraining entry point as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic_tiny.yaml"


def run_main(*overrides: str, config: Path = TINY, launcher: list[str] | None = None, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """`python pretrain/main.py --config ... overrides` (or under `launcher`), captured."""
    cmd = [*(launcher or [sys.executable]), str(REPO / "pretrain" / "main.py"), "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
