"""SLURM (or local) jobs: ``python launch/submit.py --config configs/X.yaml --nodes 2 ...``

The command users type, kept as a script over the library (``infomax.launch.submit``), as timm's ``train.py`` sits over
``timm``; ``infomax-submit`` and ``python -m infomax.launch.submit`` are the same command."""

import sys

from infomax.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
