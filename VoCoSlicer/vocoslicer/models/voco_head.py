"""The VoCo v2 self-supervised model: SwinUNETR encoder + student/teacher projection heads (voco_spec.md §2).

Parameter names are the official ones (``backbone.swinViT.*``, ``backbone.encoder{1,2,3,4,10}.*``,
``student.layer{1,2,3}.0.*``, ``teacher.*``) so a run can start from an official checkpoint and the exported
backbone (``swinViT.*``/``encoder*`` keys) loads straight into the SwinUNETR that ``segment``/``finetune`` build.
The forward pass returns the loss, like the official module, so DDP sees the whole graph in one call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vocoslicer.models.swin import build_swinunetr, feature_size_for
from vocoslicer.ssl.voco import voco_v2_loss

BACKBONE_MODULES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


class SwinEncoder(nn.Module):
    """The encoder half of a MONAI SwinUNETR, returning the pooled VoCo embedding (24·feature_size dims).

    Pools enc0 (fs), enc1 (fs), enc2 (2fs), enc3 (4fs) and encoder10 on hidden state 4 (16fs); hidden state 3 is
    not used, exactly like the official ``forward_encs``.
    """

    def __init__(self, size: str | None = "B", feature_size: int | None = None, in_channels: int = 1,
                 use_checkpoint: bool = False, patch_merging: str = "legacy") -> None:
        super().__init__()
        net = build_swinunetr(size=size, feature_size=feature_size, in_channels=in_channels, out_channels=2,
                              patch_merging=patch_merging, use_checkpoint=use_checkpoint)
        self.feature_size = feature_size_for(size, feature_size)
        self.normalize = bool(getattr(net, "normalize", True))
        for name in BACKBONE_MODULES:
            setattr(self, name, getattr(net, name))

    @property
    def embed_dim(self) -> int:
        """Size of the pooled embedding (1152 for B, 2304 for L, 4608 for H)."""
        return 24 * self.feature_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the class
        return swin_embedding(self, x)


def swin_embedding(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled VoCo embedding computed with the encoder modules of ``net`` (a SwinUNETR or a SwinEncoder).

    Shared by pretraining and by finetuning's VoCo loss term, which must embed crops with the very modules the
    segmentation network trains, not with a copy.
    """
    hidden = net.swinViT(x, bool(getattr(net, "normalize", True)))
    feats = (net.encoder1(x), net.encoder2(hidden[0]), net.encoder3(hidden[1]), net.encoder4(hidden[2]),
             net.encoder10(hidden[4]))
    return torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)


class VoCoSegModel(nn.Module):
    """A segmentation SwinUNETR plus VoCo v2 projection heads on its encoder: the omni-supervised form
    (voco_spec.md §7.2), used when finetuning adds the VoCo loss on unlabelled crops.

    ``forward(x)`` is the plain segmentation forward (sliding-window validation, the pseudo-label teacher);
    ``forward(x, random, base, labels)`` also returns the VoCo loss of those crops, in the same call so that DDP
    sees one forward per backward. Only :attr:`net` becomes the finetuned bundle; the heads live in checkpoints.
    """

    def __init__(self, net: nn.Module, hidden_dim: int = 1024, out_dim: int = 1024, momentum: float = 0.9,
                 embed_dropout: float = 0.2) -> None:
        super().__init__()
        if not all(hasattr(net, m) for m in BACKBONE_MODULES):
            raise TypeError("VoCoSegModel needs a SwinUNETR (swinViT + encoder1-4, encoder10)")
        self.net = net
        d = 24 * int(net.swinViT.embed_dim)
        self.student = ProjectionHead(d, hidden_dim, out_dim)
        self.teacher = ProjectionHead(d, hidden_dim, out_dim)  # own initialisation, as in VoCoHead (official)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.momentum, self.embed_dropout = float(momentum), float(embed_dropout)

    def forward(self, x: torch.Tensor, random_crops: torch.Tensor | None = None,
                base_crops: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # noqa: D102
        logits = self.net(x)
        if random_crops is None or base_crops is None or labels is None:
            return logits
        bsz, sw, nb = labels.shape
        emb = swin_embedding(self.net, torch.cat([random_crops, base_crops], dim=0))
        if self.training:
            with torch.no_grad():
                t = list(self.teacher.parameters())
                torch._foreach_lerp_(t, [p.detach() for p in self.student.parameters()], 1.0 - self.momentum)
        student = self.student(F.dropout1d(emb, self.embed_dropout, training=True))  # official: always on
        with torch.no_grad():
            teacher = self.teacher(emb.detach())
        n_rand = bsz * sw
        loss, parts = voco_v2_loss(student[:n_rand].reshape(bsz, sw, -1), student[n_rand:].reshape(bsz, nb, -1),
                                   teacher[:n_rand].reshape(bsz, sw, -1), teacher[n_rand:].reshape(bsz, nb, -1),
                                   labels.to(student.dtype))
        return logits, loss, parts


class ProjectionHead(nn.Module):
    """Linear → BN(batch stats, no affine) → ReLU, twice, → Linear (the official ``projection_head``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        super().__init__()

        def bn(d: int) -> nn.Module:
            return nn.BatchNorm1d(d, affine=False, track_running_stats=False)

        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden_dim), bn(hidden_dim), nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), bn(hidden_dim), nn.ReLU(inplace=True))
        self.layer3 = nn.Sequential(nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layer3(self.layer2(self.layer1(x)))


class VoCoHead(nn.Module):
    """One shared backbone, a student head trained by the loss and a teacher head following it by EMA.

    ``forward(random_crops, base_crops, labels)`` takes crops flattened sample-major — random (B·sw, C, r, r, r),
    base (B·n², C, r, r, r) — and labels (B, sw, n²); it returns ``(loss, {"intra", "inter", "reg"})``.
    Before the teacher forward the teacher head moves ``teacher ← m·teacher + (1−m)·student`` (m = 0.9); the
    student sees the embeddings through ``Dropout1d(0.2)``, which on a 2-D tensor drops whole crop embeddings
    (the official recipe, kept on purpose).
    """

    def __init__(self, size: str | None = "B", feature_size: int | None = None, in_channels: int = 1,
                 use_checkpoint: bool = False, patch_merging: str = "legacy", hidden_dim: int = 1024,
                 out_dim: int = 1024, momentum: float = 0.9, embed_dropout: float = 0.2,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        # ``backbone`` replaces the SwinUNETR encoder by any module with ``embed_dim`` mapping crops to (N, D)
        # embeddings: CPU tests use a tiny CNN there, since Swin's 7³ windows make even tiny crops slow on CPU
        self.backbone = backbone if backbone is not None else SwinEncoder(size, feature_size, in_channels,
                                                                          use_checkpoint, patch_merging)
        d = int(self.backbone.embed_dim)
        self.student = ProjectionHead(d, hidden_dim, out_dim)
        self.teacher = ProjectionHead(d, hidden_dim, out_dim)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss_fn = voco_v2_loss  # swappable so benchmarks can time the official loop form in the same model
        self.momentum = float(momentum)
        self.embed_dropout = float(embed_dropout)
        self.config = {"size": size, "feature_size": getattr(self.backbone, "feature_size", None),
                       "in_channels": in_channels,
                       "patch_merging": patch_merging, "hidden_dim": hidden_dim, "out_dim": out_dim}

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher ← m·teacher + (1−m)·student over the projection head (v2: the backbone is shared)."""
        t = list(self.teacher.parameters())
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - self.momentum)

    def forward(self, random_crops: torch.Tensor, base_crops: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # noqa: D102
        bsz, sw, nb = labels.shape
        emb = self.backbone(torch.cat([random_crops, base_crops], dim=0))
        if self.training:
            self.ema_update()
        student = self.student(F.dropout1d(emb, self.embed_dropout, training=True))
        with torch.no_grad():
            teacher = self.teacher(emb.detach())
        n_rand = bsz * sw

        def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return z[:n_rand].reshape(bsz, sw, -1), z[n_rand:].reshape(bsz, nb, -1)

        s_rand, s_base = split(student)
        t_rand, t_base = split(teacher)
        return self.loss_fn(s_rand, s_base, t_rand, t_base, labels.to(student.dtype))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights with the SwinUNETR key names (``swinViT.*``, ``encoder*``), ready for export."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}

    def load_pretrained(self, checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
        """Start from an official VoCo checkpoint (SSL_head, v2 training checkpoint, VoComni) or one of ours.

        The backbone goes through the official renames (``module.``/``backbone.``/``swin_vit``); projection heads
        are loaded when present with matching shapes (released SSL_head files have none, so heads stay random).
        Returns the backbone load report as a dict plus ``heads_loaded``.
        """
        from vocoslicer.models.checkpoints import load_official_weights, official_state_dict, read_checkpoint

        obj = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]  # a vocoslicer training checkpoint (train/loop.py)
        report = load_official_weights(self.backbone, obj, source=str(checkpoint)[:200])
        sd, _, _ = official_state_dict(obj)
        heads = 0
        for name in ("student", "teacher"):
            head = getattr(self, name)
            own = head.state_dict()
            got = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            match = {k: v for k, v in got.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
            if match and len(match) == len(own):
                head.load_state_dict(match)
                heads += len(match)
        return {**report.to_dict(), "heads_loaded": heads}
