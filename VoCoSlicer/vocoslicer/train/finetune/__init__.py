"""Finetuning on a cohort: segmentation (supervised + confident pseudo-labels, optionally the VoCo loss) and
classification (the official CC-CCII recipe), both through the shared training loop.

Modules: :mod:`.options` (the options of both, torch-free), :mod:`.init` (``--init`` of a segmentation finetune),
:mod:`.step` (teacher, crop stream and step of the semi-supervised stage), :mod:`.run` (the segmentation run),
:mod:`.cls_init` / :mod:`.cls` (the classifier's start and run), :mod:`.common` (what both runs share).

The options are imported eagerly and everything else on first use: ``vocoslicer finetune --help`` builds its
parser from :mod:`.options`, which imports this package first, and must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from vocoslicer.train.finetune.options import ClsOptions, FinetuneOptions

_LAZY = {
    "run_finetune": "run", "read_resume_state": "run", "STATE_FILE": "run",
    "resolve_init": "init", "InitModel": "init",
    "run_classification_finetune": "cls", "check_inputs": "cls",
}

__all__ = ["ClsOptions", "FinetuneOptions", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    """Import the torch side of the package when one of its names is first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
