"""The one shim for running an entry point as a script (``python pretrain/main.py``, ``accelerate launch
pretrain/main.py``): that form puts the script's own folder first on ``sys.path``, where its sibling
modules (``config.py``, ``models.py``, ``features.py``, ...) would shadow same-named top-level modules
of other packages. The packages themselves are imported by name (the project is installed, ``make
setup``); ``python -m pretrain.main`` and the console scripts (``infomax-pretrain`` ...) need no shim.
"""

from __future__ import annotations

import sys
from pathlib import Path


def drop_script_dir() -> None:
    """Remove the running script's folder from ``sys.path``; call before importing anything else."""
    here = Path(sys.argv[0]).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
