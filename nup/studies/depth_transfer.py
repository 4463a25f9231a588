"""Learning-rate transfer across depth (SPEC §5): final train loss against lr, per depth and parameterization.

For every parameterization (``nup``, ``sp``, ``sp_inv_depth``), depth ``L`` and lr on a log grid,
a NuMLP is trained with NuP (normalized updates, constant schedule) on minibatches of the UCI
digits (or the teacher task), and its cross-entropy on the whole train set is recorded. The
optimal lr ``η*(L)`` is the grid minimum, refined by a parabola through it and its two
neighbours in log lr; its drift across depth is reported as ``η*(L_max)/η*(L_min)`` and as the
slope of ``log η*`` against ``log L`` (0 means perfect transfer).
"""

from __future__ import annotations

import math
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

DATA_SETS = ("digits", "teacher")
FLAGS = (
    Flag("depths", "ints", "depths L (comma-separated)"),
    Flag("parameterizations", "strs", "parameterizations among nup, sp, sp_inv_depth (comma-separated)"),
    Flag("lrs", "floats", "learning rates (comma-separated; depth_transfer: the grid, at least 3 values)"),
    Flag("steps", "int", "optimizer steps (per run)"),
    Flag("batch_size", "int", "minibatch size"),
    Flag("m", "int", "νP base width: hidden widths m·k²"),
    Flag("sp_width", "int", "constant hidden width of sp and sp_inv_depth"),
    Flag("max_width", "width", "cap on νP hidden widths (0: uncapped)"),
    Flag("activation", "str", "activation (relu, abs, tanh, ...)"),
    Flag("data", "str", "digits | teacher"),
    Flag("seeds", "int", "seeds per configuration (results are averaged)"),
)


@dataclass
class Config:
    """The study's settings; the defaults fit 10 minutes on two CPU cores."""

    depths: tuple[int, ...] = (4, 8, 16, 32, 64)
    parameterizations: tuple[str, ...] = ("nup", "sp", "sp_inv_depth")
    lrs: tuple[float, ...] = tuple(2.0**k for k in range(-9, 1))
    steps: int = 200
    batch_size: int = 128
    m: int = 8
    sp_width: int = 128
    max_width: int | None = 128
    activation: str = "relu"
    data: str = "digits"
    seeds: int = 1
    seed: int = 0
    device: str = "cpu"


QUICK = {"depths": (3, 6), "lrs": (0.01, 0.1, 1.0), "steps": 8, "batch_size": 32, "m": 2, "sp_width": 16,
         "max_width": 16}


def _check(cfg: Config) -> None:
    from nup.parameterization import PARAMETERIZATIONS

    if not cfg.depths or min(cfg.depths) < 3:
        raise ValueError(f"depths must be integers >= 3, got {cfg.depths}")
    if len(cfg.lrs) < 3 or min(cfg.lrs) <= 0:
        raise ValueError(f"lrs needs at least 3 positive values, got {cfg.lrs}")
    for p in cfg.parameterizations:
        if p not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {p!r}; choose from {', '.join(PARAMETERIZATIONS)}")
    if cfg.data not in DATA_SETS:
        raise ValueError(f"unknown data {cfg.data!r}; choose one of {', '.join(DATA_SETS)}")
    if min(cfg.steps, cfg.batch_size, cfg.m, cfg.sp_width, cfg.seeds) < 1:
        raise ValueError("steps, batch_size, m, sp_width and seeds must be >= 1")


def _model(cfg: Config, param: str, depth: int, n_in: int, n_out: int):
    from nup import NuMLP

    if param == "nup":
        return NuMLP(n_in, n_out, depth, cfg.m, parameterization=param, activation=cfg.activation,
                     max_width=cfg.max_width)
    return NuMLP(n_in, n_out, depth, cfg.sp_width, parameterization=param, activation=cfg.activation)


def train_one(cfg: Config, param: str, depth: int, lr: float, seed: int, data) -> dict[str, Any]:
    """Train one model; returns its final full-train-set loss and accuracy (loss None if it diverged)."""
    from nup import NuP
    from nup.data import batches

    x, y = data
    n_classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = _model(cfg, param, depth, x.shape[1], n_classes).to(x.device)
    opt = NuP(model.named_parameters(), lr=lr)
    stream = batches(x, y, cfg.batch_size, torch.Generator().manual_seed(seed))
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    for step in range(cfg.steps):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        finite &= torch.isfinite(loss.detach())
        if step % 20 == 19 and not bool(finite):  # one host sync every 20 steps
            break
    with torch.no_grad():
        out = model(x)
        loss, acc = F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()
    diverged = not (bool(finite) and math.isfinite(loss))
    return {"parameterization": param, "depth": depth, "lr": lr, "seed": seed,
            "train_loss": None if diverged else loss, "train_acc": acc, "diverged": diverged,
            "widths_capped": bool(model.capped), "max_hidden_width": max(model.widths[1:-1])}


def optimal_lr(lrs: list[float], losses: list[float]) -> dict[str, Any]:
    """The grid argmin of ``losses`` and a parabola-refined optimum in log lr.

    Returns ``{"grid": lr, "refined": lr, "loss": min loss, "at_edge": bool}``. The refined value
    stays within half a grid step of the grid optimum; at the grid's edge (or with non-finite
    neighbours) it is the grid value. None entries when every loss is infinite.
    """
    y = np.asarray(losses, dtype=np.float64)
    if not np.isfinite(y).any():
        return {"grid": None, "refined": None, "loss": None, "at_edge": None}
    i = int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))
    lx = np.log(np.asarray(lrs, dtype=np.float64))
    refined = lx[i]
    at_edge = i in (0, len(lrs) - 1)
    if not at_edge and np.isfinite(y[i - 1 : i + 2]).all():
        a, b, c = lx[i - 1 : i + 2]
        fa, fb, fc = y[i - 1 : i + 2]
        den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
        if den != 0:
            vertex = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
            refined = float(np.clip(vertex, (a + b) / 2, (b + c) / 2))
    return {"grid": float(lrs[i]), "refined": float(math.exp(refined)), "loss": float(y[i]), "at_edge": at_edge}


def analyse(cfg: Config, runs: list[dict]) -> dict[str, Any]:
    """Mean loss per (parameterization, depth, lr), η* per depth, and its drift per parameterization."""
    lrs = sorted(cfg.lrs)
    table: dict[str, dict[str, Any]] = {}
    for param in cfg.parameterizations:
        per_depth = {}
        for depth in cfg.depths:
            losses = []
            for lr in lrs:
                vals = [math.inf if r["train_loss"] is None else r["train_loss"] for r in runs
                        if (r["parameterization"], r["depth"], r["lr"]) == (param, depth, lr)]
                losses.append(float(np.mean(vals)) if vals else math.inf)
            opt = optimal_lr(lrs, losses)
            finite = [v for v in losses if math.isfinite(v)]
            opt["loss_spread"] = (max(finite) - min(finite)) if finite else None
            per_depth[depth] = {"losses": [finite_or_none(v) for v in losses], "optimum": opt}
        depths = [d for d in cfg.depths if per_depth[d]["optimum"]["refined"] is not None]
        etas = [per_depth[d]["optimum"]["refined"] for d in depths]
        drift = {
            "depth_min": depths[0] if depths else None,
            "depth_max": depths[-1] if depths else None,
            "ratio": etas[-1] / etas[0] if len(etas) > 1 else None,
            "slope_loglog": finite_or_none(loglog_slope(depths, etas)) if len(etas) > 1 else None,
            "edge_depths": [d for d in depths if per_depth[d]["optimum"]["at_edge"]],
        }
        table[param] = {"by_depth": {str(d): v for d, v in per_depth.items()}, "drift": drift}
    return {"lrs": lrs, "parameterizations": table}


def _plots(cfg: Config, analysis: dict, out: Path, n_classes: int) -> list[str]:
    lrs = analysis["lrs"]
    params = cfg.parameterizations
    fig = figure(4.6 * len(params), 3.8)
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    colours = [f"C{i}" for i in range(len(cfg.depths))]
    clip = 2.0 * math.log(n_classes)
    for ax, param in zip(axes, params):
        for colour, depth in zip(colours, cfg.depths):
            entry = analysis["parameterizations"][param]["by_depth"][str(depth)]
            ys = [clip if v is None else min(v, clip) for v in entry["losses"]]
            ax.plot(lrs, ys, "o-", color=colour, ms=3, label=f"L={depth}")
            bad = [lr for lr, v in zip(lrs, entry["losses"]) if v is None]
            if bad:
                ax.plot(bad, [clip] * len(bad), "x", color=colour, ms=7)
            opt = entry["optimum"]
            if opt["refined"] is not None:
                ax.plot([opt["grid"]], [opt["loss"]], "*", color=colour, ms=11, mec="k", mew=0.5)
        ax.axhline(math.log(n_classes), color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lr η")
        ax.set_ylabel(f"train loss after {cfg.steps} steps")
        ax.set_ylim(top=clip * 1.05)
        ax.set_title(param)
        ax.legend(fontsize="small")
    fig.suptitle("loss against lr per depth (★ grid optimum, × diverged, dotted: chance level)")
    names = [save_figure(fig, out / "loss_vs_lr.png")]

    fig = figure(5.2, 3.8)
    ax = fig.add_subplot()
    for i, param in enumerate(params):
        by_depth = analysis["parameterizations"][param]["by_depth"]
        pts = [(d, by_depth[str(d)]["optimum"]) for d in cfg.depths if by_depth[str(d)]["optimum"]["refined"]]
        if not pts:
            continue
        ax.plot([d for d, _ in pts], [o["refined"] for _, o in pts], "o-", color=f"C{i}", label=param)
        edge = [(d, o["refined"]) for d, o in pts if o["at_edge"]]
        if edge:
            ax.plot(*zip(*edge), "o", mfc="white", color=f"C{i}", ms=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("depth L")
    ax.set_ylabel("optimal lr η*")
    ax.set_title("optimal lr against depth (hollow: at the grid's edge)")
    ax.legend(fontsize="small")
    names.append(save_figure(fig, out / "optimal_lr_vs_depth.png"))
    return names


def _widths_note(cfg: Config) -> str:
    if "nup" not in cfg.parameterizations:
        return ""
    if cfg.max_width is None:
        return f"νP widths are uncapped (m·k², m = {cfg.m})."
    k_cap = math.isqrt(max(cfg.max_width // cfg.m, 0))
    capped = [d for d in cfg.depths if cfg.m * (d - 1) ** 2 > cfg.max_width]
    return (f"**Capped widths.** νP hidden widths m·k² (m = {cfg.m}) are capped at max_width = {cfg.max_width}, "
            f"so only layers k ≤ {k_cap} follow the quadratic schedule; the νP runs at depth "
            f"{', '.join(map(str, capped)) or 'none'} are capped (their records say widths_capped = true). A capped "
            f"layer moves by √(m/max_width) = {math.sqrt(cfg.m / cfg.max_width):.3g} per unit lr instead of 1/k, "
            "so at large depth the capped νP runs are *not* νP: run with --max-width 0 (uncapped, a GPU job) "
            "to test νP itself.")


def _readme(cfg: Config, analysis: dict, runs: list[dict], env: dict, figures: list[str]) -> list:
    rows = []
    for param in cfg.parameterizations:
        for depth in cfg.depths:
            e = analysis["parameterizations"][param]["by_depth"][str(depth)]
            o = e["optimum"]
            rows.append([param, depth, o["grid"], o["refined"], o["loss"], o["loss_spread"],
                         "yes" if o["at_edge"] else "no"])
    drift_rows = []
    for param in cfg.parameterizations:
        d = analysis["parameterizations"][param]["drift"]
        drift_rows.append([param, f"{d['depth_max']}/{d['depth_min']}", d["ratio"], d["slope_loglog"],
                           ", ".join(map(str, d["edge_depths"])) or "none"])
    loss_rows = []
    for param in cfg.parameterizations:
        for depth in cfg.depths:
            losses = analysis["parameterizations"][param]["by_depth"][str(depth)]["losses"]
            loss_rows.append([param, depth, *["div" if v is None else f"{v:.3f}" for v in losses]])
    n_div = sum(r["diverged"] for r in runs)
    return [
        Heading("Study: learning-rate transfer across depth", 1),
        Paragraph(f"Final train loss (cross-entropy over the whole {cfg.data} train set) after {cfg.steps} NuP "
                  f"steps (constant lr, minibatch {cfg.batch_size}, {cfg.activation}) against lr, for depths "
                  f"{', '.join(map(str, cfg.depths))}. sp and sp_inv_depth use constant width {cfg.sp_width}. "
                  f"{len(runs)} runs ({n_div} diverged), {cfg.seeds} seed(s), {env['wall_time_s']:.0f} s on "
                  f"{env['device']} with {env['torch_threads']} torch thread(s)."),
        Paragraph(_widths_note(cfg)),
        Heading("Drift of the optimal lr across depth"),
        Paragraph("ratio = η*(L_max)/η*(L_min) and the least-squares slope of log η* against log L "
                  "(0 = the optimum transfers; −1 = η* ∝ 1/L). An optimum at the grid's edge is only a bound."),
        Table(["parameterization", "depths", "η* ratio", "slope", "optimum at grid edge (depths)"], drift_rows),
        Heading("Optimal lr per depth"),
        Paragraph("η* grid = the best grid lr; η* refined = vertex of a parabola in log lr through it and "
                  "its neighbours; spread = worst − best finite loss on the grid (a small spread means a flat, "
                  "ill-determined optimum)."),
        Table(["parameterization", "depth", "η* grid", "η* refined", "best loss", "spread", "at edge"], rows),
        Heading("Loss table"),
        Table(["parameterization", "depth", *[f"{lr:.3g}" for lr in analysis["lrs"]]], loss_rows),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup.data import load_digits_split, teacher_student

    _check(cfg)
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    loader = load_digits_split if cfg.data == "digits" else teacher_student
    x, y, _, _ = loader(seed=0, device=device)
    jobs = [(p, d, lr, cfg.seed + s) for p in cfg.parameterizations for d in cfg.depths
            for lr in cfg.lrs for s in range(cfg.seeds)]
    runs = []
    with tqdm(jobs, desc="depth_transfer", unit="run", disable=None if progress else True, leave=False) as bar:
        for param, depth, lr, seed in bar:
            bar.set_postfix_str(f"{param} L={depth} lr={lr:.3g}", refresh=False)
            t0 = time.perf_counter()
            record = train_one(cfg, param, depth, lr, seed, (x, y))
            record["time_s"] = round(time.perf_counter() - t0, 3)
            runs.append(record)
    analysis = analyse(cfg, runs)
    n_classes = int(y.max()) + 1
    figures = _plots(cfg, analysis, out, n_classes)
    env = environment(device, time.perf_counter() - start)
    results = {"study": "depth_transfer", "config": config_dict(cfg),
               "capped_runs": sum(r["widths_capped"] for r in runs), "analysis": analysis, "runs": runs,
               "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, analysis, runs, env, figures))
    return results


def summary_line(results: dict[str, Any]) -> str:
    """One line for the terminal: the drift of η* per parameterization."""
    parts = []
    for param, entry in results["analysis"]["parameterizations"].items():
        d = entry["drift"]
        parts.append(f"{param}: η* ratio {fmt(d['ratio'])}, slope {fmt(d['slope_loglog'])}")
    return "; ".join(parts)
