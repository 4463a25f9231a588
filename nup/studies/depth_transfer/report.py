"""The depth-transfer study's README and figures, and its one-line summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from nup.report import Figure, Heading, Paragraph, Table
from nup.studies._common import figure, fmt, save_figure
from nup.studies.depth_transfer.config import PROBE, WINDOW, Config, horizons


def write_figures(cfg: Config, analysis: dict, out: Path) -> list[str]:
    names = []
    hs = horizons(cfg)
    for task, entry in analysis.items():
        params = list(entry["parameterizations"])
        fig = figure(4.2 * len(params), 3.6)
        axes = fig.subplots(1, len(params), squeeze=False)[0]
        for ax, variant in zip(axes, params):
            by_depth = entry["parameterizations"][variant]["horizons"][str(hs[-1])]["by_depth"]
            for i, depth in enumerate(cfg.depths):
                e = by_depth[str(depth)]
                ys = [np.nan if v is None else v for v in e["losses"]]
                ax.plot(e["lrs"], ys, "o-" if e["trained"] else "o:", color=f"C{i}", ms=3, label=f"L={depth}")
                if e["optimum"]["refined"] is not None:
                    ax.plot([e["optimum"]["grid"]], [e["optimum"]["loss"]], "*", color=f"C{i}", ms=10, mec="k")
            ax.axhline(entry["chance_loss"] / 2, color="0.6", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("lr η")
            ax.set_title(variant)
            ax.legend(fontsize="small")
        axes[0].set_ylabel(f"mean train loss, steps {math.ceil(0.8 * hs[-1])}–{hs[-1]}")
        fig.suptitle(f"{task}: loss against lr per depth (★ grid optimum; dotted line: half of chance; "
                     "dotted curve: not trained)")
        names.append(save_figure(fig, out / f"loss_vs_lr_{task}.png"))

        fig = figure(4.2 * len(hs), 3.6)
        axes = fig.subplots(1, len(hs), squeeze=False)[0]
        for ax, h in zip(axes, hs):
            for i, variant in enumerate(params):
                v = entry["parameterizations"][variant]
                e = v["horizons"][str(h)]
                pts = [(d, e["by_depth"][str(d)]["optimum"]["refined"]) for d in cfg.depths
                       if e["by_depth"][str(d)]["optimum"]["refined"] is not None]
                fitted = [(d, eta) for d, eta in pts if d in e["fit"]["depths"]]
                if pts:
                    ax.plot(*zip(*pts), "o", mfc="white", color=f"C{i}", ms=6)
                if fitted:
                    ax.plot(*zip(*fitted), "o-", color=f"C{i}", label=f"{variant} ({fmt(e['fit']['slope'], 2)})")
                    for key, style in (("T", "--"), ("T_effective", ":")):  # η* ∝ 1/T(L) and 1/T_e(L)
                        ax.plot([d for d, _ in fitted], _through(fitted, v[key]), style, color=f"C{i}", lw=0.9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("depth L")
            ax.set_title(f"horizon {h} steps")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
        axes[0].set_ylabel("η*")
        fig.suptitle(f"{task}: η* against depth (dashed: SPEC's η* ∝ 1/T(L); dotted: η* ∝ 1/T_e(L); hollow: left "
                     "out of the fit)")
        names.append(save_figure(fig, out / f"optimal_lr_{task}.png"))
    return names


def _through(fitted: list[tuple[int, float]], move_sums: dict[str, float]) -> np.ndarray:
    """``c/move_sum(L)`` at the fitted depths, with ``c`` putting it through the fitted η*'s geometric mean."""
    inv = np.array([1 / move_sums[str(d)] for d, _ in fitted])
    return math.exp(np.mean(np.log([eta for _, eta in fitted]) - np.log(inv))) * inv


def _ci(fit: dict) -> str:
    return "n/a" if fit["ci95"] is None else f"[{fit['ci95'][0]:+.2f}, {fit['ci95'][1]:+.2f}]"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value, 2) + 0.0:+.2f}"


SCHEDULE_TEXT = {"cosine": "lr decayed by a cosine from η to 0 over the whole run", "constant": "constant lr"}
WHY_COSINE = (
    "Why a decayed lr: a normalized step keeps its length as the loss flattens, so at a constant lr the "
    "loss settles on a floor set by η, and the best constant η at a horizon falls as training goes on. A "
    "shallow net reaches its floor within the horizon, a deep one does not, which tilts every slope "
    "upwards by about the same amount whatever the parameterization. Decaying the lr to 0 removes the "
    "floor; the optimum is then set by how far the first steps may move the output, which is what SPEC's "
    "T(L) predicts. The metric at T and "
    "2T is taken before the decay ends; the headline is at 4T.")


EFFECTIVE_TEXT = (
    "Prediction with batch efficiency: T(L) counts each layer's move as a rank-one step's. A normalized step "
    "along a minibatch gradient of B = {batch} inputs moves layer k by e_k·η·ρ_k, e_k² = 1/B + (1 − 1/B)·mean cos² of "
    "the layer's inputs (backward signals taken orthogonal), and the EOC map makes deep inputs alike, so e_k "
    "rises from about 0.3–0.4 at layer 1 towards 1 (nup.theory.batch_efficiency_at_init, from the cosines of "
    "{probe} train inputs; nup.diagnostics.step_efficiency measures it). T_e(L) = Σ_{{k<L}} e_k·ρ_k then grows "
    "faster with depth than T(L), and η* ∝ 1/T_e(L) predicts a steeper slope for every parameterization. "
    "nup_effective divides the hidden scales by Σ_{{k≥2}} e_k·ρ_k (nup.theory.effective_divisor), which makes "
    "T_e(L), not T(L), flat.")


def _drift_blocks(task: str, entry: dict, hs: list[int], key: str, name: str) -> list:
    """The shared-drift table against one prediction (``entry[key]``, ``name`` in the text); none if no horizon
    has one."""
    drifts = {h: d for h in hs if (d := entry[key][str(h)])}
    if not drifts:
        return []
    names = list(entry["parameterizations"])
    return [Heading(f"{task}: what {name} misses, shared by all parameterizations and left to each"),
            Paragraph(f"Shared drift: the mean over parameterizations of measured − {name}-predicted slope. Left "
                      f"to each: its measured − predicted minus the shared drift; 0 where {name} gets the "
                      "differences between parameterizations right. 95% intervals from the same seed "
                      "resamples for every parameterization."),
            Table(["horizon", "shared drift", *names],
                  [[h, f"{_signed(d['drift'])} {_ci(d)}",
                    *(f"{_signed(d['beyond'][v]['value'])} {_ci(d['beyond'][v])}" if v in d["beyond"]
                      else "n/a" for v in names)] for h, d in drifts.items()])]


def readme(cfg: Config, analysis: dict, runs: dict, env: dict, figures: list[str]) -> list:
    """The README's blocks; ``env`` is the environment the runs were made in (its ``runs_reused``: how many
    came from the folder's saved runs, whose time is not in its wall time)."""
    hs = horizons(cfg)
    reused = (f"; {env['runs_reused']} reused from the folder's saved runs, so the time is the other runs'"
              if env.get("runs_reused") else "")
    blocks = [
        Heading("Study: learning-rate transfer across depth", 1),
        Paragraph(f"NuMLP ({cfg.activation}, EOC) trained with NuP ({SCHEDULE_TEXT[cfg.schedule]}, minibatch "
                  f"{cfg.batch_size}) for "
                  f"{hs[-1]} steps on {' and '.join(cfg.tasks)} (teacher–student: {cfg.n_train} samples, "
                  f"input dim, teacher width, classes = {', '.join(map(str, cfg.teacher_shape))}). Metric at "
                  f"horizon H ∈ {{{', '.join(map(str, hs))}}}: the mean minibatch train loss over the last "
                  f"{WINDOW:.0%} of the first H steps, one run giving all three. lr grid ratio √2 from "
                  f"{cfg.lr_points} points per depth, extended (up to {cfg.max_lr_points}) until η* is interior; "
                  f"η* = vertex of a parabola in (log lr, log loss). {cfg.seeds} seeds; 95% intervals from "
                  f"{cfg.bootstrap} bootstrap resamples of the seeds. A depth whose best loss exceeds half of "
                  "chance (the label entropy) is not trained and is left out of the fit, as is an optimum left at "
                  f"the grid's edge. νP: widths m·(k + k0)², m = {cfg.m}, k0 = {cfg.width_offset}"
                  f"{f', capped at {cfg.max_width} (not νP beyond the cap)' if cfg.max_width else ', uncapped'}; "
                  f"sp and sp_inv_depth: width {cfg.sp_width}. {len(runs)} runs "
                  f"({sum(r['diverged'] for r in runs.values())} with a non-finite loss"
                  f"{reused}), {env['wall_time_s']:.0f} s on {env['device']} with {cfg.workers} worker process(es)."),
        *([Paragraph(WHY_COSINE)] if cfg.schedule == "cosine" else []),
        Paragraph("Prediction (SPEC §2): one step moves the output by about η·T(L), T(L) = Σ_{k<L} ρ_k, so "
                  "η* ∝ 1/T(L); the predicted slope is the least-squares slope of −log T(L) over the fitted depths."),
        Paragraph(EFFECTIVE_TEXT.format(batch=cfg.batch_size, probe=PROBE)),
    ]
    for task, entry in analysis.items():
        rows = []
        for variant, v in entry["parameterizations"].items():
            for h in hs:
                fit = v["horizons"][str(h)]["fit"]
                excluded = [d for d in cfg.depths if d not in fit["depths"]]
                rows.append([variant, h, _signed(fit["slope"]), _ci(fit), _signed(fit["predicted_slope"]),
                             _signed(fit["predicted_slope_effective"]), ", ".join(map(str, fit["depths"])) or "none",
                             ", ".join(map(str, excluded)) or "none"])
        blocks += [Heading(f"{task}: slope of log η* against log L"),
                   Table(["parameterization", "horizon", "measured slope", "95% CI", "T(L) prediction",
                          "T_e(L) prediction", "depths fitted", "left out"], rows)]
        blocks += _drift_blocks(task, entry, hs, "shared_drift", "T(L)")
        blocks += _drift_blocks(task, entry, hs, "shared_drift_effective", "T_e(L)")
        rows = []
        for variant, v in entry["parameterizations"].items():
            for d in cfg.depths:
                cells = [variant, d, fmt(v["T"][str(d)]), fmt(v["T_effective"][str(d)])]
                for h in hs:
                    e = v["horizons"][str(h)]["by_depth"][str(d)]
                    o = e["optimum"]
                    note = "" if e["trained"] else " (not trained)"
                    note += " (edge)" if o["at_edge"] else ""
                    cells.append(f"{fmt(o['refined'])} @ {fmt(o['loss'])}{note}")
                rows.append(cells)
        blocks += [Heading(f"{task}: η* @ best loss per depth (chance {entry['chance_loss']:.3f})"),
                   Table(["parameterization", "depth", "T(L)", "T_e(L)", *[f"H = {h}" for h in hs]], rows)]
        rows = [[variant, d, ", ".join(f"{fmt(lr)}: {k}" for lr, k in zip(e["lrs"], e["stuck"]))]
                for variant, v in entry["parameterizations"].items() for d in cfg.depths
                for e in (v["horizons"][str(hs[-1])]["by_depth"][str(d)],)]
        blocks += [Heading(f"{task}: runs left above half of chance at H = {hs[-1]}, of {cfg.seeds} seeds per lr"),
                   Paragraph("Runs whose metric is above half of chance (or not finite): slow to train at small "
                             "lr, or left on a plateau. η* comes from the mean over seeds, so where such runs grow "
                             "in number with lr, η* follows how often they occur, not T(L) alone."),
                   Table(["parameterization", "depth", "lr: runs stuck"], rows)]
        recorded = [(variant, d, v["features"][str(d)]) for variant, v in entry["parameterizations"].items()
                    if v["features"] for d in cfg.depths]
        rows = [[variant, d, fmt(entry["feature_cos_predicted"][str(d)]), fmt(f["init"]),
                 *(f"{fmt(f[g]['at_T'])} ({f[g]['runs']})" for g in ("trained", "stuck"))]
                for variant, d, f in recorded]
        if rows:
            blocks += [Heading(f"{task}: how alike the inputs look to the readout"),
                       Paragraph(f"The mean cosine between the readout inputs φ(h_{{L−1}}) of {PROBE} train inputs "
                                 "(1: the readout sees one input), predicted at init for infinite width by the EOC "
                                 "correlation map (SPEC §1) applied L − 1 times to the inputs' cosines, measured at "
                                 f"init over all runs, and after T = {cfg.horizon} steps over the runs that trained "
                                 f"(metric at H = {hs[-1]} at most half of chance) and those that did not; run "
                                 "counts in brackets, over every lr of the grid."),
                       Table(["parameterization", "depth", "predicted at init", "measured at init",
                              f"after {cfg.horizon} steps, trained (runs)", f"after {cfg.horizon} steps, stuck (runs)"],
                             rows)]
        if any(f["inactive_init"] is not None for _, _, f in recorded):  # runs saved before it have none
            rows = [[variant, d, fmt(f["inactive_init"]), *(fmt(f[g]["inactive_at_T"]) for g in ("trained", "stuck"))]
                    for variant, d, f in recorded]
            blocks += [Heading(f"{task}: readout inputs switched off for every probe input"),
                       Paragraph(f"The fraction of the readout's input units φ(h_{{L−1}}) that are 0 on all {PROBE} "
                                 "probe inputs (a ReLU unit switched off for all of them), at init over all runs, "
                                 f"and after T = {cfg.horizon} steps over the runs that trained and those that did "
                                 "not (the same runs as above)."),
                       Table(["parameterization", "depth", "at init", f"after {cfg.horizon} steps, trained",
                              f"after {cfg.horizon} steps, stuck"], rows)]
    blocks += [Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures]
    return blocks


def summary_line(results: dict[str, Any]) -> str:
    """One line: the measured slope, its CI and the prediction at the longest horizon, per task and variant."""
    h = str(results["horizons"][-1])
    parts = []
    for task, entry in results["analysis"].items():
        for variant, v in entry["parameterizations"].items():
            fit = v["horizons"][h]["fit"]
            parts.append(f"{task} {variant}: slope {_signed(fit['slope'])} {_ci(fit)} (T(L) "
                         f"{_signed(fit['predicted_slope'])}, T_e(L) {_signed(fit['predicted_slope_effective'])})")
        for key, name in (("shared_drift", "T(L)"), ("shared_drift_effective", "T_e(L)")):
            if drift := entry.get(key, {}).get(h):
                parts.append(f"{task} shared drift from {name} {_signed(drift['drift'])} {_ci(drift)}")
    return "; ".join(parts)
