"""Fit the MiniLM evaluator and its thresholds on the labelled development set shipped in data/.

Two steps, both deterministic:
1. a logistic model over the evaluator's features, fitted on every (question, document) pair with
   its relevance label (L2-regularised, Newton's method on standardised features);
2. the lower and upper thresholds, searched on a grid for set-level action accuracy, where each set
   of documents deserves Correct (one answers the question) or Incorrect (none does) and an
   Ambiguous verdict earns half a point (it hedges by doing both); of the pairs within 2% of the
   best, the widest Ambiguous band wins.

`hydrabrain crag calibrate` runs this and rewrites thresholds.json in the package.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hydrabrain.shared.embeddings import Embedder

from hydrabrain.servers.crag.evaluator import FEATURES, Calibration, MiniLMEvaluator, decide

L2 = 1.0
BAND_COST = 0.02
GRID = np.round(np.arange(0.05, 0.96, 0.01), 2)


def shipped_dev_set() -> Path:
    return Path(str(resources.files("hydrabrain.servers.crag") / "data" / "dev.json"))


@dataclass
class DevSet:
    passages: dict[str, dict[str, str]]
    sets: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> DevSet:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            passages = {p["id"]: p for p in data["passages"]}
            sets = data["sets"]
            for s in sets:
                if s["action"] not in ("correct", "incorrect") or any(d not in passages for d in s["documents"]):
                    raise ValueError(f"set for {s['question']!r} names an unknown passage or action")
        except FileNotFoundError:
            raise ValueError(f"no development set at {path}") from None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a development set ({exc}); it needs passages[] and sets[]") from None
        return cls(passages, sets)


def _neutral() -> Calibration:
    n = len(FEATURES)
    return Calibration((0.0,) * n, (1.0,) * n, (1.0,) * n, 0.0, 0.5, 0.5, {})


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weights, bias) of an L2-regularised logistic regression (Newton's method)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.eye(z.shape[1]) * l2
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + penalty @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w[:-1], float(w[-1])


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def action_score(set_scores: list[list[float]], gold: list[str], upper: float, lower: float) -> tuple[float, int, int]:
    """(points, exact, ambiguous) for these thresholds; ambiguous earns half a point."""
    exact = ambiguous = 0
    for scores, want in zip(set_scores, gold, strict=True):
        got = decide(scores, upper, lower)
        exact += got == want
        ambiguous += got == "ambiguous"
    return exact + 0.5 * ambiguous, exact, ambiguous


def calibrate(embedder: Embedder, dev_path: Path | None = None) -> Calibration:
    dev_path = dev_path or shipped_dev_set()
    dev = DevSet.load(dev_path)
    probe = MiniLMEvaluator(embedder, _neutral())
    cases = [(s["question"], [f"{dev.passages[d]['title']}. {dev.passages[d]['text']}" for d in s["documents"]]) for s in dev.sets]
    rows = probe.features_many(cases)
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    for s in dev.sets:
        start = len(labels)
        labels += [int(d in s["relevant"]) for d in s["documents"]]
        spans.append((start, len(labels)))
    x = np.vstack(rows).astype(np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mean, scale, weights, bias = fit_logistic(x, y)
    fitted = Calibration(tuple(mean.tolist()), tuple(scale.tolist()), tuple(weights.tolist()), bias, 0.5, 0.5, {})
    probs = fitted.probability(x)
    set_scores = [probs[a:b].tolist() for a, b in spans]
    gold = [s["action"] for s in dev.sets]

    grid: list[tuple[float, float, float, int, int]] = []
    for lower in GRID:
        for upper in GRID[GRID >= lower]:
            points, exact, ambiguous = action_score(set_scores, gold, float(upper), float(lower))
            grid.append((points, float(upper), float(lower), exact, ambiguous))
    # The widest Ambiguous band that costs at most BAND_COST of the sets' points: the dev set is
    # cleaner than live retrieval, so scores it barely separates deserve the hedge.
    top = max(g[0] for g in grid)
    near = [g for g in grid if g[0] >= top - BAND_COST * len(dev.sets)]
    points, upper, lower, exact, ambiguous = max(near, key=lambda g: (round(g[1] - g[2], 4), g[0]))
    meta = {
        "dev_set": f"servers/crag/data/{dev_path.name}" if dev_path == shipped_dev_set() else str(dev_path),
        "dev_questions": len({s["question"] for s in dev.sets}),
        "dev_sets": len(dev.sets),
        "dev_pairs": int(len(y)),
        "pair_auc": round(auc(probs, y.astype(int)), 4),
        "set_action_accuracy": round(exact / len(dev.sets), 4),
        "set_ambiguous_share": round(ambiguous / len(dev.sets), 4),
        "objective": f"widest band within {BAND_COST:.0%} of the best set action points (ambiguous = half a point)",
    }
    return Calibration(
        tuple(round(v, 6) for v in mean.tolist()),
        tuple(round(v, 6) for v in scale.tolist()),
        tuple(round(v, 6) for v in weights.tolist()),
        round(bias, 6),
        upper,
        lower,
        meta,
    )


def write_calibration(calibration: Calibration, path: Path) -> None:
    """Atomically replace `path` with the calibration as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".thresholds-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(calibration.to_json(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
