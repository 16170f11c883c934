"""Training objectives: the model's output -> loss plus diagnostics
(:class:`~infomax.method.objectives.base.Objective`).

The registry is the config's list of names: ``objective.name=X`` is the class that
``infomax/method/objectives/X.py`` names ``OBJECTIVE``, and ``CHOICE_HELP["objective.name"]`` in
:mod:`infomax.config.pretrain` lists the names with a line of help each. So adding an objective is one file here
and one line there (docs/DESIGN.md, "How to add an objective"); tests/test_objectives.py runs every one.

- ``contrastive``: a critic between pairs of views (CMC, SimCLR; MoCo's queue; NT-Xent; NNCLR), any bound.
- ``amdim``: multiscale global-vs-local NCE with score clipping and regularisation.
- ``dim``: global-vs-local with the JS, DV or InfoNCE bound (Deep InfoMax).
"""

from __future__ import annotations

import importlib

from infomax.config.pretrain import CHOICES, ObjectiveConfig
from infomax.method.objectives.amdim import AMDIMObjective
from infomax.method.objectives.base import Objective, diagnostics
from infomax.method.objectives.contrastive import ContrastiveObjective, view_pairs, without_own_column
from infomax.method.objectives.dim import DIMObjective
from infomax.method.objectives.local_nce import multi_positive_nce

__all__ = ["AMDIMObjective", "ContrastiveObjective", "DIMObjective", "Objective", "build_objective",
           "diagnostics", "multi_positive_nce", "objective_class", "view_pairs", "without_own_column"]


def objective_class(name: str) -> type[Objective]:
    """The class of ``objective.name=name``: ``OBJECTIVE`` of the module ``infomax.method.objectives.<name>``."""
    if name not in CHOICES["objective.name"]:
        raise ValueError(f"unknown objective '{name}' (choose from {', '.join(CHOICES['objective.name'])})")
    return importlib.import_module(f"infomax.method.objectives.{name}").OBJECTIVE


def build_objective(cfg: ObjectiveConfig, num_views: int, embed_dim: int) -> Objective:
    """The objective named by ``objective.name``, configured from the rest of ``objective.*``."""
    return objective_class(cfg.name).from_config(cfg, num_views, embed_dim)
