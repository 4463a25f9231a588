"""Learning-rate transfer across depth (SPEC §5): does η* move with depth, and as SPEC's ``T(L)`` predicts?

For every task (a teacher–student task of ≥ 10⁴ samples, and the UCI digits), parameterization
(``sp``, ``sp_inv_depth``, νP with offset widths ``m·(k + k0)²``, νP + the harmonic depth
normalizer), depth L, learning rate and seed, a NuMLP is trained with NuP (minibatches) for 4T
steps, its lr decayed by a cosine to 0 at 4T (``schedule="constant"``: the control at constant
lr). The metric at horizon H ∈ {T, 2T, 4T} is the mean minibatch train loss over the last 20% of
the first H steps (one run gives all three horizons). Each depth's lr
grid (ratio √2) starts at the previous depth's optimum and is extended until the optimum is
interior; η* is the vertex of a parabola in (log lr, log loss). A depth whose best loss is above
half of chance is "not trained" and left out of the fits. The slope of log η* against log L
comes with a bootstrap 95% interval over seeds, beside the slope SPEC §2 predicts, η* ∝ 1/T(L), and the
one with each layer's move scaled by its minibatch efficiency at init, η* ∝ 1/T_e(L) (:mod:`nup.theory`);
what each prediction misses is split into a drift shared by all parameterizations and what is left to
each. ``nup_effective`` (νP with the hidden scales divided by their T_e share) is a fifth parameterization,
not in the default.
Each run also records how its inputs look to the readout (the mean cosine of ``φ(h_{L−1})`` over
:data:`PROBE` train inputs and the fraction of its units 0 on all of them, at init and after T steps),
beside the EOC correlation map's prediction of the cosine at init.
The runs are saved to ``results.json`` after every round; a rerun into the same folder with the
same run settings reuses them (an interrupted study resumes; a narrower one re-analyses).

Modules: :mod:`.config` (settings), :mod:`.runs` (data, one run, the grid of runs), :mod:`.analysis`
(η*, slopes, the shared drift, readout features) and :mod:`.report` (README, figures, summary line).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nup.studies._common import config_dict, environment, prepare_out, write_outputs
from nup.studies.depth_transfer.analysis import analyse
from nup.studies.depth_transfer.config import FLAGS, QUICK, Config, check, horizons
from nup.studies.depth_transfer.report import readme, summary_line, write_figures
from nup.studies.depth_transfer.runs import cached_runs, grid_extension, run_grid, saved_grid, train_one

__all__ = ["FLAGS", "QUICK", "Config", "cached_runs", "grid_extension", "horizons", "run", "summary_line", "train_one"]


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    check(cfg)
    out = prepare_out(out)
    start = time.perf_counter()
    runs_env = None
    if cfg.reanalyse:  # keep the environment the runs were made in
        runs, grids, chance = saved_grid(cfg, out)  # raises if out has no saved runs
        saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
        runs_env = saved.get("runs_environment") or saved.get("environment")
    else:
        saved = cached_runs(cfg, out)
        runs, grids, chance = run_grid(cfg, out, progress)
        reused = sum(key in saved for key in runs)
    analysis = analyse(cfg, runs, grids, chance)
    figures = write_figures(cfg, analysis, out)
    env = environment(cfg.device, time.perf_counter() - start)
    runs_env = runs_env or {**env, "runs_reused": reused}
    results = {"study": "depth_transfer", "config": config_dict(cfg), "horizons": horizons(cfg),
               "analysis": analysis, "runs": list(runs.values()), "figures": figures, "environment": env,
               "runs_environment": runs_env}
    write_outputs(out, results, readme(cfg, analysis, runs, runs_env, figures))
    return results
