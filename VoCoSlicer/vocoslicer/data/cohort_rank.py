"""Which unlabelled case to correct next: rank a cohort's unlabelled cases by uncertainty, diversity or both.

- ``uncertainty``: the per-case score of :mod:`vocoslicer.infer.uncertainty` (mean foreground entropy), highest
  first;
- ``diversity``: k-centre greedy (Sener & Savarese 2018) on pooled encoder features
  (:mod:`vocoslicer.infer.features`; the VoCo embedding for SwinUNETR): each pick is the case farthest from every
  labelled case and every case picked before it, so a batch of corrections covers the feature space instead of
  piling up on one kind of scan;
- ``hybrid``: the same greedy on ``alpha · uncertainty + (1 - alpha) · distance`` (both scaled to [0, 1]);
- ``random``: a seeded permutation, the baseline every strategy is measured against (benchmarks/
  bench_active_learning.py): active learning often fails to beat it.

Scores, features and the proposal label map of each case are cached under ``<cohort>/ranking/<model key>/``
(keyed by the bundle's id, version and weights checksum, checked against the image hash), one file per case and
written atomically, so an interrupted ranking resumes where it stopped and a re-rank with another strategy costs
no inference. "Labelled" means at least one label version was corrected by a person; raw proposals stay
candidates. Every result is deterministic for a given seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vocoslicer.data.cohort import Case, Cohort
from vocoslicer.errors import Cancelled, UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink

STRATEGIES = ("uncertainty", "diversity", "random", "hybrid")
RANK_DIR = "ranking"
LATEST = "latest.json"


@dataclass(frozen=True)
class Ranked:
    """One entry of a ranking (rank 1 = correct this first)."""

    rank: int
    case: str
    score: float
    uncertainty: float | None
    image: str
    proposal: str | None

    def to_dict(self) -> dict[str, Any]:  # noqa: D102 - JSON form
        return {"rank": self.rank, "case": self.case, "score": round(float(self.score), 6),
                "uncertainty": self.uncertainty, "image": self.image, "proposal": self.proposal}


def is_corrected(case: Case) -> bool:
    """True when a person corrected (or drew) at least one of the case's label versions."""
    return any(bool((v.get("provenance") or {}).get("corrected", True)) for v in case.label_versions)


def model_key(bundle: Any) -> str:
    """Cache folder name of a bundle: id@version plus the start of its weights checksum (a re-trained bundle
    saved under the same version gets new scores)."""
    sha = str((bundle.meta.get("weights") or {}).get("sha256", ""))[:12] or "nosha"
    return re.sub(r"[^A-Za-z0-9._@-]", "_", f"{bundle.id}@{bundle.version}-{sha}")


# ---------------------------------------------------------------------------------------------- selection
def _standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per dimension (pooled activations differ in scale by orders of magnitude between
    layers), divided by sqrt(D) so distances do not grow with the embedding size."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    sd[sd < 1e-12] = 1.0
    return (x - x.mean(axis=0)) / sd / np.sqrt(max(x.shape[1], 1))


def _greedy(cand: list[str], feats: np.ndarray, n_labelled: int, unc: np.ndarray | None, alpha: float,
            rng: np.random.Generator) -> list[tuple[str, float]]:
    """k-centre greedy over ``feats`` (labelled rows first, then ``cand`` rows); ``unc`` mixes in uncertainty."""
    lab, pool = feats[:n_labelled], feats[n_labelled:]
    if n_labelled:
        dist = np.min(np.linalg.norm(pool[:, None, :] - lab[None, :, :], axis=-1), axis=1)
    else:  # no labelled case yet: distance to the pool mean; plain diversity starts from a seeded random case
        dist = np.linalg.norm(pool - pool.mean(axis=0), axis=1)
    scale = float(dist.max()) or 1.0
    u = None if unc is None else unc / (float(unc.max()) or 1.0)
    left = list(range(len(cand)))
    out: list[tuple[str, float]] = []
    while left:
        d = dist[left] / scale
        value = d if u is None else alpha * u[left] + (1.0 - alpha) * d
        if not out and not n_labelled and u is None:
            pick = left[int(rng.integers(len(left)))]
        else:
            best = float(value.max())
            ties = [left[i] for i in np.flatnonzero(value >= best - 1e-12)]
            pick = min(ties, key=lambda i: cand[i])  # equal scores: by case id, never by dict order
        score = float(dist[pick] / scale) if u is None else float(alpha * u[pick] + (1 - alpha) * dist[pick] / scale)
        out.append((cand[pick], score))
        left.remove(pick)
        dist = np.minimum(dist, np.linalg.norm(pool - pool[pick], axis=1))
    return out


def select(strategy: str, cand: Sequence[str], uncertainty: dict[str, float] | None = None,
           features: dict[str, np.ndarray] | None = None, labelled: Sequence[str] = (), seed: int = 0,
           alpha: float = 0.5) -> list[tuple[str, float]]:
    """Order ``cand`` (case ids) by ``strategy``; returns ``(case, score)`` best first. Pure and deterministic."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r} (choose one of {', '.join(STRATEGIES)})")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    ids = sorted(cand)
    rng = np.random.default_rng(seed)
    if not ids:
        return []
    if strategy == "random":
        order = rng.permutation(len(ids))
        return [(ids[i], 1.0 - k / len(ids)) for k, i in enumerate(order)]
    if strategy == "uncertainty":
        assert uncertainty is not None
        return sorted(((c, float(uncertainty[c])) for c in ids), key=lambda t: (-t[1], t[0]))
    assert features is not None
    lab = sorted(c for c in labelled if c in features)
    x = _standardise(np.stack([features[c] for c in [*lab, *ids]]))
    unc = None
    if strategy == "hybrid":
        assert uncertainty is not None
        unc = np.array([float(uncertainty[c]) for c in ids])
    return _greedy(ids, x, len(lab), unc, alpha, rng)


# ---------------------------------------------------------------------------------------------- scoring
class CaseScorer:
    """Loads the model once; scores (and caches) one case at a time."""

    def __init__(self, cohort: Cohort, model_spec: str, device: str = "auto", fast: bool = False,
                 events: EventSink = NULL_SINK) -> None:
        from vocoslicer.device import pick_device
        from vocoslicer.models.installed import resolve

        self.bundle = resolve(model_spec)
        if self.bundle.task != "segmentation":
            raise UserError(f"model {self.bundle.describe()} is a {self.bundle.task} model, not a segmentation model")
        self.dev = pick_device(device)
        self.fast = fast
        self.events = events
        self.dir = cohort.root / RANK_DIR / model_key(self.bundle)
        self._model: Any = None

    @property
    def model(self) -> Any:  # noqa: D102 - built on first use: a fully cached ranking never loads the weights
        if self._model is None:
            self._model = self.bundle.build_model().to(self.dev).eval()
        return self._model

    def cached(self, case: Case) -> dict[str, Any]:
        """The cached record of ``case`` (empty when absent, unreadable or for another image)."""
        p = self.dir / "cases" / f"{case.id}.json"
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return rec if isinstance(rec, dict) and rec.get("image_hash") == case.hash else {}

    def score(self, case: Case, want_uncertainty: bool, want_features: bool) -> dict[str, Any]:
        """Cached record of ``case``, computing what is missing (uncertainty + proposal, features)."""
        from vocoslicer.infer.preprocess import prepare
        from vocoslicer.infer.segment import FAST_SPACING
        from vocoslicer.io import atomic_write_json, read_image, write_image

        rec = self.cached(case)
        have_u = want_uncertainty and "uncertainty" in rec and Path(rec.get("proposal", "")).is_file()
        have_f = want_features and "features" in rec
        if (have_u or not want_uncertainty) and (have_f or not want_features):
            return rec
        rec = {**rec, "case": case.id, "image_hash": case.hash, "model": self.bundle.id,
               "model_version": self.bundle.version}
        img = read_image(case.image)
        b = self.bundle
        prepared = prepare(img, b.preprocessing, FAST_SPACING if self.fast else None)
        inf = b.inference
        if want_uncertainty and not have_u:
            from vocoslicer.infer.uncertainty import UncertaintyRequest, segment_prepared_uncertain

            req = UncertaintyRequest()
            label = segment_prepared_uncertain(self.model, prepared.tensor, prepared.grid, img, b.channel_values,
                                               inf["roi_size"], float(inf["overlap"]), str(inf["mode"]),
                                               int(inf["sw_batch_size"]), self.dev, req, smooth=not self.fast,
                                               whole_volume=self.fast, names={lb.value: lb.name for lb in b.labels})
            proposal = write_image(label, self.dir / "proposals" / f"{case.id}.nii.gz")
            rec.update(uncertainty=req.report["uncertainty"], structures=req.report["structures"],
                       proposal=str(proposal))
        if want_features and not have_f:
            from vocoslicer.infer.features import pooled_features

            rec["features"] = [round(float(v), 6) for v in
                               pooled_features(self.model, prepared.tensor, inf["roi_size"], self.dev)]
        atomic_write_json(self.dir / "cases" / f"{case.id}.json", rec, indent=0)
        return rec


def rank_cohort(cohort_dir: str | Path, model_spec: str, strategy: str = "uncertainty", n: int | None = None,
                seed: int = 0, alpha: float = 0.5, device: str = "auto", fast: bool = False,
                events: EventSink = NULL_SINK, cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Score what is missing, order the unlabelled cases, store and return the ranking (``ranking/latest.json``)."""
    from vocoslicer.io import atomic_write_json

    select(strategy, [], alpha=alpha)  # validates strategy and alpha before any inference
    if n is not None and n < 1:
        raise UserError(f"-n must be >= 1, got {n}")
    cohort = Cohort(cohort_dir)
    if cohort.warning:
        events.warning(cohort.warning)
    cases = cohort.cases()
    cand = [c for c in cases if not is_corrected(c)]
    # the centres diversity covers from: cases the model learns from (validation cases are not training data)
    labelled = [c for c in cases if is_corrected(c) and c.split != "val"]
    if not cand:
        raise UserError(f"{cohort.root}: no unlabelled case to rank ({len(cases)} cases, all corrected)")
    scorer = CaseScorer(cohort, model_spec, device, fast, events)
    want_u = strategy in ("uncertainty", "hybrid")
    want_f = strategy in ("diversity", "hybrid")
    recs: dict[str, dict[str, Any]] = {}
    todo = [(c, True) for c in cand] + ([(c, False) for c in labelled] if want_f else [])
    for i, (c, is_cand) in enumerate(todo):
        if cancel is not None and cancel():
            raise Cancelled(f"ranking cancelled after {i} of {len(todo)} cases; run it again to resume")
        events.progress(i, len(todo), stage=f"scoring {c.id}")
        recs[c.id] = scorer.score(c, want_u and is_cand, want_f) if (want_u or want_f) else scorer.cached(c)
    events.progress(len(todo), len(todo), stage="ranking")
    unc = {c.id: float(recs[c.id]["uncertainty"]) for c in cand} if want_u else None
    feats = {cid: np.asarray(r["features"], dtype=np.float64) for cid, r in recs.items()} if want_f else None
    order = select(strategy, [c.id for c in cand], unc, feats, [c.id for c in labelled], seed, alpha)
    by_id = {c.id: c for c in cand}
    ranked = [Ranked(k + 1, cid, s, recs[cid].get("uncertainty"), str(by_id[cid].image), recs[cid].get("proposal"))
              for k, (cid, s) in enumerate(order[:n] if n else order)]
    result = {"cohort": str(cohort.root), "cohort_version": cohort.version, "model": scorer.bundle.id,
              "model_version": scorer.bundle.version, "strategy": strategy, "seed": seed,
              "alpha": alpha if strategy == "hybrid" else None, "n_candidates": len(cand),
              "n_labelled": len(labelled), "ranking": [r.to_dict() for r in ranked]}
    atomic_write_json(scorer.dir / f"ranking-{strategy}-seed{seed}.json", result)
    latest = atomic_write_json(cohort.root / RANK_DIR / LATEST, result)
    events.artifact(latest, "ranking", strategy=strategy, seed=seed, top=ranked[0].case if ranked else None)
    return result


def latest_ranking(cohort_dir: str | Path) -> dict[str, Any] | None:
    """The last stored ranking of a cohort (what the panel's "Next case to correct" reads), or None."""
    p = Path(cohort_dir) / RANK_DIR / LATEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("ranking"), list) else None
