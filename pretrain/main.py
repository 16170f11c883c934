"""Pretraining: ``accelerate launch pretrain/main.py --config configs/X.yaml key=value ...``

The command users type, kept as a script over the library (``infomax.launch.pretrain``), as timm's
``train.py`` sits over ``timm``; ``infomax-pretrain`` and ``python -m infomax.launch.pretrain`` are the same."""

import sys

from infomax.launch.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
