"""The code revision recorded with every run and stored baseline."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision() -> str:
    """Short hash of the checkout's HEAD, or "unknown" outside a git checkout (e.g. an installed wheel)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
