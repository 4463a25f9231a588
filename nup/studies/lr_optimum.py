"""The optimal learning rate of a loss-against-lr curve, and the slope of ``log η*`` against ``log L``.

η* is the vertex of a least-squares parabola in ``(log lr, log loss)`` through the grid minimum and
up to two neighbours on each side; the slope comes with a bootstrap confidence interval that
resamples seeds (the same draw at every depth). Across parameterizations run with the same seeds, the
paired replicates split what a prediction misses into a drift shared by all and what is left per
parameterization (:func:`shared_drift`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def optimal_lr(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """η* of one curve; ``lrs`` ascending on a geometric grid, ``losses`` (inf = diverged) of the same length.

    Returns ``{"grid", "refined", "loss", "at_edge"}``: the grid argmin, the parabola's vertex (kept
    within one grid step of the argmin; the grid value when the argmin is at an edge, the fit has
    fewer than three finite points or no positive curvature), the minimum loss, and whether the
    argmin is the first or last grid point. All None when no loss is finite.
    """
    lx = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(y) & (y > 0)
    if not ok.any():
        return {"grid": None, "refined": None, "loss": None, "at_edge": None}
    i = int(np.argmin(np.where(ok, y, np.inf)))
    at_edge = i in (0, len(y) - 1)
    refined = lx[i]
    window = [j for j in range(max(i - 2, 0), min(i + 3, len(y))) if ok[j]]
    if not at_edge and len(window) >= 3 and min(window) < i < max(window):
        a, b, _ = np.polyfit(lx[window], np.log(y[window]), 2)
        if a > 0:
            step = (lx[-1] - lx[0]) / (len(lx) - 1)
            refined = float(np.clip(-b / (2 * a), lx[i] - step, lx[i] + step))
    return {"grid": float(lrs[i]), "refined": float(math.exp(refined)), "loss": float(y[i]), "at_edge": at_edge}


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (two or more positive points)."""
    return float(np.polyfit(np.log(np.asarray(xs, dtype=np.float64)), np.log(np.asarray(ys, dtype=np.float64)), 1)[0])


def _ci95(replicates: np.ndarray) -> list[float] | None:
    ok = replicates[np.isfinite(replicates)]
    return [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))] if ok.size else None


def slope_with_ci(
    depths: Sequence[int],
    lrs: dict[int, Sequence[float]],
    per_seed: dict[int, np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Slope of ``log η*`` against ``log L`` over ``depths``, with a 95% bootstrap interval over seeds.

    ``lrs[L]`` is depth L's grid; ``per_seed[L]`` is an ``(n_seeds, n_lrs)`` array of losses (inf =
    diverged), seeds in the same order at every depth. Each replicate draws ``n_seeds`` seed indices
    with replacement, averages each depth's curve over them and refits η* and the slope. Replicates
    in which some η* is undefined are dropped and counted.

    ``"replicates"`` is the ``(n_boot,)`` array of replicate slopes, NaN where dropped (empty below two
    depths; not JSON: pop it before saving). Replicate ``b`` draws the same seed indices in every call with
    the same ``seed`` and seed count, so the replicates of two parameterizations run with the same seeds
    pair up (a joint bootstrap, as :func:`shared_drift` needs).
    """
    if len(depths) < 2:
        return {"slope": None, "ci95": None, "n_boot": 0, "dropped": 0, "replicates": np.empty(0)}
    etas = [optimal_lr(lrs[d], per_seed[d].mean(axis=0))["refined"] for d in depths]
    n_seeds = per_seed[depths[0]].shape[0]
    rng = np.random.default_rng(seed)
    boot = np.full(n_boot, np.nan)
    for b in range(n_boot):
        pick = rng.integers(0, n_seeds, n_seeds)
        e = [optimal_lr(lrs[d], per_seed[d][pick].mean(axis=0))["refined"] for d in depths]
        if all(v is not None for v in e):
            boot[b] = loglog_fit(depths, e)
    kept = int(np.isfinite(boot).sum())
    return {"slope": loglog_fit(depths, etas), "ci95": _ci95(boot), "n_boot": kept, "dropped": n_boot - kept,
            "replicates": boot}


def shared_drift(slopes: dict[str, float], predicted: dict[str, float],
                 replicates: dict[str, np.ndarray]) -> dict[str, Any]:
    """How much of each measured slope the prediction misses in common, and what is left per parameterization.

    ``slopes``, ``predicted`` and ``replicates`` (paired, from :func:`slope_with_ci`) per parameterization, two
    or more. The shared drift is the mean over parameterizations of measured − predicted; each
    parameterization's ``beyond`` is its own measured − predicted minus that mean: 0 when the prediction gets
    the differences between parameterizations right and misses only a drift common to all. The intervals
    come from the replicates in which every slope is defined."""
    names = list(slopes)
    miss = {p: slopes[p] - predicted[p] for p in names}
    drift = float(np.mean(list(miss.values())))
    boot = np.stack([replicates[p] - predicted[p] for p in names])  # (parameterizations, n_boot)
    boot = boot[:, np.isfinite(boot).all(axis=0)]
    boot_drift = boot.mean(axis=0)
    return {"drift": drift, "ci95": _ci95(boot_drift), "n_boot": int(boot.shape[1]),
            "beyond": {p: {"value": miss[p] - drift, "ci95": _ci95(boot[i] - boot_drift)}
                       for i, p in enumerate(names)}}
