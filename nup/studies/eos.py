"""Edge of stability (Cohen et al. 2021): sharpness against 2/η under full-batch gradient descent.

An EOC NuMLP (constant widths, NTK readout) is trained by plain full-batch GD ``θ ← θ − η∇L``
on ``L = (1/2n)·Σ‖f(x_i) − onehot(y_i)‖²`` over a fixed subset of the digits, for a few
``η = fraction·2/S₀`` (``S₀``: the sharpness at init, so every ``2/η`` starts above it). The
sharpness ``S = λ_max(H)`` is measured every ``every`` steps. A run *reaches* the edge when
``S ≥ REACH·2/η``. Its state at the end:

- ``eos``: S crossed 2/η, and from the step it reached the edge on, the mean of ``S·η/2`` lies
  within ``1 ± HOVER`` (progressive sharpening, then edge of stability);
- ``sharpening``: S rose by more than ``SHARPEN`` (relative) from its lowest value, but never
  crossed 2/η;
- ``flat``: neither.
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
    half_mse,
    plain_forward,
    prepare_out,
    save_figure,
    write_outputs,
)

REACH = 0.95
HOVER = 0.1
SHARPEN = 0.2
KEEP = 500  # loss values kept per stored trajectory

FLAGS = (
    Flag("eta_fractions", "floats", "η values as fractions of 2/S₀ (comma-separated)"),
    Flag("width", "int", "constant hidden width of the model"),
)


@dataclass
class Config:
    """The study's settings."""

    eta_fractions: tuple[float, ...] = (0.4, 0.6, 0.8)
    depth: int = 6
    width: int = 64
    activation: str = "tanh"
    steps: int = 4000
    every: int = 20
    n_train: int = 512
    seed: int = 0
    device: str = "cpu"


QUICK = {"eta_fractions": (0.8,), "depth": 3, "width": 16, "steps": 30, "every": 10, "n_train": 64}


def _sharpness(model, batch) -> float:
    from nup.diagnostics import sharpness

    return sharpness(model, lambda m, b: half_mse(plain_forward(m, b[0]), b[1]), batch)


def edge_summary(steps: list[int], sharp: list[float], eta: float) -> dict[str, Any]:
    """When ``S`` first reached ``REACH·2/η``, ``S·η/2`` after that (mean, std), its max, and the state."""
    ratio = np.asarray(sharp, dtype=np.float64) * eta / 2.0
    hit = np.flatnonzero(ratio >= REACH)
    crossed = bool(ratio.max() >= 1.0)
    sharpening = bool(ratio[-1] > (1.0 + SHARPEN) * ratio.min())
    out = {"reached_at": None, "ratio_mean_after": None, "ratio_std_after": None,
           "ratio_max": float(ratio.max()), "ratio_final": float(ratio[-1])}
    if hit.size:
        after = ratio[hit[0]:]
        out.update(reached_at=steps[hit[0]], ratio_mean_after=float(after.mean()), ratio_std_after=float(after.std()))
    at_edge = crossed and out["ratio_mean_after"] is not None and abs(out["ratio_mean_after"] - 1.0) <= HOVER
    out["state"] = "eos" if at_edge else "sharpening" if sharpening else "flat"
    return out


def train_one(cfg: Config, fraction: float, s0: float, state: dict, batch, bar) -> dict[str, Any]:
    """Plain GD at ``η = fraction·2/S₀`` from the shared init ``state``."""
    from nup import NuMLP

    x, y = batch
    model = NuMLP(x.shape[1], y.shape[1], cfg.depth, cfg.width, width_schedule="constant",
                  activation=cfg.activation, readout="ntk").to(x.device)
    model.load_state_dict(state)
    params = list(model.parameters())
    eta = fraction * 2.0 / s0
    losses, m_steps, sharp = [], [], []
    for t in range(cfg.steps + 1):
        if t % cfg.every == 0 or t == cfg.steps:
            m_steps.append(t)
            sharp.append(_sharpness(model, batch))
        loss = half_mse(model(x), y)
        losses.append(float(f"{loss.item():.6g}"))
        if t == cfg.steps or not math.isfinite(losses[-1]):
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-eta)
        bar.update()
    arr = np.asarray(losses)
    ups = int(np.sum(np.diff(arr) > 0))
    return {"fraction": fraction, "eta": eta, "two_over_eta": 2.0 / eta, "loss": [finite_or_none(v) for v in losses],
            "m_step": m_steps, "sharpness": sharp, "loss_increases": ups, "final_loss": finite_or_none(losses[-1]),
            **edge_summary(m_steps, sharp, eta)}


def _plot(cfg: Config, runs: list[dict], s0: float, out: Path) -> str:
    fig = figure(11.0, 4.0)
    ax_s, ax_l = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        c = f"C{i}"
        ax_s.plot(r["m_step"], r["sharpness"], "-", color=c, lw=1.2, label=f"η = {r['eta']:.3g}")
        ax_s.axhline(r["two_over_eta"], color=c, ls="--", lw=0.8)
        pts = [(t, v) for t, v in enumerate(r["loss"]) if v is not None and v > 0]
        ax_l.plot(*zip(*pts), color=c, lw=0.8, label=f"η = {r['eta']:.3g}")
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("sharpness λ_max(H)")
    ax_s.set_title(f"sharpness (dashed: 2/η; S₀ = {s0:.3g})", fontsize="medium")
    ax_s.legend(fontsize="small")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("train loss")
    ax_l.set_title("loss (full batch)", fontsize="medium")
    fig.suptitle(f"edge of stability: plain GD, {cfg.activation} MLP, depth {cfg.depth}, width {cfg.width}, "
                 f"{cfg.n_train} digits, MSE")
    return save_figure(fig, out / "eos.png")


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup import NuMLP
    from nup.data import load_digits_split

    if not cfg.eta_fractions or min(cfg.eta_fractions) <= 0:
        raise ValueError(f"eta_fractions must be positive, got {cfg.eta_fractions}")
    if min(cfg.depth - 1, cfg.width, cfg.steps, cfg.every, cfg.n_train) < 1:
        raise ValueError("depth must be >= 2 and width, steps, every, n_train >= 1")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    batch = (x_all[: cfg.n_train], F.one_hot(y_all[: cfg.n_train], 10).float())
    torch.manual_seed(cfg.seed)
    model = NuMLP(64, 10, cfg.depth, cfg.width, width_schedule="constant", activation=cfg.activation,
                  readout="ntk").to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    s0 = _sharpness(model, batch)
    runs = []
    with tqdm(total=cfg.steps * len(cfg.eta_fractions), desc="eos", unit="step",
              disable=None if progress else True, leave=False) as bar:
        for fraction in cfg.eta_fractions:
            bar.set_postfix_str(f"η = {fraction:g}·2/S₀", refresh=False)
            runs.append(train_one(cfg, fraction, s0, state, batch, bar))
    figures = [_plot(cfg, runs, s0, out)]
    for r in runs:  # store at most KEEP loss values per run (the plot used all of them)
        keep = -(-len(r["loss"]) // KEEP)
        r["loss_step"], r["loss"] = list(range(0, len(r["loss"]), keep)), r["loss"][::keep]
    env = environment(device, time.perf_counter() - start)
    results = {"study": "eos", "config": config_dict(cfg), "rules": {"reach": REACH, "hover": HOVER},
               "sharpness0": s0, "runs": runs, "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, runs, s0, env, figures))
    return results


def _readme(cfg: Config, runs: list[dict], s0: float, env: dict, figures: list[str]) -> list:
    rows = [[r["eta"], r["two_over_eta"], r["ratio_max"], r["reached_at"], r["ratio_mean_after"],
             r["ratio_std_after"], r["state"], r["loss_increases"], r["final_loss"]] for r in runs]
    return [
        Heading("Study: edge of stability under full-batch GD", 1),
        Paragraph(f"EOC NuMLP ({cfg.activation}, depth {cfg.depth}, constant width {cfg.width}, NTK readout) "
                  f"trained by plain full-batch GD for {cfg.steps} steps on {cfg.n_train} digits, "
                  "loss (1/2n)·Σ‖f − onehot(y)‖². "
                  f"Sharpness at init S₀ = {s0:.4g}; η = fraction·2/S₀ for fractions "
                  f"{', '.join(f'{f:g}' for f in cfg.eta_fractions)}; sharpness every {cfg.every} steps. "
                  f"{env['wall_time_s']:.0f} s on {env['device']} with {env['torch_threads']} torch thread(s)."),
        Paragraph(f"reached at = the first measured step with S ≥ {REACH}·2/η; after it, the mean and std of S·η/2. "
                  f"state: eos = S crossed 2/η and that mean is within 1 ± {HOVER}; sharpening = S rose by more "
                  f"than {SHARPEN:.0%} from its minimum without crossing 2/η; flat = neither. loss increases = steps "
                  "at which the full-batch loss went up."),
        Table(["η", "2/η", "max S·η/2", "reached at", "mean S·η/2 after", "std", "state", "loss increases",
               "final loss"], rows),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line per η: when S reached 2/η and where it stayed."""
    def line(r: dict) -> str:
        if r["reached_at"] is None:
            return f"η={r['eta']:.3g}: {r['state']}, max S·η/2 {fmt(r['ratio_max'])}"
        return (f"η={r['eta']:.3g}: {r['state']}, S ≥ {REACH}·2/η from step {r['reached_at']}, "
                f"then mean S·η/2 {fmt(r['ratio_mean_after'])}")

    return "; ".join(line(r) for r in results["runs"])
