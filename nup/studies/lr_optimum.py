"""The optimal learning rate of a loss-against-lr curve, and the slope of ``log η*`` against ``log L``.

η* is the vertex of a least-squares parabola in ``(log lr, log loss)`` through the grid minimum and
up to two neighbours on each side; the slope comes with a bootstrap confidence interval that
resamples seeds (the same draw at every depth).
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
    """
    if len(depths) < 2:
        return {"slope": None, "ci95": None, "n_boot": 0, "dropped": 0}
    etas = [optimal_lr(lrs[d], per_seed[d].mean(axis=0))["refined"] for d in depths]
    slope = loglog_fit(depths, etas)
    n_seeds = per_seed[depths[0]].shape[0]
    rng = np.random.default_rng(seed)
    boot, dropped = [], 0
    for _ in range(n_boot):
        pick = rng.integers(0, n_seeds, n_seeds)
        e = [optimal_lr(lrs[d], per_seed[d][pick].mean(axis=0))["refined"] for d in depths]
        if any(v is None for v in e):
            dropped += 1
            continue
        boot.append(loglog_fit(depths, e))
    ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None
    return {"slope": slope, "ci95": ci, "n_boot": len(boot), "dropped": dropped}
