"""Coordinate check across depth (SPEC §5, mup style) for nup, sp and sp_inv_depth.

For each parameterization and depth, a NuMLP is trained a few NuP steps (constant lr) on one
fixed digits batch, and the RMS of every layer's preactivation ``h_ℓ`` and of its change since
init ``h_ℓ − h_ℓ(0)`` is recorded after ``t = 0 … T`` steps (:func:`nup.diagnostics.coord_check`).
The slopes of ``log RMS`` against ``log L`` summarise the plots: 0 is flat in depth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nup.report import Figure, Heading, Paragraph, Table
from nup.studies._common import (
    Flag,
    config_dict,
    environment,
    figure,
    finite_or_none,
    fmt,
    loglog_slope,
    prepare_out,
    save_figure,
    write_outputs,
)

FLAT = 0.15
"""|slope| at or below which a curve counts as flat in depth (a factor ≤ 1.37 over 4 → 32)."""

FLAGS = (
    Flag("steps", "int", "optimizer steps (per run)"),
    Flag("lrs", "floats", "learning rates (comma-separated)"),
)


@dataclass
class Config:
    """The study's settings (uncapped νP widths up to m·31² at depth 32)."""

    depths: tuple[int, ...] = (4, 8, 16, 32)
    parameterizations: tuple[str, ...] = ("nup", "sp", "sp_inv_depth")
    steps: int = 4
    lrs: tuple[float, ...] = (0.01, 0.1)
    batch_size: int = 64
    m: int = 2
    sp_width: int = 64
    max_width: int | None = None
    activation: str = "relu"
    seeds: int = 2
    seed: int = 0
    device: str = "cpu"


QUICK = {"depths": (3, 5), "steps": 2, "batch_size": 16, "m": 1, "sp_width": 8, "seeds": 1}


def _slopes(records: list[dict], t: int) -> dict[str, float | None]:
    """log-log slopes against depth at step ``t``: last hidden layer, mean over hidden layers, output."""
    from nup.diagnostics import coord_check_summary

    summary = coord_check_summary(records)["slopes"][t]
    sizes = sorted({r["size"] for r in records})
    out = {k: finite_or_none(v) for k, v in summary.items()}
    for key, name in (("h_rms", "f"), ("dh_rms", "df")):
        vals = []
        for s in sizes:
            rs = [r[key] for r in records if r["output"] and r["t"] == t and r["size"] == s]
            vals.append(sum(rs) / len(rs))
        out[name] = finite_or_none(loglog_slope(sizes, vals))
    return out


def _compact(records: list[dict], steps: int) -> dict[str, dict[str, list]]:
    """Seed-mean RMS per depth as ``{"h_rms": {L: [[layer 1 … L] for t = 0 … T]}, "dh_rms": …}``."""
    out: dict[str, dict[str, list]] = {"h_rms": {}, "dh_rms": {}}
    for size in sorted({r["size"] for r in records}):
        for key in out:
            rows = []
            for t in range(steps + 1):
                rs = [r for r in records if r["size"] == size and r["t"] == t]
                layers = sorted({r["layer"] for r in rs})
                rows.append([float(f"{np.mean([r[key] for r in rs if r['layer'] == k]):.5g}") for k in layers])
            out[key][str(size)] = rows
    return out


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup import NuMLP, NuP
    from nup.data import load_digits_split
    from nup.diagnostics import coord_check, plot_coord_check

    if len(cfg.depths) < 2 or min(cfg.depths) < 3:
        raise ValueError(f"depths needs two or more integers >= 3, got {cfg.depths}")
    if not cfg.lrs or min(cfg.lrs) <= 0:
        raise ValueError(f"lrs must be positive, got {cfg.lrs}")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    x, y = x_all[: cfg.batch_size], y_all[: cfg.batch_size]
    loss_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    by_lr: dict[str, dict[str, Any]] = {}
    records_of: dict[tuple[float, str], list[dict]] = {}
    jobs = [(lr, p) for lr in cfg.lrs for p in cfg.parameterizations]
    for lr, param in tqdm(jobs, desc="coord_check", unit="config", disable=None if progress else True, leave=False):
        width = cfg.m if param == "nup" else cfg.sp_width
        cap = cfg.max_width if param == "nup" else None

        def make_model(depth: int, seed: int, param: str = param, width: int = width, cap: int | None = cap):
            return NuMLP(x.shape[1], 10, depth, width, parameterization=param, activation=cfg.activation,
                         max_width=cap).to(device)

        make_opt = lambda model, lr=lr: NuP(model.named_parameters(), lr=lr)
        records = coord_check(make_model, make_opt, x, y, loss_fn, cfg.depths, steps=cfg.steps, seeds=seeds)
        records_of[lr, param] = records
        by_lr.setdefault(str(lr), {})[param] = {
            "slopes": {str(t): _slopes(records, t) for t in range(cfg.steps + 1)},
            "rms": _compact(records, cfg.steps),
        }
    figures = [_overview(cfg, records_of, out)]
    detail_ts = sorted({1, cfg.steps})  # t = 0 has no change to plot; two columns keep the PNGs small
    for param in cfg.parameterizations:
        name = f"coord_check_{param}_lr{cfg.lrs[-1]:g}.png"
        plot_coord_check([r for r in records_of[cfg.lrs[-1], param] if r["t"] in detail_ts], str(out / name))
        figures.append(name)
    env = environment(device, time.perf_counter() - start)
    results = {"study": "coord_check", "config": config_dict(cfg), "flat_threshold": FLAT, "lrs": by_lr,
               "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, by_lr, env, figures))
    return results


def _curve(records: list[dict], key: str, t: int, output: bool) -> tuple[list[int], list[float]]:
    """Seed-mean of ``key`` at step ``t`` against depth: the output, or the last hidden layer."""
    sizes = sorted({r["size"] for r in records})
    ys = []
    for s in sizes:
        rs = [r for r in records if r["t"] == t and r["size"] == s]
        layer = max(r["layer"] for r in rs) - (0 if output else 1)
        vals = [r[key] for r in rs if r["layer"] == layer]
        ys.append(sum(vals) / len(vals))
    return sizes, ys


def _overview(cfg: Config, records_of: dict, out: Path) -> str:
    fig = figure(10.5, 3.2 * len(cfg.lrs))
    axes = fig.subplots(len(cfg.lrs), 3, squeeze=False)
    panels = (("h_rms", False, "RMS(h), last hidden layer"), ("dh_rms", False, "RMS(Δh), last hidden layer"),
              ("dh_rms", True, "RMS(Δf), network output"))
    for row, lr in zip(axes, cfg.lrs):
        for ax, (key, output, title) in zip(row, panels):
            for i, param in enumerate(cfg.parameterizations):
                xs, ys = _curve(records_of[lr, param], key, cfg.steps, output)
                ax.plot(xs, ys, "o-", color=f"C{i}", label=param)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("depth L")
            ax.set_title(f"{title}, t={cfg.steps}, lr {lr:g}", fontsize="medium")
        row[0].legend(fontsize="small")
    return save_figure(fig, out / "coord_check_overview.png")


def _readme(cfg: Config, by_lr: dict, env: dict, figures: list[str]) -> list:
    t = str(cfg.steps)
    rows = []
    for lr, per_param in by_lr.items():
        for param, entry in per_param.items():
            s = entry["slopes"][t]
            flat = ["yes" if s[k] is not None and abs(s[k]) <= FLAT else "no" for k in ("dh_mean", "df")]
            rows.append([lr, param, s["h_mean"], s["dh_last"], s["dh_mean"], s["df"], *flat])
    capped = cfg.max_width is not None and "nup" in cfg.parameterizations
    return [
        Heading("Study: coordinate check across depth", 1),
        Paragraph(f"NuMLP ({cfg.activation}, EOC), {cfg.steps} NuP steps (constant lr "
                  f"{' and '.join(map(str, cfg.lrs))}) on one fixed batch of {cfg.batch_size} digits "
                  "(cross-entropy); depths "
                  f"{', '.join(map(str, cfg.depths))}; νP widths m·k² with m = {cfg.m}"
                  f"{f' capped at {cfg.max_width}' if capped else ' (uncapped)'}; sp and sp_inv_depth width "
                  f"{cfg.sp_width}; {cfg.seeds} seed(s). {env['wall_time_s']:.0f} s on {env['device']} with "
                  f"{env['torch_threads']} torch thread(s)."),
        Heading(f"Slopes of log RMS against log depth at t = {cfg.steps}"),
        Paragraph("h_mean: RMS(h), geometric mean over hidden layers; dh_last / dh_mean: RMS(h − h₀) of the last "
                  "hidden layer / geometric mean over hidden layers; df: RMS of the output's change. 0 = flat in "
                  f"depth, a = grows like L^a. Flat = |slope| ≤ {FLAT} (hidden: dh_mean; output: df). The figures "
                  f"show lr {cfg.lrs[-1]:g} at t = 1 and t = {cfg.steps}."),
        Table(["lr", "parameterization", "h_mean", "dh_last", "dh_mean", "df (output)", "hidden flat", "output flat"],
              rows),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line: the dh_last and output slopes at the last step, per lr and parameterization."""
    t = str(results["config"]["steps"])
    return "; ".join(f"lr {lr} {p}: dh_last slope {fmt(e['slopes'][t]['dh_last'])}, "
                     f"df slope {fmt(e['slopes'][t]['df'])}"
                     for lr, per_param in results["lrs"].items() for p, e in per_param.items())
