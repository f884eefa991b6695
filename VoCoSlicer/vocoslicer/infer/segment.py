"""Segmentation inference: input volume → label map on exactly the input's grid.

:mod:`vocoslicer.infer.preprocess` does the geometry, :mod:`vocoslicer.infer.sliding` the network (batched
windows, autocast and OOM fallback on CUDA, argmax as early as possible), and the job context of
:mod:`vocoslicer.jobs` the progress events, cancel and the GPU lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from vocoslicer.contracts.labels import labels_csv_path
from vocoslicer.device import pick_device
from vocoslicer.errors import Cancelled, UserError
from vocoslicer.infer.preprocess import prepare
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle

FAST_SPACING = (3.0, 3.0, 3.0)


def segment_image(img: sitk.Image, bundle: ModelBundle, model: torch.nn.Module | None = None,
                  device: str | torch.device = "auto", fast: bool = False, overlap: float | None = None,
                  events: EventSink = NULL_SINK, cancel: Callable[[], bool] | None = None,
                  largest_component: bool = False, runtime: str = "eager", uncertainty: Any = None) -> sitk.Image:
    """Segment one image with ``bundle``; returns a label image on ``img``'s exact grid.

    ``runtime`` picks the CPU inference runtime (:mod:`vocoslicer.infer.runtime`); the CLI defaults to ``auto``.
    ``uncertainty`` (an :class:`~vocoslicer.infer.uncertainty.UncertaintyRequest`) is filled with the case's
    uncertainty scores computed from the same blended scores (no second forward pass; it runs in PyTorch, since
    it needs the blended scores the runtimes do not hand back).
    """
    from vocoslicer.infer.postprocess import keep_largest_component_image
    from vocoslicer.infer.sliding import segment_prepared

    if bundle.task != "segmentation":
        raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a segmentation model")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    pre = bundle.preprocessing
    spacing = FAST_SPACING if fast else None
    events.progress(0, 4, stage="preprocessing")
    prepared = prepare(img, pre, spacing)
    for w in prepared.warnings:
        events.warning(w)
    if model is None:
        events.progress(1, 4, stage="loading model")
        model = bundle.build_model().to(dev)
    inf = bundle.inference
    ov = float(overlap if overlap is not None else inf["overlap"])
    events.progress(2, 4, stage=f"inference on {dev.type}")
    # fast engine: batched windows, autocast and OOM fallback on CUDA; scores are resampled (not labels) onto the
    # input grid except in --fast mode, where the cheap nearest-neighbour label path is the point
    if uncertainty is not None:
        from vocoslicer.infer.uncertainty import segment_prepared_uncertain

        label = segment_prepared_uncertain(model, prepared.tensor, prepared.grid, img, bundle.channel_values,
                                           inf["roi_size"], ov, str(inf["mode"]), int(inf["sw_batch_size"]), dev,
                                           uncertainty, events, smooth=not fast, cancel=cancel, whole_volume=fast,
                                           names={lb.value: lb.name for lb in bundle.labels})
    else:
        label = segment_prepared(model, prepared.tensor, prepared.grid, img, bundle.channel_values, inf["roi_size"],
                                 ov, str(inf["mode"]), int(inf["sw_batch_size"]), dev, events, smooth=not fast,
                                 cancel=cancel, whole_volume=fast, runtime=runtime, model_key=bundle_key(bundle))
    if largest_component:
        label = keep_largest_component_image(label)
    events.progress(4, 4, stage="done")
    return label


def bundle_key(bundle: ModelBundle) -> str | None:
    """The weights' sha256 from model.json: what the runtime's graph cache is keyed on (``None``: hash weights)."""
    sha = (bundle.meta.get("weights") or {}).get("sha256")
    return str(sha) if sha else None


def run_segment(input_path: str, output: str, model_spec: str | None = None, device: str = "auto",
                fast: bool = False, series: str | None = None, overlap: float | None = None,
                events: EventSink | None = None, largest_component: bool = False, runtime: str = "auto",
                threads: int | None = None, uncertainty: bool = False, uncertainty_map: str | None = None,
                tta: str = "none") -> dict[str, Any]:
    """The ``segment`` command: read, segment, write label map + labels CSV (both atomically).

    ``threads`` (default: ``OMP_NUM_THREADS`` or all cores) sets the CPU threads of torch and of the runtime.
    """
    from vocoslicer.infer.runtime import apply_threads, check_runtime
    from vocoslicer.io import read_image, write_image
    from vocoslicer.jobs import current_job
    from vocoslicer.models.installed import resolve

    job = current_job()
    events = events if events is not None else job.events
    check_runtime(runtime)
    apply_threads(threads)

    out = Path(output)
    if out.exists() and out.is_dir():
        raise UserError(f"{out}: is a folder; give an output file name such as {out / 'segmentation.nii.gz'}")
    t0 = time.perf_counter()
    img = read_image(input_path, series_uid=series)  # the input first: the most likely mistake is reported first
    bundle = resolve(model_spec)
    events.log(f"segmenting {input_path} with {bundle.describe()}")
    dev = pick_device(device)
    unc = None
    if uncertainty or uncertainty_map or tta != "none":
        from vocoslicer.infer.uncertainty import UncertaintyRequest, write_uncertainty

        unc = UncertaintyRequest(tta=tta, map_path=uncertainty_map)
    with job.gpu_lock(dev):
        label = segment_image(img, bundle, device=dev, fast=fast, overlap=overlap, events=events,
                              cancel=job.should_stop, largest_component=largest_component, runtime=runtime,
                              uncertainty=unc)
    if job.should_stop():
        raise Cancelled("segmentation cancelled; nothing was written")
    write_image(label, out)
    csv_path = bundle.labels.write_csv(labels_csv_path(out))
    extra = {} if unc is None else write_uncertainty(unc, out, events, input=str(input_path), model=bundle.id,
                                                     model_version=bundle.version)
    seconds = time.perf_counter() - t0
    events.artifact(out, "segmentation", labels=str(csv_path), model=bundle.id, model_version=bundle.version,
                    seconds=round(seconds, 3), **extra)
    return {"output": str(out), "labels": str(csv_path), "seconds": seconds, "model": bundle.describe(), **extra}
