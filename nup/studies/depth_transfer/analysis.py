"""The depth-transfer study's analysis: each depth's η*, the fitted slope against the T(L) prediction and
the T_e(L) one (each layer's move scaled by its batch efficiency at init), the drift each prediction misses
in common, and the readout-input cosines."""

from __future__ import annotations

from typing import Any

import numpy as np

from nup.studies._common import finite_or_none
from nup.studies.depth_transfer.config import Config, grid_lr, horizons
from nup.studies.depth_transfer.runs import curve, model_config, probe_cosines
from nup.studies.lr_optimum import optimal_lr, shared_drift, slope_with_ci


def analyse(cfg: Config, runs: dict, grids: dict, chance: dict[str, float]) -> dict[str, Any]:
    """Per task, parameterization and horizon: each depth's curve and η*, and the fitted and predicted slopes."""
    from nup.theory import T, T_effective, lr_slope

    out: dict[str, Any] = {}
    for task in cfg.tasks:
        per_variant, boots = {}, {}
        cosines = probe_cosines(cfg, task)
        for variant in cfg.parameterizations:
            configs = {d: model_config(cfg, task, variant, d) for d in cfg.depths}
            theory_t = {str(d): T(d, m, **kw) for d, (m, kw) in configs.items()}
            theory_te = {str(d): T_effective(d, m, cosines, cfg.batch_size, **kw) for d, (m, kw) in configs.items()}
            per_h = {}
            for h in horizons(cfg):
                by_depth, fit_depths = {}, []
                for depth in cfg.depths:
                    js = grids[task, variant, depth]
                    lrs = [grid_lr(cfg, j) for j in js]
                    seeds = curve(cfg, runs, (task, variant, depth), js, h)
                    opt = optimal_lr(lrs, seeds.mean(axis=0))
                    half = chance[task] / 2
                    trained = opt["loss"] is not None and opt["loss"] <= half
                    if trained and not opt["at_edge"]:
                        fit_depths.append(depth)
                    by_depth[str(depth)] = {"lrs": lrs, "losses": [finite_or_none(v) for v in seeds.mean(axis=0)],
                                            "optimum": opt, "trained": trained,
                                            "stuck": [int(k) for k in (seeds > half).sum(axis=0)]}  # inf: not finite
                fit = slope_with_ci(fit_depths, {d: by_depth[str(d)]["lrs"] for d in fit_depths},
                                    {d: curve(cfg, runs, (task, variant, d), grids[task, variant, d], h)
                                     for d in fit_depths}, cfg.bootstrap, cfg.seed)
                boots[variant, h] = fit.pop("replicates")
                fit["depths"] = fit_depths
                for key, sums in (("predicted_slope", theory_t), ("predicted_slope_effective", theory_te)):
                    fit[key] = lr_slope(fit_depths, [sums[str(d)] for d in fit_depths]) if len(fit_depths) > 1 else None
                per_h[str(h)] = {"by_depth": by_depth, "fit": fit}
            per_variant[variant] = {"T": theory_t, "T_effective": theory_te, "horizons": per_h,
                                    "features": features(cfg, runs, grids, (task, variant), chance[task] / 2)}
        out[task] = {"chance_loss": chance[task], "parameterizations": per_variant,
                     "shared_drift": {str(h): _drift(per_variant, boots, h, "predicted_slope") for h in horizons(cfg)},
                     "shared_drift_effective": {str(h): _drift(per_variant, boots, h, "predicted_slope_effective")
                                                for h in horizons(cfg)},
                     "feature_cos_predicted": predicted_features(cfg, task)}
    return out


def _drift(per_variant: dict[str, Any], boots: dict[tuple, np.ndarray], h: int, key: str) -> dict[str, Any] | None:
    """:func:`~nup.studies.lr_optimum.shared_drift` at horizon ``h`` against the prediction ``fit[key]``, over
    the parameterizations with a fitted slope (None below two)."""
    fits = {v: e["horizons"][str(h)]["fit"] for v, e in per_variant.items()}
    names = [v for v, f in fits.items() if f["slope"] is not None and f[key] is not None]
    if len(names) < 2:
        return None
    return {"parameterizations": names, **shared_drift({v: fits[v]["slope"] for v in names},
                                                       {v: fits[v][key] for v in names},
                                                       {v: boots[v, h] for v in names})}


def predicted_features(cfg: Config, task: str) -> dict[str, float]:
    """Per depth, the readout inputs' mean cosine at init on the probe at infinite width (EOC correlation map)."""
    from nup.theory import feature_cosine_at_init

    cosines = probe_cosines(cfg, task)
    return {str(d): feature_cosine_at_init(cosines, d, cfg.activation) for d in cfg.depths}


def features(cfg: Config, runs: dict, grids: dict, chain: tuple, half: float) -> dict[str, Any] | None:
    """Per depth, the runs' readout-input cosine and inactive fraction at init, and after T steps split by
    whether the run trained (metric at 4T ≤ ``half``) or stayed above half of chance; None for runs saved
    before the cosine was recorded (the inactive fractions None for runs saved before they were)."""
    longest, t = str(horizons(cfg)[-1]), str(cfg.horizon)
    out = {}
    for depth in cfg.depths:
        rs = [runs[(*chain, depth, j, cfg.seed + s)] for j in grids[(*chain, depth)] for s in range(cfg.seeds)]
        if not all(r.get("feature_cos") for r in rs):
            return None
        trained = [r["metric"][longest] is not None and r["metric"][longest] <= half for r in rs]
        groups = {"trained": [r for r, ok in zip(rs, trained) if ok],
                  "stuck": [r for r, ok in zip(rs, trained) if not ok]}
        out[str(depth)] = {"init": _mean([r["feature_cos"]["0"] for r in rs]),
                           "inactive_init": _mean([r.get("inactive", {}).get("0") for r in rs]),
                           **{name: {"runs": len(g), "at_T": _mean([r["feature_cos"].get(t) for r in g]),
                                     "inactive_at_T": _mean([r.get("inactive", {}).get(t) for r in g])}
                              for name, g in groups.items()}}
    return out


def _mean(values: list) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None
