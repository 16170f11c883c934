"""The eval stage: ``python eval/main.py --config configs/probe_fmnist.yaml weights=RUN/export``

The command users type, kept as a script over the library (``infomax.eval.main``), as timm's ``train.py`` sits over
``timm``; ``infomax-eval`` and ``python -m infomax.eval.main`` are the same command."""

import sys

from infomax.eval.main import main

if __name__ == "__main__":
    sys.exit(main())
