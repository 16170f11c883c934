"""Pretraining: ``accelerate launch pretrain/main.py --config configs/X.yaml key=value ...``

The command users type, kept as a script over the library (``infomax.train.main``), as timm's ``train.py`` sits over
``timm``; ``infomax-pretrain`` and ``python -m infomax.train.main`` are the same command."""

import sys

from infomax.train.main import main

if __name__ == "__main__":
    sys.exit(main())
