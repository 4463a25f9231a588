"""Catapult phases of plain gradient descent on MSE (Lewkowycz et al. 2020), in units of 2/λ₀.

Two models, each trained by plain full-batch GD ``θ ← θ − η∇L`` on ``L = (1/2n)·Σ‖f(x_i) − y_i‖²``
(no normalized updates, so the classic theory applies):

- uv: ``f(x) = vᵀ(u x)/√n`` with ``u`` (n×d), ``v`` (n) drawn N(0, 1), one training point
  ``x = 1`` (d = 1), target set so that the initial residual is 1. Theory (large n): lazy for
  ``η < 2/λ₀``, catapult for ``2/λ₀ < η < 4/λ₀``, divergent beyond.
- mlp: an EOC ReLU NuMLP with constant widths and NTK readout (``c/√n``), a few digits as
  inputs, targets ±1 (digit < 5 or not).

``λ₀`` is the top eigenvalue of the empirical NTK (:func:`nup.diagnostics.ntk_top_eigenvalue`,
exact Jacobian), and each run uses ``η = units·2/λ₀``. Every run is classified from its loss
trajectory ``L_t`` and its final NTK eigenvalue ``λ_T``:

- divergent: a loss is not finite or exceeds ``DIVERGE·L₀``;
- lazy: converged (``L_T < CONVERGED·L₀``), the loss never rose above its running minimum by
  more than ``SPIKE·L₀``, and ``|λ_T/λ₀ − 1| ≤ LAZY_LAMBDA``;
- catapult: converged after such a rise, with ``λ_T < (1 − LAMBDA_DROP)·λ₀``;
- other: anything else (not converged within the steps, a rise without a drop of λ, or λ moved
  by more than ``LAZY_LAMBDA`` without a rise of the loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from nup.report import Figure, Heading, Paragraph, Table
from nup.studies._common import (
    Flag,
    config_dict,
    environment,
    figure,
    finite_or_none,
    fmt,
    prepare_out,
    save_figure,
    write_outputs,
)

DIVERGE = 1e6
CONVERGED = 1e-2
SPIKE = 1e-3
LAMBDA_DROP = 0.01
LAZY_LAMBDA = 0.1
SOLVED = 1e-24
KEEP = 40  # log-spaced points kept per stored trajectory, after the first EARLY steps (all kept)
EARLY = 30
CLASSES = ("lazy", "catapult", "other", "divergent")
COLOURS = {"lazy": "C0", "catapult": "C1", "other": "C7", "divergent": "C3"}

FLAGS = (
    Flag("uv_width", "int", "width n of the uv model"),
    Flag("uv_units", "floats", "uv grid: LOW,HIGH,POINTS of η in units of 2/λ₀"),
    Flag("uv_steps", "int", "GD steps per uv run"),
    Flag("mlp_width", "int", "constant hidden width of the catapult MLP"),
    Flag("mlp_depth", "int", "depth (weight layers) of the catapult MLP"),
    Flag("mlp_units", "floats", "MLP grid: LOW,HIGH,POINTS of η in units of 2/λ₀"),
    Flag("mlp_steps", "int", "GD steps per MLP run"),
    Flag("n_train", "int", "training points (catapult: of the MLP; schedule, eos: the full batch)"),
    Flag("ntk_every", "int", "measure the MLP's NTK top eigenvalue every this many steps (uv: every step)"),
)


@dataclass
class Config:
    """The study's settings."""

    uv_width: int = 1000
    uv_units: tuple[float, ...] = (0.5, 2.5, 41)
    uv_steps: int = 500
    mlp_width: int = 256
    mlp_depth: int = 3
    mlp_units: tuple[float, ...] = (0.5, 6.0, 23)
    mlp_steps: int = 400
    n_train: int = 16
    ntk_every: int = 2
    seed: int = 0
    device: str = "cpu"


QUICK = {"uv_width": 64, "uv_units": (0.5, 3.0, 3), "uv_steps": 150, "mlp_width": 32, "mlp_depth": 3,
         "mlp_units": (0.5, 8.0, 3), "mlp_steps": 60, "n_train": 4, "ntk_every": 10}


class UVModel(nn.Module):
    """``f(x) = vᵀ(u x)/√n``: x ``(batch, d)`` → ``(batch, 1)``; u ``(n, d)`` and v ``(n,)`` start N(0, 1)."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.u = nn.Parameter(torch.randn(n, d))
        self.v = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.u.T) @ self.v / math.sqrt(self.n)).unsqueeze(-1)


def grid(spec: tuple[float, ...]) -> list[float]:
    """``(low, high, points)`` → ``points`` evenly spaced values from ``low`` to ``high``."""
    if len(spec) != 3 or not float(spec[2]).is_integer() or spec[2] < 2 or not 0 < spec[0] < spec[1]:
        raise ValueError(f"a units grid is LOW,HIGH,POINTS with 0 < LOW < HIGH and POINTS >= 2, got {spec}")
    return [float(v) for v in np.linspace(spec[0], spec[1], int(spec[2]))]


def classify(losses: list[float], lam0: float, lam_final: float | None) -> str:
    """The class of a run (module docstring) from its loss trajectory and final NTK eigenvalue."""
    l0 = losses[0]
    if any(not math.isfinite(v) or v > DIVERGE * l0 for v in losses):
        return "divergent"
    arr = np.asarray(losses, dtype=np.float64)
    rise = float(np.max(arr - np.minimum.accumulate(arr))) / l0
    if arr[-1] >= CONVERGED * l0 or lam_final is None:
        return "other"
    if rise <= SPIKE:
        return "lazy" if abs(lam_final / lam0 - 1.0) <= LAZY_LAMBDA else "other"
    return "catapult" if lam_final < (1.0 - LAMBDA_DROP) * lam0 else "other"


def _sample(n: int) -> list[int]:
    """Indices kept of a trajectory of ``n`` points: the first ``EARLY``, then ``KEEP`` log-spaced, and the last."""
    late = np.unique(np.geomspace(EARLY, n - 1, KEEP).astype(int)) if n > EARLY else []
    return sorted({*range(min(n, EARLY)), *map(int, late), n - 1})


def gd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: float, lam0: float, steps: int,
           ntk_every: int) -> dict[str, Any]:
    """Plain GD at ``η = units·2/λ₀``; the loss every step and ``λ_t`` every ``ntk_every`` steps.

    A run stops early when its loss exceeds ``DIVERGE·L₀`` or falls below ``SOLVED·L₀``; the stored
    trajectories keep every one of the first ``EARLY`` points and ``KEEP`` log-spaced ones after.
    """
    from nup.diagnostics import mse_loss, ntk_top_eigenvalue

    eta = units * 2.0 / lam0
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    lams: list[tuple[int, float]] = []
    for t in range(steps + 1):
        if t % ntk_every == 0 or t == steps:
            lams.append((t, ntk_top_eigenvalue(model, x, method="full")))
        loss = mse_loss(model, (x, y))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > DIVERGE * losses[0] or t == steps:
            break
        if losses[-1] < SOLVED * losses[0]:  # fitted to round-off: nothing more to see
            if lams[-1][0] != t:
                lams.append((t, ntk_top_eigenvalue(model, x, method="full")))
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-eta)
    diverged = not math.isfinite(losses[-1]) or losses[-1] > DIVERGE * losses[0]
    lam_final = None if diverged else lams[-1][1]
    label = classify(losses, lam0, lam_final)
    arr = np.asarray(losses, dtype=np.float64)
    idx, lam_idx = _sample(len(losses)), _sample(len(lams))
    return {
        "units": units, "eta": eta, "class": label, "steps_run": len(losses) - 1,
        "loss0": losses[0], "loss_max": finite_or_none(float(np.max(arr))), "loss_final": finite_or_none(losses[-1]),
        "lam_final_over_lam0": None if lam_final is None else lam_final / lam0,
        "eta_lam_final_over_2": None if lam_final is None else eta * lam_final / 2.0,
        "trajectory": {"step": idx, "loss": [finite_or_none(float(f"{losses[i]:.6g}")) for i in idx],
                       "lam_step": [lams[i][0] for i in lam_idx],
                       "lam_over_lam0": [finite_or_none(float(f"{lams[i][1] / lam0:.6g}")) for i in lam_idx]},
    }


def boundaries(runs: list[dict]) -> dict[str, Any]:
    """Phase boundaries on the grid, in units of 2/λ₀: each as ``[last grid point before, first at]``."""
    runs = sorted(runs, key=lambda r: r["units"])

    def first(label: str) -> list[float | None]:
        for i, r in enumerate(runs):
            if r["class"] == label:
                return [runs[i - 1]["units"] if i else None, r["units"]]
        return [runs[-1]["units"], None]

    lazy = [r["units"] for r in runs if r["class"] == "lazy"]
    return {"catapult_from": first("catapult"), "divergent_from": first("divergent"),
            "lazy_up_to": max(lazy) if lazy else None,
            "counts": {c: sum(r["class"] == c for r in runs) for c in CLASSES}}


def _uv_task(cfg: Config, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = UVModel(1, cfg.uv_width).to(device=device, dtype=torch.float64)
    x = torch.ones(1, 1, dtype=torch.float64, device=device)
    with torch.no_grad():
        y = model(x) - 1.0
    return model, x, y


def _mlp_task(cfg: Config, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from nup import NuMLP
    from nup.data import load_digits_split

    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    idx = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_train]
    x = x_all[idx.to(device)]
    y = torch.where(y_all[idx.to(device)] < 5, 1.0, -1.0).unsqueeze(1)
    torch.manual_seed(cfg.seed)
    model = NuMLP(x.shape[1], 1, cfg.mlp_depth, cfg.mlp_width, width_schedule="constant", readout="ntk").to(device)
    return model, x, y


def _sweep(name: str, make, units: list[float], steps: int, ntk_every: int, bar) -> dict[str, Any]:
    from nup.diagnostics import ntk_top_eigenvalue

    model, x, y = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lam0 = ntk_top_eigenvalue(model, x, method="full")
    runs = []
    for u in units:
        bar.set_postfix_str(f"{name} η·λ₀/2={u:.3g}", refresh=False)
        model.load_state_dict(state)
        runs.append(gd_run(model, x, y, u, lam0, steps, ntk_every))
        bar.update()
    return {"lam0": lam0, "n_train": x.shape[0], "n_params": sum(p.numel() for p in model.parameters()),
            "runs": runs, "boundaries": boundaries(runs)}


def _plot(name: str, entry: dict, out: Path, theory: tuple[float, float] | None) -> str:
    runs = entry["runs"]
    fig = figure(13.0, 3.8)
    ax_loss, ax_lam, ax_phase = fig.subplots(1, 3)
    cmap = colormaps["viridis"]
    shown = runs[:: max(1, len(runs) // 8)]
    top = max(r["units"] for r in runs)
    for r in shown:
        c = cmap(r["units"] / top)
        tr = r["trajectory"]
        pts = [(s + 1, v) for s, v in zip(tr["step"], tr["loss"]) if v is not None and v > 0]
        if pts:
            ax_loss.plot(*zip(*pts), color=c, lw=1, label=f"{r['units']:.2f} ({r['class']})")
        lam = [(s + 1, v) for s, v in zip(tr["lam_step"], tr["lam_over_lam0"]) if v is not None]
        if r["class"] != "divergent":
            ax_lam.plot(*zip(*lam), color=c, lw=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xscale("log")
    ax_lam.set_xscale("log")
    ax_loss.set_xlabel("step + 1")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss (legend: η in units of 2/λ₀)", fontsize="medium")
    ax_loss.legend(fontsize="x-small")
    ax_lam.set_xlabel("step + 1")
    ax_lam.set_ylabel("λ_t / λ₀")
    ax_lam.set_yscale("log")
    ax_lam.set_title("NTK top eigenvalue (runs that converged)", fontsize="medium")
    finite = [r["lam_final_over_lam0"] for r in runs if r["lam_final_over_lam0"] is not None]
    floor = min(finite + [1.0]) / 3
    for label in CLASSES:
        sel = [r for r in runs if r["class"] == label]
        if sel:
            ys = [r["lam_final_over_lam0"] if r["lam_final_over_lam0"] is not None else floor for r in sel]
            ax_phase.plot([r["units"] for r in sel], ys, "x" if label == "divergent" else "o", color=COLOURS[label],
                          label=label)
    us = np.linspace(min(r["units"] for r in runs), top, 200)
    ax_phase.plot(us, 1.0 / us, "k:", lw=0.8, label="λ = 2/η")
    if theory:
        for v in theory:
            ax_phase.axvline(v, color="0.5", ls="--", lw=0.8)
    ax_phase.set_yscale("log")
    ax_phase.set_xlabel("η in units of 2/λ₀")
    ax_phase.set_ylabel("λ_final / λ₀ (divergent: × at the bottom)")
    ax_phase.set_title("phases" + (" (dashed: uv theory 1 and 2)" if theory else ""), fontsize="medium")
    ax_phase.legend(fontsize="x-small")
    fig.suptitle(f"catapult, {name} model, λ₀ = {entry['lam0']:.4g}")
    return save_figure(fig, out / f"catapult_{name}.png")


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    if min(cfg.uv_width, cfg.uv_steps, cfg.mlp_width, cfg.mlp_steps, cfg.n_train, cfg.ntk_every) < 1:
        raise ValueError("widths, steps, n_train and ntk_every must be >= 1")
    if cfg.mlp_depth < 2:
        raise ValueError(f"mlp_depth must be >= 2, got {cfg.mlp_depth}")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    uv_units, mlp_units = grid(cfg.uv_units), grid(cfg.mlp_units)
    models = {}
    with tqdm(total=len(uv_units) + len(mlp_units), desc="catapult", unit="run",
              disable=None if progress else True, leave=False) as bar:
        models["uv"] = _sweep("uv", lambda: _uv_task(cfg, device), uv_units, cfg.uv_steps, 1, bar)
        models["mlp"] = _sweep("mlp", lambda: _mlp_task(cfg, device), mlp_units, cfg.mlp_steps, cfg.ntk_every, bar)
    figures = [_plot("uv", models["uv"], out, (1.0, 2.0)), _plot("mlp", models["mlp"], out, None)]
    env = environment(device, time.perf_counter() - start)
    results = {"study": "catapult", "config": config_dict(cfg),
               "rules": {"diverge": DIVERGE, "converged": CONVERGED, "spike": SPIKE, "lambda_drop": LAMBDA_DROP,
                         "lazy_lambda": LAZY_LAMBDA},
               "theory_uv": {"catapult_from": 1.0, "divergent_from": 2.0}, "models": models,
               "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, models, env, figures))
    return results


def _bound(pair: list[float | None]) -> str:
    lo, hi = pair
    if hi is None:
        return f"not reached (≤ {fmt(lo)} on the grid)"
    return f"at or below {fmt(hi)}" if lo is None else f"between {fmt(lo)} and {fmt(hi)}"


def _readme(cfg: Config, models: dict, env: dict, figures: list[str]) -> list:
    rows = []
    for name, entry in models.items():
        b = entry["boundaries"]
        lazy = [r["lam_final_over_lam0"] for r in entry["runs"] if r["class"] == "lazy"]
        cat = [r["eta_lam_final_over_2"] for r in entry["runs"] if r["class"] == "catapult"]
        rows.append([name, entry["lam0"], _bound(b["catapult_from"]), _bound(b["divergent_from"]),
                     ", ".join(f"{c} {n}" for c, n in b["counts"].items()),
                     f"{min(lazy):.3f}–{max(lazy):.3f}" if lazy else "n/a",
                     f"{max(cat):.3f}" if cat else "n/a"])
    run_rows = [[name, r["units"], r["class"], r["loss_max"], r["loss_final"], r["lam_final_over_lam0"]]
                for name, entry in models.items() for r in entry["runs"]]
    return [
        Heading("Study: catapult phases of plain GD", 1),
        Paragraph(f"uv model (width {cfg.uv_width}, one point, {cfg.uv_steps} steps, float64) and an EOC ReLU NuMLP "
                  f"(depth {cfg.mlp_depth}, constant width {cfg.mlp_width}, NTK readout, {cfg.n_train} digits, targets "
                  f"±1, {cfg.mlp_steps} steps), plain full-batch GD on (1/2n)·Σ(f − y)². η is in units of 2/λ₀ "
                  "(λ₀: the top eigenvalue of the empirical NTK at init, exact Jacobian). "
                  f"{env['wall_time_s']:.0f} s on {env['device']} with {env['torch_threads']} torch thread(s)."),
        Paragraph(f"Classes: divergent = a loss non-finite or above {DIVERGE:g}·L₀; lazy = converged (final loss < "
                  f"{CONVERGED:g}·L₀) with the loss never rising above its running minimum by more than {SPIKE:g}·L₀ "
                  f"and |λ_final/λ₀ − 1| ≤ {LAZY_LAMBDA:g}; catapult = converged after such a rise with λ_final < "
                  f"{1 - LAMBDA_DROP:g}·λ₀; other = the rest (e.g. λ fell by more than {LAZY_LAMBDA:.0%} without a "
                  "rise of the loss). "
                  "Theory for the uv model (large width): catapult from 1, divergence from 2 (η_max = 4/λ₀)."),
        Heading("Phase boundaries (units of 2/λ₀)"),
        Paragraph("A boundary is given as the grid interval that contains it. 'λ_final/λ₀ (lazy)' is the range "
                  "over lazy runs; 'max η·λ_final/2 (catapult)' < 1 means every catapult ended below the "
                  "stability edge λ = 2/η."),
        Table(["model", "λ₀", "catapult from", "divergent from", "counts", "λ_final/λ₀ (lazy)",
               "max η·λ_final/2 (catapult)"], rows),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
        Heading("Every run"),
        Table(["model", "η·λ₀/2", "class", "max loss", "final loss", "λ_final/λ₀"], run_rows),
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line: the boundaries per model."""
    parts = []
    for name, entry in results["models"].items():
        b = entry["boundaries"]
        parts.append(f"{name}: catapult {_bound(b['catapult_from'])}, divergent {_bound(b['divergent_from'])}")
    return "; ".join(parts)
