"""The semi-supervised part of finetuning: the frozen teacher, the labelled + unlabelled (+ VoCo) crop stream and
the step function that combines supervised, pseudo-label and VoCo losses in one forward pass.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vocoslicer.train.pseudo import confident_pseudo_labels, masked_dice_ce
from vocoslicer.train.segmentation import CropStream, PreparedCase


class Teacher:
    """The frozen teacher of the semi-supervised stage; saved in checkpoints so a resumed run keeps it."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None  # template for rebuilding the teacher on resume
        self.started_at: int = -1

    @property
    def active(self) -> bool:
        """True once the teacher has been frozen."""
        return self.model is not None

    def freeze_copy_of(self, student: torch.nn.Module, step: int) -> None:
        """Deep-copy ``student`` into an eval-mode, no-grad teacher (no EMA, as in the official code)."""
        teacher = copy.deepcopy(student).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.model, self.started_at = teacher, step

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint form: weights only when active."""
        return {"started_at": self.started_at,
                "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.model else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the teacher from a checkpoint (needs :attr:`student` as the architecture template)."""
        if not state.get("weights"):
            self.model, self.started_at = None, -1
            return
        if self.student is None:
            raise RuntimeError("Teacher.student must be set before loading a teacher checkpoint")
        self.freeze_copy_of(self.student, int(state["started_at"]))
        assert self.model is not None
        self.model.load_state_dict(state["weights"])


class FinetuneStream(torch.utils.data.IterableDataset):
    """Labelled crop batches (``image``, ``label``) plus, when given, unlabelled crops (``u_image``) and VoCo
    crops of ``ssl_cases`` (``ssl_random``, ``ssl_base``, ``ssl_labels``: ``u_batch`` volumes, official layout)."""

    def __init__(self, labelled: CropStream, unlabelled: Sequence[PreparedCase], roi: Sequence[int],
                 u_batch: int, seed: int = 0, ssl_geometry: Any = None,
                 ssl_cases: Sequence[PreparedCase] = ()) -> None:
        super().__init__()
        self.labelled, self.unlabelled = labelled, list(unlabelled)
        self.roi, self.u_batch, self.seed = tuple(int(r) for r in roi), int(u_batch), seed
        self.ssl_geometry, self.ssl_cases = ssl_geometry, list(ssl_cases)

    def _voco_batch(self, rng: random.Random, nrng: Any) -> dict[str, torch.Tensor]:
        from vocoslicer.data.ssl_dataset import read_region, voco_sample

        g = self.ssl_geometry
        items = []
        for _ in range(self.u_batch):
            values, dst = read_region(rng.choice(self.ssl_cases).image[0].numpy(), g.region, nrng)
            items.append(voco_sample(values, dst, g, nrng))
        return {"ssl_random": torch.cat([it["random"] for it in items]),
                "ssl_base": torch.cat([it["base"] for it in items]),
                "ssl_labels": torch.stack([it["labels"] for it in items])}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from monai.transforms import Compose, RandSpatialCrop, SpatialPad

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = random.Random(self.seed * 1000 + wid + 17)
        crop = Compose([SpatialPad(self.roi), RandSpatialCrop(self.roi, random_size=False)])
        crop.set_random_state(seed=self.seed * 1000 + wid + 17)
        import numpy as np

        nrng = np.random.default_rng(self.seed * 1000 + wid + 29)
        for batch in self.labelled:
            if self.unlabelled:
                batch["u_image"] = torch.stack([torch.as_tensor(crop(rng.choice(self.unlabelled).image)).float()
                                                for _ in range(self.u_batch)])
            if self.ssl_geometry is not None and self.ssl_cases:
                batch.update(self._voco_batch(rng, nrng))
            yield batch


def semi_step(teacher: Teacher, confidence: float, semi_weight: float, ssl_weight: float = 0.0
              ) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]:
    """Step function: DiceCE on labelled crops (+ masked pseudo-label DiceCE once the teacher exists, + the VoCo
    loss on the batch's VoCo crops when ``ssl_weight`` > 0 and the model is a :class:`VoCoSegModel`)."""
    from monai.losses import DiceCELoss

    sup_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"]
        use_semi = teacher.active and "u_image" in batch
        use_ssl = ssl_weight > 0 and "ssl_random" in batch
        xin = torch.cat([x, batch["u_image"]]) if use_semi else x
        parts: dict[str, Any] = {}
        if use_ssl:  # one forward for everything: DDP allows one forward per backward
            logits, ssl, ssl_parts = model(xin, batch["ssl_random"], batch["ssl_base"], batch["ssl_labels"])
            parts.update({"ssl": ssl.detach(), **{f"ssl_{k}": v.detach() for k, v in ssl_parts.items()}})
        else:
            logits = model(xin)
        sup = sup_loss(logits[: len(x)].float(), batch["label"])
        loss = sup + ssl_weight * ssl if use_ssl else sup
        parts["sup"] = sup.detach()
        if use_semi:
            assert teacher.model is not None
            with torch.no_grad():
                pseudo, mask = confident_pseudo_labels(teacher.model(batch["u_image"]), confidence)
            semi = masked_dice_ce(logits[len(x):], pseudo, mask)
            loss = loss + semi_weight * semi
            parts.update({"semi": semi.detach(), "confident": mask.float().mean().detach()})
        return loss, parts

    return step


def seg_network(model: torch.nn.Module) -> torch.nn.Module:
    """The network that becomes the bundle (a :class:`VoCoSegModel`'s ``net``; any other model itself)."""
    from vocoslicer.models.voco_head import VoCoSegModel

    return model.net if isinstance(model, VoCoSegModel) else model
