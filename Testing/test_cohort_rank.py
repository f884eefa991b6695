"""cohort rank: which unlabelled case to correct next (uncertainty, diversity, hybrid, random), cached, resumable,
deterministic per seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_rank import _greedy, latest_ranking, model_key, rank_cohort, select
from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.errors import Cancelled, UserError
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model

PRE = {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "pad_value": -1024,
       "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
UNET = {"in_channels": 1, "out_channels": 9, "channels": [4, 8], "strides": [2], "num_res_units": 0}


def tiny_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    meta = new_bundle_meta("tiny-rank", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE,
                           inference={"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 2}, channel_values=[0, *PHANTOM_LABELS.values])
    return ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(path, build_model("unet", UNET).state_dict())


def cohort_of(root: Path, labelled: int, unlabelled: int) -> Cohort:
    c = Cohort.init(root)
    for s in range(labelled + unlabelled):
        ph = generate_phantom(s, spacing=(8, 8, 8), noise_hu=float(20 + 60 * s))
        c.add(ph.image, ph.label if s < labelled else None, PHANTOM_LABELS if s < labelled else None)
    return c


def test_k_centre_greedy_covers_the_space_and_hybrid_mixes_uncertainty() -> None:
    feats = {"lab": np.array([0.0, 0.0]), "near": np.array([0.1, 0.0]), "far": np.array([5.0, 0.0]),
             "other": np.array([0.0, 4.0]), "far2": np.array([5.1, 0.1])}
    cand = ["near", "far", "other", "far2"]
    raw = np.stack([feats[c] for c in ["lab", *cand]])
    order = [c for c, _ in _greedy(cand, raw, 1, None, 0.5, np.random.default_rng(0))]
    # farthest from the labelled case first, then the one farthest from it *and* from the first pick
    assert order[:2] == ["far2", "other"] and order[-1] == "near"
    # select() standardises each dimension first (pooled activations of different layers differ in scale)
    assert [c for c, _ in select("diversity", cand, features=feats, labelled=["lab"])][-1] == "near"
    unc = {"near": 0.9, "far": 0.1, "other": 0.1, "far2": 0.1}
    assert select("hybrid", list(unc), unc, feats, ["lab"], alpha=0.9)[0][0] == "near"
    assert select("hybrid", list(unc), unc, feats, ["lab"], alpha=0.1)[0][0] in ("far2", "other")  # far, sure
    assert [c for c, _ in select("uncertainty", list(unc), unc)][:1] == ["near"]
    from vocoslicer.commands.cohort_active import STRATEGIES as CLI_CHOICES
    from vocoslicer.data.cohort_rank import STRATEGIES

    assert CLI_CHOICES == STRATEGIES
    with pytest.raises(UserError, match="unknown strategy"):
        select("entropy", ["a"])
    with pytest.raises(UserError, match="alpha"):
        select("hybrid", ["a"], alpha=2.0)


def test_random_and_diversity_are_deterministic_per_seed() -> None:
    ids = [f"c{i}" for i in range(8)]
    rng = np.random.default_rng(123)
    feats = {c: rng.normal(size=16) for c in ids}
    for strategy in ("random", "diversity"):
        a = select(strategy, ids, features=feats, seed=0)
        assert a == select(strategy, list(reversed(ids)), features=feats, seed=0)  # input order is irrelevant
        assert [c for c, _ in a] != [c for c, _ in select(strategy, ids, features=feats, seed=1)]


def test_rank_uncertainty_caches_scores_and_resumes_after_cancel(tmp_path: Path, home: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b")
    cohort = cohort_of(tmp_path / "cohort", labelled=1, unlabelled=3)
    calls = {"n": 0}

    def cancel_after_one() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(Cancelled, match="resume"):
        rank_cohort(cohort.root, str(bundle), "uncertainty", device="cpu", cancel=cancel_after_one)
    cache = cohort.root / "ranking" / model_key(ModelBundle.load(bundle)) / "cases"
    first = sorted(cache.glob("*.json"))
    assert len(first) == 1
    stamp = first[0].stat().st_mtime_ns
    res = rank_cohort(cohort.root, str(bundle), "uncertainty", device="cpu")
    assert first[0].stat().st_mtime_ns == stamp  # resumed: the scored case was not segmented again
    ranking = res["ranking"]
    assert [r["case"] for r in ranking] and len(ranking) == 3 and res["n_labelled"] == 1
    assert [r["uncertainty"] for r in ranking] == sorted((r["uncertainty"] for r in ranking), reverse=True)
    assert all(Path(r["proposal"]).is_file() for r in ranking)
    assert latest_ranking(cohort.root)["ranking"] == ranking
    # another strategy reuses the cached uncertainty; diversity adds features (labelled case included)
    again = rank_cohort(cohort.root, str(bundle), "hybrid", n=2, seed=3, device="cpu")
    assert len(again["ranking"]) == 2 and again["alpha"] == 0.5
    recs = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    assert len(recs) == 4 and all("features" in r for r in recs)
    d1 = rank_cohort(cohort.root, str(bundle), "diversity", seed=5, device="cpu")["ranking"]
    assert d1 == rank_cohort(cohort.root, str(bundle), "diversity", seed=5, device="cpu")["ranking"]


def test_rank_cli_prints_the_order_and_rejects_bad_input(tmp_path: Path, home: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b")
    cohort = cohort_of(tmp_path / "cohort", labelled=0, unlabelled=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VOCOSLICER_HOME": str(home)}
    base = [sys.executable, "-m", "vocoslicer", "cohort", "rank", str(cohort.root), "--model", str(bundle),
            "--device", "cpu"]
    r = subprocess.run(base + ["--strategy", "random", "--seed", "4"], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert "random ranking of 2 unlabelled cases" in r.stdout and "case0001" in r.stdout
    for bad in (["-n", "0"], ["--strategy", "hybrid", "--alpha", "3"]):
        r = subprocess.run(base + bad, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    full = Cohort.init(tmp_path / "full")
    ph = generate_phantom(0, spacing=(8, 8, 8))
    full.add(ph.image, ph.label, PHANTOM_LABELS)
    with pytest.raises(UserError, match="no unlabelled case"):
        rank_cohort(full.root, str(bundle), device="cpu")


@pytest.mark.slow  # one SwinUNETR forward on a 64³ window: ~20 s on the shared CPU
def test_features_are_the_voco_embedding_for_swinunetr_and_conv_pools_otherwise() -> None:
    """voco_spec §2.1: 24 · feature_size pooled values from the segmentation network's own encoder."""
    from vocoslicer.infer.features import pooled_features
    from vocoslicer.models.voco_head import swin_embedding

    torch.manual_seed(0)
    net = build_model("swinunetr", {"size": None, "feature_size": 12, "in_channels": 1, "out_channels": 2,
                                    "patch_merging": "legacy"}).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    f = pooled_features(net, x, (64, 64, 64))
    with torch.no_grad():
        assert f.shape == (24 * 12,) and torch.allclose(f, swin_embedding(net, x)[0], atol=1e-5)
    unet = build_model("unet", UNET)
    g = pooled_features(unet, torch.rand(1, 1, 40, 40, 40), (32, 32, 32))  # 8 windows (starts 0 and 8 per axis)
    assert g.ndim == 1 and g.numel() > 9 and torch.isfinite(g).all()
