"""Supervised segmentation training on (image, label) pairs, on top of the shared :class:`~.loop.Trainer`.

Used for the demo model and as the supervised half of finetuning. Cases are brought onto the bundle's model
grid once (the same :func:`vocoslicer.infer.preprocess.prepare` that inference uses, so training and inference
can never disagree on orientation, spacing or intensity), kept in memory as compact arrays, and sampled as
foreground/background-balanced crops with MONAI's RandCropByPosNegLabel. Validation runs MONAI
sliding-window inference on the held-out cases and reports Dice per label; the best weights become a bundle.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.errors import UserError
from vocoslicer.infer.preprocess import orient, prepare
from vocoslicer.io import read_image, same_grid
from vocoslicer.labels import LabelTable
from vocoslicer.models.bundle import ModelBundle


@dataclass
class SegCase:
    """One training case; ``label`` None means unlabelled (used by semi-supervised finetuning)."""

    case_id: str
    image: sitk.Image | str | Path
    label: sitk.Image | str | Path | None = None


@dataclass
class PreparedCase:
    """A case on the model grid: image (1, X, Y, Z) float32; label (1, X, Y, Z) uint8 channel indices or None."""

    case_id: str
    image: torch.Tensor
    label: torch.Tensor | None


def _as_image(x: sitk.Image | str | Path) -> sitk.Image:
    return x if isinstance(x, sitk.Image) else read_image(x)


def label_to_channels(label: np.ndarray, channel_values: Sequence[int], source: str) -> np.ndarray:
    """Map label values to output-channel indices (values not in the model are an error, never silently 0)."""
    lut_size = max(int(label.max(initial=0)), max(channel_values)) + 1
    lut = np.full(lut_size, 255, dtype=np.uint8)
    for ch, v in enumerate(channel_values):
        lut[int(v)] = ch
    out = lut[label.astype(np.int64)]
    if (out == 255).any():
        bad = sorted(set(np.unique(label[out == 255]).tolist()))
        raise UserError(f"{source}: label values {bad} are not outputs of this model (values {list(channel_values)})")
    return out


def prepare_case(case: SegCase, preprocessing: dict[str, Any], channel_values: Sequence[int]) -> PreparedCase:
    """Bring a case onto the model grid (labels resampled with nearest neighbour, on the same grid)."""
    img = _as_image(case.image)
    prep = prepare(img, preprocessing)
    label_t = None
    if case.label is not None:
        lab = _as_image(case.label)
        if not same_grid(img, lab, tol=1e-3):
            raise UserError(f"case {case.case_id}: the label is not on the image's grid (size/spacing/origin/"
                            "direction differ); resample it onto the image first")
        lab = orient(lab, str(preprocessing.get("orientation", "RAS")))
        lab = sitk.Resample(lab, prep.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
        arr = sitk.GetArrayViewFromImage(lab).transpose(2, 1, 0)
        label_t = torch.from_numpy(label_to_channels(np.asarray(arr), channel_values, case.case_id))[None]
    return PreparedCase(case.case_id, prep.tensor[0], label_t)


class CropStream(torch.utils.data.IterableDataset):
    """Endless stream of batches of ROI crops from in-memory prepared cases.

    ``pos``/``neg`` weigh foreground- vs background-centred crops (official BTCV: 9/1 for few big volumes; here
    1/1 by default). ``class_ratios`` (one weight per output channel, background first) switches to MONAI's
    RandCropByLabelClasses instead, so that a small or confusable structure is centred in as many crops as the
    liver; without it such a class can stay at Dice 0 for hundreds of steps. Intensity augmentation only:
    flips would teach the network that liver and spleen are interchangeable, which defeats the geometric
    context VoCo learns.
    """

    def __init__(self, cases: Sequence[PreparedCase], roi: Sequence[int], batch_size: int = 2, pos: float = 1.0,
                 neg: float = 1.0, seed: int = 0, augment: bool = True,
                 class_ratios: Sequence[float] | None = None) -> None:
        super().__init__()
        self.cases = [c for c in cases if c.label is not None]
        if not self.cases:
            raise UserError("no labelled cases to train on")
        self.roi, self.batch_size, self.pos, self.neg, self.seed, self.augment = (
            tuple(int(r) for r in roi), int(batch_size), pos, neg, seed, augment)
        self.class_ratios = None if class_ratios is None else [float(r) for r in class_ratios]
        if self.class_ratios is not None and (len(self.class_ratios) < 2 or min(self.class_ratios) < 0
                                              or sum(self.class_ratios) <= 0):
            raise UserError(f"class_ratios must be >= 0, one per output channel, not all 0: {class_ratios}")

    def _transforms(self) -> Any:
        from monai.transforms import (
            Compose,
            RandCropByLabelClassesd,
            RandCropByPosNegLabeld,
            RandScaleIntensityd,
            RandShiftIntensityd,
            SpatialPadd,
        )

        if self.class_ratios is not None:
            crop = RandCropByLabelClassesd(keys=("image", "label"), label_key="label", spatial_size=self.roi,
                                           ratios=self.class_ratios, num_classes=len(self.class_ratios),
                                           num_samples=1, warn=False)
        else:
            crop = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=self.roi,
                                          pos=self.pos, neg=self.neg, num_samples=1, image_key="image",
                                          image_threshold=0.0)
        t = [SpatialPadd(keys=("image", "label"), spatial_size=self.roi), crop]
        if self.augment:
            t += [RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
                  RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
        return Compose(t)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = random.Random(self.seed * 1000 + wid)
        tf = self._transforms()
        tf.set_random_state(seed=self.seed * 1000 + wid)
        while True:
            imgs, labs = [], []
            for _ in range(self.batch_size):
                case = rng.choice(self.cases)
                out = tf({"image": case.image, "label": case.label})
                out = out[0] if isinstance(out, list) else out
                imgs.append(torch.as_tensor(out["image"]).float())
                labs.append(torch.as_tensor(out["label"]).long())
            yield {"image": torch.stack(imgs), "label": torch.stack(labs)}


def dice_ce_step(include_background: bool = False) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]]:
    """Step function: DiceCE (official BTCV loss) on a batch of crops."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True)

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"])
        loss = loss_fn(logits.float(), batch["label"])
        return loss, {}

    return step


def make_eval_fn(val_cases: Sequence[PreparedCase], labels: LabelTable, channel_values: Sequence[int],
                 roi: Sequence[int], overlap: float = 0.25, sw_batch_size: int = 2
                 ) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """Validation: sliding-window argmax on the model grid, Dice per label and mean (``val_dice``)."""
    from monai.inferers import sliding_window_inference

    from vocoslicer.metrics import dice_per_label

    names = {v: labels.by_value(v).name for v in channel_values[1:]}
    cases = [c for c in val_cases if c.label is not None]

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        per_label: dict[int, list[float]] = {ch: [] for ch in range(1, len(channel_values))}
        for c in cases:
            logits = sliding_window_inference(c.image[None].to(device), tuple(roi), sw_batch_size, model,
                                              overlap=overlap, mode="gaussian")
            pred = logits[0].argmax(0).cpu().numpy()
            scores = dice_per_label(pred, c.label[0].numpy(), range(1, len(channel_values)))
            for ch, s in scores.items():
                if not np.isnan(s):
                    per_label[ch].append(s)
        out = {f"dice_{names[channel_values[ch]]}": float(np.mean(v)) for ch, v in per_label.items() if v}
        out["val_dice"] = float(np.mean(list(out.values()))) if out else 0.0
        return out

    return evaluate


def best_bundle_writer(template: ModelBundle, out_dir: Path, extra_meta: Callable[[int, dict], dict] | None = None,
                       dtype: torch.dtype | None = None) -> Callable[[torch.nn.Module, int, dict[str, float]], None]:
    """``on_best`` callback: write the current weights as a bundle (atomically replacing the previous best)."""

    def on_best(model: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
        meta = dict(template.meta)
        meta["metrics"] = {"step": step, **{k: round(float(v), 4) for k, v in metrics.items()}}
        if extra_meta is not None:
            meta.update(extra_meta(step, metrics))
        ModelBundle(meta=meta, labels=template.labels).save(out_dir, model.state_dict(), dtype=dtype, overwrite=True)

    return on_best
