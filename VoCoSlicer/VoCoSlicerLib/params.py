"""Module parameters as plain dataclasses, and their mapping to engine command lines.

The Slicer parameter-node wrappers in the module files mirror these fields one to one (a static test checks
it), so the GUI binding and the command line cannot drift apart. Every ``*_args`` function returns the command's
arguments after ``python -m vocoslicer [--run-dir DIR] [--events stdout]`` (the job options, added by the job
client); keeping them here, small and tested, makes engine CLI changes cheap to follow.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vocoslicer.contracts.models import DEMO_MODEL_ID as DEMO_MODEL_ID  # the engine's bundled model
from vocoslicer.contracts.torchrun import torchrun_command

DEVICES = ("auto", "cuda", "cpu")
PRETRAIN_METHODS = ("voco", "tokenizer", "mim")
# segment, classify and models download report progress/artifacts through their own event option, not through
# the job's (--run-dir/--events): run them without a run directory and pass it, so the GUI sees their events
COMMAND_EVENTS = ("--events", "stdout")
# sizes each method's engine command accepts (VoCo SwinUNETR B/L/H; PUMIT tokenizer presets; PUMIT ViT)
PRETRAIN_SIZES = {"voco": ("B", "L", "H"), "tokenizer": ("paper", "small", "tiny"), "mim": ("tiny", "S", "B", "L")}
MODEL_SIZES = ("tiny", "small", "S", "B", "L", "H", "paper")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class SegmentParams:
    """VoCoSegment's Segment/Classify options."""

    model: str = ""  # installed model ID, ID@VERSION or bundle path; "" = the bundled demo model
    device: str = "auto"
    fast: bool = False
    useWarmWorker: bool = True  # noqa: N815 - Slicer parameter names are camelCase
    show3D: bool = False  # noqa: N815
    uncertaintyMap: bool = False  # noqa: N815 - also write the voxel entropy map and overlay it

    @staticmethod
    def map_path(output_path: str) -> str:
        """Where the entropy map goes: next to the output, i.e. in the job's work folder (deleted with it)."""
        return str(Path(output_path).with_name("uncertainty.nii.gz"))

    def segment_args(self, input_path: str, output_path: str) -> list[str]:
        """``segment IN -o OUT [--model M] [--device D] [--fast] --uncertainty [--uncertainty-map MAP] --events
        stdout``: the uncertainty comes from the same softmax scores (no extra pass), so it is always asked for."""
        _check_choice("device", self.device, DEVICES)
        args = ["segment", str(input_path), "-o", str(output_path)]
        if self.model:
            args += ["--model", self.model]
        args += ["--device", self.device]
        if self.fast:
            args.append("--fast")
        args.append("--uncertainty")
        if self.uncertaintyMap:
            args += ["--uncertainty-map", self.map_path(output_path)]
        return [*args, *COMMAND_EVENTS]

    def uncertainty_request(self, output_path: str) -> dict[str, Any]:
        """The same options for a warm-worker ``segment`` request (vocoslicer/infer/worker.py)."""
        return {"uncertainty": True, **({"uncertainty_map": self.map_path(output_path)} if self.uncertaintyMap
                                        else {})}

    def classify_args(self, input_path: str, output_json: str) -> list[str]:
        """``classify IN -o OUT.json --model M --device D --events stdout``."""
        _check_choice("device", self.device, DEVICES)
        if not self.model:
            raise ValueError("choose a classification model (the bundled demo model segments, it does not classify)")
        return ["classify", str(input_path), "-o", str(output_json), "--model", self.model, "--device", self.device,
                *COMMAND_EVENTS]


@dataclass
class CohortParams:
    """Where corrected cases go, and who corrected them (provenance)."""

    cohortDir: str = ""  # noqa: N815
    annotator: str = ""

    def add_args(self, image: str, label: str | None = None, labels_csv: str | None = None, model_id: str = "",
                 model_version: str = "", corrected: bool = True) -> list[str]:
        """``cohort add COHORT --image IMG [--label L --labels CSV] [--model-id ..] [--uncorrected] [--by ..]``."""
        if not self.cohortDir:
            raise ValueError("choose a cohort folder first")
        if labels_csv and not label:
            raise ValueError("a labels table needs a label map")
        args = ["cohort", "add", self.cohortDir, "--image", str(image)]
        if label:
            args += ["--label", str(label)]
            if labels_csv:
                args += ["--labels", str(labels_csv)]
            if not corrected:
                args.append("--uncorrected")
        if model_id:
            args += ["--model-id", model_id]
        if model_version:
            args += ["--model-version", model_version]
        if self.annotator:
            args += ["--by", self.annotator]
        return args

    def list_args(self) -> list[str]:
        """``cohort list COHORT --json``."""
        if not self.cohortDir:
            raise ValueError("choose a cohort folder first")
        return ["cohort", "list", self.cohortDir, "--json"]


@dataclass
class FinetuneParams:
    """VoCoSegment's Finetune settings (the base model is the one selected for segmentation)."""

    baseModel: str = ""  # noqa: N815 - installed ID, ID@VERSION, bundle path or checkpoint
    cohortDir: str = ""  # noqa: N815
    steps: int = 200
    learningRate: float = 1e-4  # noqa: N815
    batchSize: int = 2  # noqa: N815
    semiSupervised: bool = True  # noqa: N815 - also learn from unlabelled cases (confident pseudo-labels)
    vocoLoss: bool = False  # noqa: N815 - add the VoCo loss on unlabelled crops (SwinUNETR models, weight 1)
    device: str = "auto"

    def args(self, out_dir: str, resume: bool = False) -> list[str]:
        """``finetune --cohort C --init M --out RUN --steps N --lr LR --batch B --semi|--no-semi --device D``."""
        if not self.cohortDir:
            raise ValueError("choose a cohort folder first")
        if not self.baseModel:
            raise ValueError("choose the model to finetune")
        _check_choice("device", self.device, DEVICES)
        _check_positive("steps", self.steps)
        _check_positive("learning rate", self.learningRate)
        _check_positive("batch size", self.batchSize)
        args = ["finetune", "--cohort", self.cohortDir, "--init", self.baseModel, "--out", str(out_dir),
                "--steps", str(self.steps), "--lr", f"{self.learningRate:g}", "--batch", str(self.batchSize),
                "--semi" if self.semiSupervised else "--no-semi", "--device", self.device]
        if self.vocoLoss:
            args += ["--ssl-weight", "1"]
        return [*args, "--resume"] if resume else args


@dataclass
class PretrainParams:
    """VoCoPretrain's run settings."""

    method: str = "voco"
    dataDirs: list[str] = field(default_factory=list)  # noqa: N815
    modelSize: str = "B"  # noqa: N815
    gpus: int = 1
    steps: int = 1000
    batchSize: int = 2  # noqa: N815
    cropSize: int = 96  # noqa: N815
    outputDir: str = ""  # noqa: N815
    initCheckpoint: str = ""  # noqa: N815 - voco: --init CHECKPOINT; mim: --tokenizer RUNDIR|BUNDLE

    def args(self, resume: bool = False) -> list[str]:
        """``pretrain METHOD --data D.. --out RUN --size S --steps N --batch B --crop C --gpus G [...]``."""
        _check_choice("method", self.method, PRETRAIN_METHODS)
        _check_choice(f"model size for {self.method}", self.modelSize, PRETRAIN_SIZES[self.method])
        if not self.dataDirs:
            raise ValueError("add at least one data folder")
        if not self.outputDir:
            raise ValueError("choose an output folder")
        for name in ("gpus", "steps", "batchSize", "cropSize"):
            _check_positive(name, getattr(self, name))
        args = ["pretrain", self.method, "--data", *self.dataDirs, "--out", self.outputDir, "--size", self.modelSize,
                "--steps", str(self.steps), "--batch", str(self.batchSize), "--crop", str(self.cropSize),
                "--gpus", str(self.gpus)]
        if self.method == "mim":
            if not self.initCheckpoint:
                raise ValueError("PUMIT MIM needs a trained tokenizer: set 'Start from' to its run folder or bundle")
            args += ["--tokenizer", self.initCheckpoint]
        elif self.initCheckpoint:
            if self.method == "tokenizer":
                raise ValueError("the tokenizer trains from scratch: clear 'Start from' (or use Resume)")
            args += ["--init", self.initCheckpoint]
        return [*args, "--resume"] if resume else args

    def torchrun_command(self, nnodes: int = 1, python: str = "python") -> str:
        """The command that runs these settings under torch.distributed (the same form the engine's
        ``pretrain voco --print-torchrun`` prints), for a terminal or a cluster job script. ``python`` defaults
        to the cluster's ``python``; several nodes read ``$NODE_RANK``/``$MASTER_ADDR`` from the job's environment.
        """
        args = self.args()
        i = args.index("--gpus")
        del args[i:i + 2]  # torch.distributed starts the processes itself
        cmd = torchrun_command(["vocoslicer", *args], self.gpus, nnodes, node_rank="$NODE_RANK",
                               master_addr="$MASTER_ADDR", python=python)
        return " ".join(a if "=$" in a else shlex.quote(a) for a in cmd)


def field_names(cls: type) -> list[str]:
    """The parameter names of a params dataclass (what the parameter-node wrapper must mirror)."""
    return [f.name for f in fields(cls)]


def from_parameter_node(cls: type, wrapper: Any) -> Any:
    """Build a params dataclass from a parameter-node wrapper (or any object with the same attributes)."""
    values = {}
    for name in field_names(cls):
        value = getattr(wrapper, name)
        if hasattr(value, "as_posix"):  # pathlib.Path from a ctkPathLineEdit binding
            value = "" if str(value) in ("", ".") else str(value)
        values[name] = list(value) if isinstance(value, (list, tuple)) else value
    return cls(**values)
