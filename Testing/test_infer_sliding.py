"""Fast sliding window vs MONAI's sliding_window_inference (same windows, same blending), OOM fallback, clean-up.

The network is a tiny conv + instance-norm model: its output depends on the whole window (instance norm), so
any difference in window placement or blending between the two implementations shows up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import Threshold
from monai.inferers import sliding_window_inference

from vocoslicer.errors import Cancelled, UserError
from vocoslicer.infer.oom import batch_sizes, device_job, is_oom, run_with_oom_fallback
from vocoslicer.infer.postprocess import keep_largest_component
from vocoslicer.infer.sliding import (
    autocast_context,
    count_windows,
    enable_fast_attention,
    sliding_window_labels,
    sliding_window_scores,
    window_starts,
)
from vocoslicer.jobs.events import EventSink


def tiny_net(out_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4),
                               torch.nn.Conv3d(4, out_channels, 1)).eval()


def volume(shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(seed))


def monai_scores(model: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], overlap: float,
                 mode: str) -> torch.Tensor:
    with torch.no_grad():
        return sliding_window_inference(x, roi, 3, model, overlap=overlap, mode=mode)[0]


@pytest.mark.parametrize("mode,overlap", [("gaussian", 0.5), ("constant", 0.75), ("gaussian", 0.25)])
def test_scores_and_labels_match_monai(mode: str, overlap: float) -> None:
    model = tiny_net()
    x = volume((37, 29, 45))
    roi = (16, 16, 16)
    ref = monai_scores(model, x, roi, overlap, mode)
    ours = sliding_window_scores(model, x, roi, overlap=overlap, mode=mode, sw_batch_size=5,
                                 out_dtype=torch.float32)
    assert ours.shape == ref.shape == (3, 37, 29, 45)
    assert torch.allclose(ours, ref, atol=1e-4)
    labels = sliding_window_labels(model, x, roi, overlap=overlap, mode=mode, sw_batch_size=2,
                                   channel_values=[0, 5, 9])
    assert labels.dtype == torch.uint8 and labels.shape == (37, 29, 45)
    expected = torch.tensor([0, 5, 9], dtype=torch.uint8)[ref.argmax(0)]
    # ties aside, the argmax of the blended sum equals MONAI's argmax of the normalised average
    assert (labels == expected).float().mean() > 0.999


def test_volume_smaller_than_window_is_padded_like_monai() -> None:
    model = tiny_net(2)
    x = volume((10, 20, 7))
    ref = monai_scores(model, x, (16, 16, 16), 0.5, "gaussian")
    ours = sliding_window_scores(model, x[0], (16, 16, 16), out_dtype=torch.float32)
    assert ours.shape == (2, 10, 20, 7) and torch.allclose(ours, ref, atol=1e-4)
    assert sliding_window_labels(model, x, (16, 16, 16)).shape == (10, 20, 7)


def test_window_positions_progress_and_half_output() -> None:
    assert window_starts(100, 96, 0.5) == [0, 4]
    assert window_starts(96, 96, 0.75) == [0]
    assert window_starts(200, 96, 0.75) == [0, 24, 48, 72, 96, 104]
    assert count_windows((160, 160, 128), (96, 96, 96), 0.5) == 18  # matches the spec's CPU probe
    assert count_windows((160, 160, 128), (96, 96, 96), 0.75) == 48
    seen: list[tuple[int, int]] = []
    out = sliding_window_scores(tiny_net(), volume((20, 20, 40)), (16, 16, 16), progress=lambda d, t: seen.append(
        (d, t)))
    assert out.dtype == torch.float16
    assert seen == [(4, 16), (8, 16), (12, 16), (16, 16)]  # 2 x 2 x 4 windows, 4 per batch


def test_slabs_are_finalised_while_windows_are_still_running() -> None:
    # the accumulator never spans the whole volume: z slabs are handed over as soon as they are complete
    from vocoslicer.infer.sliding import _run

    slabs: list[tuple[int, int, int]] = []
    _run(tiny_net(), volume((20, 20, 64))[0], (16, 16, 16), 0.5, "gaussian", 4, torch.device("cpu"), "off", 0.125,
         lambda acc, w, z0, z1: slabs.append((z0, z1, acc.shape[-1])), False, None, None)
    assert [(a, b) for a, b, _ in slabs] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48), (48, 64)]
    assert max(depth for _, _, depth in slabs) <= 16


def test_bad_inputs_and_cancel() -> None:
    model = tiny_net()
    bad = volume((20, 20, 20))
    bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        sliding_window_labels(model, bad, (16, 16, 16))
    with pytest.raises(UserError, match="too small"):
        sliding_window_labels(model, volume((20, 1, 20)), (16, 16, 16))
    with pytest.raises(Cancelled):
        sliding_window_labels(model, volume((20, 20, 20)), (16, 16, 16), cancel=lambda: True)
    with pytest.raises(UserError, match="precision"):
        autocast_context(torch.device("cpu"), "fp8")


def test_cpu_bf16_autocast_path_runs() -> None:
    # the CUDA path uses the same code under autocast; on CPU bf16 must be asked for explicitly
    labels = sliding_window_labels(tiny_net(), volume((20, 20, 20)), (16, 16, 16), amp="bf16")
    assert labels.shape == (20, 20, 20)


def test_fast_attention_on_swin_matches_plain() -> None:
    from vocoslicer.models.swin import build_swinunetr

    a = build_swinunetr(None, feature_size=12, out_channels=2).eval()
    b = build_swinunetr(None, feature_size=12, out_channels=2).eval()
    b.load_state_dict(a.state_dict())
    assert enable_fast_attention(b) == 8  # 4 stages x 2 blocks
    x = volume((64, 32, 32))
    with torch.inference_mode():
        assert torch.allclose(a(x), b(x), atol=1e-4)


def test_oom_fallback_halves_then_goes_to_cpu(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    sink = EventSink(path=events)
    attempts: list[tuple[str, int]] = []

    def fn(dev: torch.device, bs: int) -> str:
        attempts.append((dev.type, bs))
        if dev.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "ok"

    result, dev, bs = run_with_oom_fallback(fn, "cuda", 8, sink)
    sink.close()
    assert (result, dev.type, bs) == ("ok", "cpu", 8)
    assert attempts == [("cuda", 8), ("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 8)]
    warnings = [json.loads(line)["message"] for line in events.read_text().splitlines()]
    assert len(warnings) == 4 and "retrying with 4" in warnings[0] and "CPU" in warnings[-1]


def test_oom_fallback_stops_at_fitting_batch_and_reraises_other_errors() -> None:
    calls: list[int] = []

    def fn(dev: torch.device, bs: int) -> int:
        calls.append(bs)
        if bs > 2:
            raise RuntimeError("CUDA error: out of memory")
        return bs * 10

    assert run_with_oom_fallback(fn, "cpu", 16) == (20, torch.device("cpu"), 2)
    assert calls == [16, 8, 4, 2]
    with pytest.raises(ValueError):
        run_with_oom_fallback(lambda d, b: (_ for _ in ()).throw(ValueError("bug")), "cpu", 4)
    with pytest.raises(UserError, match="not enough memory"):
        run_with_oom_fallback(lambda d, b: (_ for _ in ()).throw(MemoryError()), "cpu", 2)
    assert batch_sizes(5) == [5, 2, 1] and is_oom(torch.OutOfMemoryError("x")) and not is_oom(ValueError("x"))
    with device_job("cpu"):
        pass


def test_keep_largest_component() -> None:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 1  # big
    lab[15:17, 15:17, 15:17] = 1  # island
    lab[10:12, 2:4, 2:4] = 2  # only component of label 2
    lab[18, 0, 0] = 2
    out = keep_largest_component(lab)
    assert out[16, 16, 16] == 0 and out[5, 5, 5] == 1 and out[11, 3, 3] == 2 and out[18, 0, 0] == 0
    assert (keep_largest_component(lab, values=[2]) == 1).sum() == (lab == 1).sum()
    assert lab[16, 16, 16] == 1  # input untouched


def test_fast_predict_wrappers_emit_progress(tmp_path: Path) -> None:
    from helpers_infer import predict_labels_fast, predict_scores_fast

    sink = EventSink(path=tmp_path / "ev.jsonl")
    x = volume((20, 20, 40))
    scores = predict_scores_fast(tiny_net(), x, (16, 16, 16), 0.5, "gaussian", 4, torch.device("cpu"), sink)
    labels = predict_labels_fast(tiny_net(), x, (16, 16, 16), 0.5, "gaussian", 4, torch.device("cpu"), [0, 3, 7],
                                 sink)
    sink.close()
    assert scores.shape == (3, 20, 20, 40) and labels.dtype == torch.uint8
    expected = torch.tensor([0, 3, 7], dtype=torch.uint8)[scores.float().argmax(0)]
    assert (labels == expected).float().mean() > 0.999  # scores are float16: rare near-ties may flip
    progress = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert progress[-1]["kind"] == "progress" and progress[-1]["step"] == progress[-1]["total"] == 16


def test_labels_back_to_an_oblique_anisotropic_grid() -> None:
    import SimpleITK as sitk

    from vocoslicer.infer.preprocess import prepare
    from vocoslicer.infer.resample import labels_to_reference

    truth = np.zeros((30, 50, 40), np.uint8)  # (z, y, x)
    truth[8:22, 10:30, 5:25] = 1
    ref = sitk.GetImageFromArray(truth)
    ref.SetSpacing((0.9, 1.3, 2.5))
    ref.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, -1))  # permuted + flipped axes
    ref.SetOrigin((12.0, -40.0, 7.5))
    pre = prepare(sitk.Cast(ref, sitk.sitkFloat32), {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                                                      "intensity": {"a_min": 0, "a_max": 1, "clip": True}})
    model_labels = (pre.tensor[0, 0] > 0.5).to(torch.uint8).numpy()  # a "perfect" model on the model grid
    back = labels_to_reference(model_labels, pre.grid, ref)
    assert back.GetSize() == ref.GetSize() and np.allclose(back.GetDirection(), ref.GetDirection())
    assert np.allclose(back.GetOrigin(), ref.GetOrigin()) and np.allclose(back.GetSpacing(), ref.GetSpacing())
    arr = sitk.GetArrayFromImage(back)
    dice = 2 * np.logical_and(arr == 1, truth == 1).sum() / ((arr == 1).sum() + (truth == 1).sum())
    assert dice > 0.9


def test_torch_score_resampling_matches_simpleitk() -> None:
    import SimpleITK as sitk
    from helpers_infer import scores_to_reference

    from vocoslicer.infer.preprocess import prepare
    from vocoslicer.infer.resample import scores_to_reference_torch

    ref = sitk.Image(37, 23, 19, sitk.sitkFloat32)
    ref.SetSpacing((0.9, 1.3, 2.5))
    ref.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, -1))
    ref.SetOrigin((12.0, -40.0, 7.5))
    pre = prepare(ref, {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                        "intensity": {"a_min": 0, "a_max": 1, "clip": True}})
    shape = pre.tensor.shape[-3:]
    smooth = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3)),
                                             size=tuple(shape), mode="trilinear", align_corners=False)[0]
    ours = scores_to_reference_torch(smooth.half(), pre.grid, ref, [0, 4, 9], slab=7)
    theirs = scores_to_reference(smooth, pre.grid, ref, [0, 4, 9])
    assert ours.GetSize() == ref.GetSize() and np.allclose(ours.GetDirection(), ref.GetDirection())
    a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)
    assert set(np.unique(a)) <= {0, 4, 9} and (a == b).mean() > 0.99


def test_separable_and_general_resampling_agree() -> None:
    import SimpleITK as sitk

    from vocoslicer.infer import resample
    from vocoslicer.infer.preprocess import prepare

    ref = sitk.Image(33, 21, 17, sitk.sitkFloat32)
    ref.SetSpacing((0.7, 1.2, 2.0))
    ref.SetDirection((0, 0, 1, -1, 0, 0, 0, -1, 0))
    ref.SetOrigin((-5.0, 3.0, 20.0))
    pre = prepare(ref, {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                        "intensity": {"a_min": 0, "a_max": 1, "clip": True}})
    scores = torch.randn(4, *pre.tensor.shape[-3:], generator=torch.Generator().manual_seed(5))
    a, b = resample._index_map(pre.grid, ref)
    assert resample._axis_map(a) is not None
    separable = resample.scores_to_reference_torch(scores, pre.grid, ref, [0, 1, 2, 3], slab=5)
    general = torch.cat([resample._grid_sample_block(scores, a, b, (33, 21), k, min(17, k + 5))
                         for k in range(0, 17, 5)], dim=1).argmax(0).numpy()
    assert (sitk.GetArrayFromImage(separable) == general).mean() > 0.999



@pytest.mark.parametrize("smooth", [False, True])
def test_segment_prepared_lands_on_the_input_grid(smooth: bool) -> None:
    import SimpleITK as sitk

    from vocoslicer.infer.preprocess import prepare
    from vocoslicer.infer.sliding import segment_prepared

    arr = np.zeros((30, 40, 50), np.int16)  # (z, y, x)
    arr[8:20, 10:30, 12:40] = 100
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 2.5))
    img.SetOrigin((12.0, -30.0, 55.0))
    img.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))
    pre = prepare(img, {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                        "intensity": {"a_min": 0, "a_max": 100, "b_min": 0, "b_max": 1, "clip": True}})
    label = segment_prepared(Threshold(), pre.tensor, pre.grid, img, [0, 7], (16, 16, 16), 0.25, "gaussian", 2,
                             torch.device("cpu"), smooth=smooth)
    assert label.GetSize() == img.GetSize() and np.allclose(label.GetDirection(), img.GetDirection())
    assert np.allclose(label.GetOrigin(), img.GetOrigin()) and np.allclose(label.GetSpacing(), img.GetSpacing())
    out = sitk.GetArrayFromImage(label)
    truth = arr == 100
    assert set(np.unique(out)) == {0, 7}
    assert 2 * np.logical_and(out == 7, truth).sum() / ((out == 7).sum() + truth.sum()) > 0.9


def test_whole_volume_window_for_small_volumes(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from vocoslicer.infer.sliding import segment_prepared, whole_volume_roi

    assert whole_volume_roi((119, 119, 100), (96, 96, 96), 0.5) == (128, 128, 128)
    assert whole_volume_roi((250, 250, 200), (96, 96, 96), 0.5) == (96, 96, 96)  # too big for one window
    assert whole_volume_roi((90, 90, 90), (96, 96, 96), 0.5) == (96, 96, 96)  # one tile is already less work
    img = sitk.GetImageFromArray(np.zeros((20, 20, 40), np.float32))
    sink = EventSink(path=tmp_path / "ev.jsonl")
    x = torch.zeros((1, 1, 40, 20, 20))
    x[..., 5:30, 5:15, 5:15] = 1
    label = segment_prepared(Threshold(), x, img, img, [0, 1], (16, 16, 16), 0.75, "gaussian", 2,
                             torch.device("cpu"), sink, whole_volume=True)
    sink.close()
    events = [json.loads(e) for e in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [e["total"] for e in events if e["stage"] == "sliding-window inference"] == [1]  # one 64x32x32 window
    assert sitk.GetArrayFromImage(label).transpose(2, 1, 0)[5:30, 5:15, 5:15].all()
