"""The options of both finetunes, in one torch-free module: the CLI builds its parser from these dataclasses (their
field defaults are the only defaults; ``vocoslicer finetune --help`` must not import torch) and scripts construct
them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from vocoslicer.errors import UserError

ARCHS = ("voco_classifier", "pumit_vit_cls")
"""The classifier architectures ``--arch`` accepts."""
T = TypeVar("T")
_MISSING_ARG = object()


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of the options dataclass ``cls`` (what a parser default should be)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


class _Unset:
    """Mixin of a parser default that means "not given": :func:`from_args` leaves the dataclass's own default."""


class _UnsetFloat(float, _Unset):
    pass


class _UnsetInt(int, _Unset):
    pass


class _UnsetStr(str, _Unset):
    pass


def unset(value: float | int | str) -> Any:
    """``value`` as a parser default marked "not given" (it behaves exactly like ``value``).

    For an option that two options dataclasses share with different defaults (``finetune --lr`` is 1e-4 for
    segmentation, 3e-4 for classification): the parser shows one default, and :func:`from_args` gives each
    dataclass its own when the user did not give the option.
    """
    kind = {float: _UnsetFloat, int: _UnsetInt, str: _UnsetStr}[type(value)]
    return kind(value)


def from_args(cls: type[T], args: Any, renames: Mapping[str, str] | None = None, **values: Any) -> T:
    """The options dataclass ``cls`` from parsed arguments (an ``argparse.Namespace``).

    Each field takes the argument of the same name (``renames``: field → argument name); ``values`` are given
    explicitly (converted arguments). A field without an argument, or whose argument is still an :func:`unset`
    parser default, keeps the dataclass default, so every default is written once, in the dataclass.
    """
    renames = renames or {}
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            kwargs[f.name] = values[f.name]
            continue
        value = getattr(args, renames.get(f.name, f.name), _MISSING_ARG)
        if value is not _MISSING_ARG and not isinstance(value, _Unset):
            kwargs[f.name] = value
    return cls(**kwargs)


@dataclass
class FinetuneOptions:
    """Everything ``vocoslicer finetune`` accepts (see the command's help for each option)."""

    cohort: str | Path
    init: str
    out: str | Path
    steps: int = 200
    lr: float = 1e-4
    batch: int = 2
    roi: Sequence[int] | None = None
    semi: bool = True
    semi_start: float = 0.5
    confidence: float = 0.9
    semi_weight: float = 1.0
    sampler: str = "classes"  # crop centres: each label equally often | posneg (foreground/background 1:1)
    ssl_weight: float = 0.0  # > 0: add the VoCo v2 loss on unlabelled crops (omni-supervised, voco_spec §7.2)
    ssl_grid: int = 2  # VoCo base-crop grid n (n² base crops; official pretraining uses 3)
    ssl_sw: int = 2  # VoCo random crops per volume
    eval_every: int = 0  # 0: ten evaluations per run
    patience: int = 0
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    grad_accum: int = 1
    compile: bool = False
    model_id: str | None = None
    feature_size: int | None = None  # scratch only
    preprocessing: dict[str, Any] | None = None  # scratch / checkpoint only (a bundle brings its own)
    install: bool = True
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """One-line errors for impossible values (NaN passes ``lr <= 0`` checks, hence the ``isfinite``)."""
        self._check_optimisation()
        if self.preprocessing is not None:
            from vocoslicer.infer.preprocess import check_preprocessing

            check_preprocessing(self.preprocessing)
        self._check_recipe()

    def _check_optimisation(self) -> None:
        if self.steps < 1 or self.batch < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"finetune: --steps and --batch must be >= 1 and --lr a finite number > 0 (got --lr "
                            f"{self.lr})")
        for name, value in (("--semi-weight", self.semi_weight), ("--ssl-weight", self.ssl_weight),
                            ("--weight-decay", self.weight_decay)):
            if not math.isfinite(value) or value < 0:
                raise UserError(f"finetune: {name} must be a finite number >= 0, got {value}")
        if self.warmup_steps < 0 or self.grad_accum < 1 or self.eval_every < 0 or self.patience < 0:
            raise UserError("finetune: --warmup, --eval-every and --patience must be >= 0, --grad-accum >= 1")
        if self.feature_size is not None and (self.feature_size < 12 or self.feature_size % 12):
            raise UserError(f"finetune: --feature-size {self.feature_size} must be a positive multiple of 12 "
                            "(SwinUNETR)")

    def _check_recipe(self) -> None:
        if not 0.0 <= self.semi_start < 1.0:
            raise UserError(f"finetune: --semi-start must be in [0, 1), got {self.semi_start}")
        if not 0.0 < self.confidence <= 1.0:
            raise UserError(f"finetune: --confidence must be in (0, 1], got {self.confidence}")
        if self.ssl_weight < 0 or self.ssl_grid < 1 or self.ssl_sw < 1:
            raise UserError("finetune: --ssl-weight must be >= 0, --ssl-grid and --ssl-sw >= 1")
        if self.sampler not in ("classes", "posneg"):
            raise UserError(f"finetune: --sampler must be 'classes' or 'posneg', got {self.sampler!r}")
        if self.roi is not None and (len(self.roi) != 3 or min(self.roi) < 16 or any(r % 32 for r in self.roi)):
            raise UserError(f"finetune: --roi must be three multiples of 32 (SwinUNETR), got {list(self.roi)}")


@dataclass
class ClsOptions:
    """Everything ``vocoslicer finetune --task classification`` accepts."""

    cohort: str | Path
    init: str
    out: str | Path
    arch: str | None = None  # None: from --init (SwinUNETR → voco_classifier, PUMIT → pumit_vit_cls)
    steps: int = 200
    lr: float = 3e-4  # official CC-CCII
    batch: int = 4  # official CC-CCII
    warmup_steps: int | None = None  # None: 5 % of the steps (official: 5 of 100 epochs)
    weight_decay: float = 0.01  # PyTorch's AdamW default, which the official code keeps
    input_size: Sequence[int] | None = None
    multi_label: bool | None = None  # None: multi-label when any case carries several classes
    balanced: bool = True
    augment: bool = True
    pool: str = "decoder"
    feature_size: int | None = None
    vit_size: str | None = None
    patch: int | None = None  # pumit_vit_cls patch edge (default 16, the official downstream patch)
    preprocessing: dict[str, Any] | None = None
    eval_every: int = 0
    patience: int = 0
    device: str = "auto"
    amp: str = "off"  # the official recipe trains without AMP
    grad_accum: int = 1
    compile: bool = False
    seed: int = 0
    model_id: str | None = None
    install: bool = True
    resume: bool = False

    def validate(self) -> None:
        """One-line errors for impossible values."""
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise UserError("finetune: --steps and --batch must be >= 1 and --lr > 0")
        if self.arch is not None and self.arch not in ARCHS:
            raise UserError(f"finetune: --arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.input_size is not None and (len(self.input_size) != 3 or any(int(s) < 32 or int(s) % 32
                                                                             for s in self.input_size)):
            raise UserError(f"finetune: --input-size must be three multiples of 32, got {list(self.input_size)}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise UserError(f"finetune: --warmup must be in [0, steps), got {self.warmup_steps}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise UserError(f"finetune: --weight-decay must be a finite number >= 0, got {self.weight_decay}")
