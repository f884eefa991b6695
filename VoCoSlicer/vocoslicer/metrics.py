"""Overlap metrics on label maps (numpy), for reports against ground truth and model cards."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dice_per_label(pred: np.ndarray, truth: np.ndarray, values: Iterable[int]) -> dict[int, float]:
    """Dice of each label value; NaN when the label is absent from both (so it doesn't count as perfect)."""
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {truth.shape}")
    out: dict[int, float] = {}
    for v in values:
        p, t = pred == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        out[int(v)] = float(2.0 * np.logical_and(p, t).sum() / denom) if denom else float("nan")
    return out


def mean_dice(scores: dict[int, float]) -> float:
    """Mean over labels present in prediction or truth."""
    vals = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
