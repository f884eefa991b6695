"""Volume classification: image → class probabilities, written as JSON or CSV.

Preprocessing is the segmentation one (RAS, bundle spacing, intensity window: :func:`infer.preprocess.prepare`),
then the whole volume is resized to the bundle's fixed input size, because a classifier sees the entire
volume at once rather than sliding windows. Classification finetuning calls the same :func:`classifier_input`, so
a network is trained on exactly what it sees at inference.

A single-label bundle (one class per case: normal / pneumonia / COVID-19) gives a softmax over its classes; a
multi-label bundle (``"multi_label": true``: independent findings, as in CT-RATE) gives one sigmoid probability per
class, and "predicted" is the most probable one, with ``positive`` listing every class at probability >= 0.5.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle

OUTPUT_FORMATS = (".json", ".csv")


def input_size(bundle: ModelBundle) -> tuple[int, int, int]:
    """The fixed (X, Y, Z) network input of a classification bundle (``inference.input_size`` or ``roi_size``)."""
    inf = bundle.inference
    size = inf.get("input_size") or inf.get("roi_size")
    if not size or len(size) != 3 or any(int(s) % 32 for s in size):
        raise UserError(f"{bundle.path or bundle.id}: inference.input_size must be 3 multiples of 32, got {size}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def build_classifier(bundle: ModelBundle, device: torch.device) -> torch.nn.Module:
    """Build and load a classification bundle's network on ``device``."""
    import vocoslicer.models.classifier  # noqa: F401 - registers the voco_classifier architecture
    from vocoslicer.infer.sliding import enable_fast_attention

    if bundle.task != "classification":
        raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a classification model")
    model = bundle.build_model().to(device).eval()
    enable_fast_attention(model)  # same weights and results; SDPA is faster on CPU and GPU
    return model


def is_multi_label(bundle: ModelBundle) -> bool:
    """True for a bundle trained with independent (sigmoid) outputs per class."""
    return bool(bundle.meta.get("multi_label", False))


def classifier_input(img: sitk.Image, preprocessing: dict[str, Any], size: tuple[int, int, int] | list[int]
                     ) -> tuple[torch.Tensor, list[str]]:
    """The (1, 1, X, Y, Z) network input of a whole volume (``depth_first``: (1, 1, Z, Y, X)) and the
    preprocessing warnings; training calls this too, so train = inference."""
    from vocoslicer.infer.preprocess import prepare

    prepared = prepare(img, preprocessing)
    x = F.interpolate(prepared.tensor, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
    if preprocessing.get("depth_first"):  # PUMIT ViTs take (N, C, D, H, W): slices first, their patch is (d, 16, 16)
        x = x.permute(0, 1, 4, 3, 2).contiguous()
    return x, list(prepared.warnings)


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over classes (single-label) or an independent sigmoid per class (multi-label)."""
    return torch.sigmoid(logits.float()) if multi_label else torch.softmax(logits.float(), dim=1)


def classify_image(img: sitk.Image, bundle: ModelBundle, model: torch.nn.Module | None = None,
                   device: str | torch.device = "auto", events: EventSink = NULL_SINK) -> dict[str, Any]:
    """Class probabilities of one image; ``model`` may be passed in by a warm worker."""
    from vocoslicer.device import pick_device
    from vocoslicer.infer.sliding import autocast_context

    dev = device if isinstance(device, torch.device) else pick_device(device)
    classes = bundle.classes
    events.progress(0, 3, stage="preprocessing")
    x, warnings = classifier_input(img, bundle.preprocessing, input_size(bundle))
    for w in warnings:
        events.warning(w)
    if model is None:
        events.progress(1, 3, stage="loading model")
        model = build_classifier(bundle, dev)
    events.progress(2, 3, stage=f"classifying on {dev.type}")
    with torch.inference_mode(), autocast_context(dev, "auto"):
        logits = model(x.to(dev))
    multi = is_multi_label(bundle)
    probs = probabilities(logits, multi)[0].cpu()
    if probs.numel() != len(classes):
        raise UserError(f"{bundle.describe()}: the network produced {probs.numel()} outputs but the bundle lists "
                        f"{len(classes)} classes")
    best = int(probs.argmax())
    events.progress(3, 3, stage="done")
    return {"model": bundle.id, "model_version": bundle.version, "classes": classes,
            "multi_label": multi, "probabilities": [round(float(p), 6) for p in probs],
            "predicted": {"index": best, "name": classes[best], "probability": round(float(probs[best]), 6)},
            **({"positive": [c for c, p in zip(classes, probs.tolist(), strict=True) if p >= 0.5]} if multi else {})}


def result_text(result: dict[str, Any], fmt: str) -> str:
    """JSON or CSV (``class,probability`` rows, predicted class marked; multi-label: positives too) text."""
    if fmt == ".json":
        return json.dumps(result, indent=2) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    multi = bool(result.get("multi_label"))
    w.writerow(["index", "class", "probability", "predicted", *(["positive"] if multi else [])])
    for i, (name, p) in enumerate(zip(result["classes"], result["probabilities"], strict=True)):
        w.writerow([i, name, f"{p:.6f}", int(i == result["predicted"]["index"]),
                    *([int(name in result.get("positive", []))] if multi else [])])
    return buf.getvalue()


def output_format(path: str | Path) -> str:
    """``.json`` or ``.csv`` from an output file name (anything else is a user error)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(f"{path}: classification output must end in .json or .csv")
    return suffix


def run_classify(input_path: str, output: str | None, model_spec: str | None, device: str = "auto",
                 series: str | None = None, events: EventSink = NULL_SINK,
                 model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The ``classify`` command: read, classify, write JSON/CSV atomically (nothing written on error)."""
    from vocoslicer.io import read_image
    from vocoslicer.io.atomic import atomic_write_text
    from vocoslicer.models.installed import resolve

    fmt = output_format(output) if output else None
    t0 = time.perf_counter()
    bundle = resolve(model_spec)
    if bundle.task != "classification":
        raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a classification model")
    img = read_image(input_path, series_uid=series)
    result = classify_image(img, bundle, model=model, device=device, events=events)
    result["input"] = str(input_path)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if output:
        atomic_write_text(output, result_text(result, fmt or ".json"))
        result["output"] = str(output)
        events.artifact(output, "table", model=bundle.id, predicted=result["predicted"]["name"])
    return result
