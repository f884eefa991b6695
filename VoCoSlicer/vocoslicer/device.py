"""The one place that turns ``--device`` (``auto``, ``cpu``, ``mps``, ``cuda``, ``cuda:N``) into a torch device.

Segmentation, classification, the warm worker, batch mode and training (per torchrun rank) all ask here, so that
``auto`` means the same everywhere and a GPU that is not there is the same one-line error everywhere. Checking
the text of the flag before anything heavy is imported is :func:`vocoslicer.commands._jobsetup.check_device`'s
job; this module imports torch.
"""

from __future__ import annotations

import torch

from vocoslicer.errors import UserError


def pick_device(requested: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; asking for CUDA on a machine without it is a user error.

    ``local_rank`` (training under torchrun: one GPU per rank) makes a bare ``cuda`` or ``auto`` on a GPU machine
    mean ``cuda:<local_rank>``; an explicit ``cuda:N`` is kept as given. Without it ``cuda`` is the current device.
    """
    text = (requested or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available (use --device cpu or auto)")
    if text == "cuda" and local_rank is not None:
        return torch.device("cuda", int(local_rank))
    try:
        return torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown device {requested!r} (use auto, cpu, cuda or cuda:N)") from None
