"""Constant lr vs the geometry-aware schedule vs warm-up + cosine decay on one νP model (SPEC §4).

The same NuMLP (νP widths, ReLU, EOC) and the same base lr are trained with NuP by full-batch
gradient descent on a fixed subset of the digits (cross-entropy), once per schedule. Every step
records the loss, the global cosine ``c̄_t`` and the lr multiplier ``λ_t``; every ``every``
steps, before the step, two curvatures are measured by Lanczos on Hessian-vector products:

- the sharpness ``S = λ_max(H)``;
- the effective sharpness ``S_eff = λ_max(D^½ H D^½)``, where ``D = diag(α_P)`` holds the step's
  per-tensor learning rates ``α_P = η_t·s_P/‖∇_P L‖`` (a NuP step is GD preconditioned by D).
  ``S_eff > 2`` is the edge of stability of that step, the analogue of ``η·S > 2`` for plain GD.

A control run, ``constant_matched``, uses a constant lr equal to the geometry-aware run's mean
effective lr, to separate the schedule's effect from that of a larger average lr.

Catapult phase (operational definition): the measurement intervals ``[t, t + every)`` that start
beyond the edge (``S_eff(t) > 2``) and over which the sharpness falls by at least
``FALL`` (``S(t + every) < (1 − FALL)·S(t)``): the unstable step is carrying the model to
flatter regions, which is what a catapult does. Its duration is ``every`` × the number of such
intervals; its span runs from the first to the end of the last one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nup.report import Figure, Heading, Paragraph, Table
from nup.studies._common import (
    Flag,
    config_dict,
    environment,
    figure,
    finite_or_none,
    fmt,
    plain_forward,
    prepare_out,
    save_figure,
    write_outputs,
)

FALL = 0.05
EDGE = 2.0
SCHEDULE_NAMES = ("constant", "geometry", "warmup_cosine")

FLAGS = (
    Flag("schedules", "strs", "schedules to compare (constant, geometry, geometry_per_layer, warmup, warmup_cosine)"),
    Flag("lr", "float", "base lr η (multiplied by each schedule's λ_t)"),
    Flag("depth", "int", "depth L of the model"),
    Flag("every", "int", "measure the sharpness every this many steps"),
    Flag("warmup_fraction", "float", "warm-up length of warmup schedules, as a fraction of the steps"),
    Flag("matched_control", "bool", "also run constant lr at the geometry run's mean effective lr (yes/no)"),
)


@dataclass
class Config:
    """The study's settings."""

    schedules: tuple[str, ...] = SCHEDULE_NAMES
    depth: int = 8
    m: int = 8
    lr: float = 0.05
    steps: int = 300
    every: int = 10
    n_train: int = 512
    warmup_fraction: float = 0.1
    matched_control: bool = True
    activation: str = "relu"
    seed: int = 0
    device: str = "cpu"


QUICK = {"depth": 4, "m": 2, "steps": 20, "every": 5, "n_train": 32}


class _Preconditioned(nn.Module):
    """Parameters ``δ`` (zeros) such that ``θ = θ_model + D^½ δ``: the Hessian in δ at 0 is ``D^½ H D^½``."""

    def __init__(self, model: nn.Module, alphas: list[float]) -> None:
        super().__init__()
        self.model = [model]  # a list, so the model's parameters are not ours
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.roots = [math.sqrt(a) for a in alphas]
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for _, p in named])

    def shifted(self) -> dict[str, torch.Tensor]:
        params = dict(self.model[0].named_parameters())
        return {n: params[n].detach() + r * d for n, r, d in zip(self.names, self.roots, self.delta)}


def step_lrs(model: nn.Module, opt) -> list[float]:
    """``α_P``: the learning rate the next NuP step applies to each tensor's gradient (needs ``.grad``)."""
    params = list(model.parameters())
    mult = opt.schedule.multiplier(len(params), params[0].device).tolist()
    lr = opt.param_groups[0]["lr"]
    out = []
    for p, mu in zip(params, mult):
        meta = getattr(p, "_nup_meta", None)
        g = float(p.grad.norm())
        out.append(lr * mu * meta.scale / g if meta is not None and g > 0 else lr * mu)
    return out


def curvatures(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], alphas: list[float]) -> tuple[float, float]:
    """``(S, S_eff)``: the loss Hessian's top eigenvalue, and that of ``D^½ H D^½`` with ``D = diag(α_P)``."""
    from nup.diagnostics import sharpness

    x, y = batch
    s = sharpness(model, lambda m, b: F.cross_entropy(plain_forward(m, b[0]), b[1]), batch)
    pre = _Preconditioned(model, alphas)
    s_eff = sharpness(pre, lambda w, b: F.cross_entropy(plain_forward(model, x, w.shifted()), y), batch)
    return s, s_eff


def catapult_phase(steps: list[int], sharp: list[float], sharp_eff: list[float], every: int) -> dict[str, Any]:
    """The catapult intervals of one run (module docstring): their starts, total steps and span."""
    starts = [steps[i] for i in range(len(steps) - 1)
              if sharp_eff[i] > EDGE and sharp[i + 1] < (1.0 - FALL) * sharp[i]]
    return {"interval_starts": starts, "steps": every * len(starts),
            "first": starts[0] if starts else None, "last_end": starts[-1] + every if starts else None,
            "beyond_edge_steps": every * sum(v > EDGE for v in sharp_eff[:-1])}


def train_one(cfg: Config, schedule: str, batch, bar, lr: float | None = None) -> dict[str, Any]:
    """Full-batch NuP training under ``schedule`` (base lr ``lr``, default ``cfg.lr``); the records."""
    from nup import NuMLP, NuP, make_schedule

    x, y = batch
    lr = cfg.lr if lr is None else lr
    torch.manual_seed(cfg.seed)
    model = NuMLP(x.shape[1], int(y.max()) + 1, cfg.depth, cfg.m, activation=cfg.activation).to(x.device)
    warmup = int(cfg.warmup_fraction * cfg.steps) if schedule.startswith("warmup") else 0
    opt = NuP(model.named_parameters(), lr=lr, schedule=make_schedule(schedule, total_steps=cfg.steps, warmup=warmup))
    rec: dict[str, list] = {k: [] for k in ("loss", "cos", "lr_mult", "m_step", "sharpness", "sharpness_eff")}
    n_tensors = len(list(model.parameters()))
    for t in range(cfg.steps + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t % cfg.every == 0 or t == cfg.steps:
            s, s_eff = curvatures(model, (x, y), step_lrs(model, opt))
            rec["m_step"].append(t)
            rec["sharpness"].append(s)
            rec["sharpness_eff"].append(s_eff)
        if t == cfg.steps:
            rec["final_loss"] = loss.item()
            break
        lam = opt.schedule.multiplier(n_tensors, x.device).mean()
        opt.step()
        v = opt.stat_vectors()
        vals = torch.stack([loss.detach(), v["cos_mean"], lam]).tolist()
        for key, val in zip(("loss", "cos", "lr_mult"), vals):
            rec[key].append(float(f"{val:.6g}"))
        bar.update()
    phase = catapult_phase(rec["m_step"], rec["sharpness"], rec["sharpness_eff"], cfg.every)
    return {"schedule": schedule, "lr": lr, "warmup": warmup, "phase": phase,
            "final_loss": finite_or_none(rec.pop("final_loss")), "min_sharpness": min(rec["sharpness"]),
            "max_sharpness": max(rec["sharpness"]), **rec}


def _plot(cfg: Config, runs: dict[str, dict], out: Path) -> str:
    fig = figure(13.0, 7.0)
    axes = fig.subplots(2, 3).ravel()
    steps = list(range(cfg.steps))
    for i, (name, r) in enumerate(runs.items()):
        c = f"C{i}"
        axes[0].plot(steps, r["loss"], color=c, lw=1, label=name)
        axes[1].plot(r["m_step"], r["sharpness"], "o-", color=c, ms=2, lw=1)
        axes[2].plot(r["m_step"], r["sharpness_eff"], "o-", color=c, ms=2, lw=1)
        axes[3].plot(steps, r["cos"], color=c, lw=0.8)
        axes[4].plot(steps, [r["lr"] * v for v in r["lr_mult"]], color=c, lw=1)
        for start in r["phase"]["interval_starts"]:
            axes[5].plot([start, start + cfg.every], [i, i], color=c, lw=6, solid_capstyle="butt")
    axes[2].axhline(EDGE, color="k", ls=":", lw=0.8)
    titles = ("train loss (full batch)", "sharpness S = λ_max(H)", "effective sharpness S_eff (edge: 2)",
              "global cos(ΔP_t, C_t)", "effective lr η_t = base lr·λ_t", "catapult phase")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
    for ax in (axes[0], axes[1], axes[2], axes[4]):
        ax.set_yscale("log")
    axes[5].set_yticks(range(len(runs)), list(runs))
    axes[5].set_ylim(-0.5, len(runs) - 0.5)
    axes[5].set_xlim(0, cfg.steps)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"schedules on a νP MLP (depth {cfg.depth}, m {cfg.m}, {cfg.n_train} digits, full batch)")
    return save_figure(fig, out / "schedules.png")


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup.data import load_digits_split

    if min(cfg.depth - 2, cfg.m, cfg.steps, cfg.every, cfg.n_train) < 1:
        raise ValueError("depth must be >= 3 and m, steps, every, n_train >= 1")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    batch = (x_all[: cfg.n_train], y_all[: cfg.n_train])
    runs = {}
    with tqdm(total=cfg.steps * len(cfg.schedules), desc="schedule", unit="step",
              disable=None if progress else True, leave=False) as bar:
        for name in cfg.schedules:
            bar.set_postfix_str(name, refresh=False)
            runs[name] = train_one(cfg, name, batch, bar)
        if cfg.matched_control and "geometry" in runs:
            bar.total += cfg.steps
            mean_mult = sum(runs["geometry"]["lr_mult"]) / cfg.steps
            bar.set_postfix_str("constant_matched", refresh=False)
            runs["constant_matched"] = train_one(cfg, "constant", batch, bar, lr=cfg.lr * mean_mult)
    figures = [_plot(cfg, runs, out)]
    env = environment(device, time.perf_counter() - start)
    results = {"study": "schedule", "config": config_dict(cfg), "definition": {"edge": EDGE, "fall": FALL},
               "runs": runs, "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, runs, env, figures))
    return results


def _readme(cfg: Config, runs: dict, env: dict, figures: list[str]) -> list:
    rows = []
    for name, r in runs.items():
        p = r["phase"]
        span = f"{p['first']}–{p['last_end']}" if p["first"] is not None else "none"
        rows.append([name, r["lr"], p["steps"], span, p["beyond_edge_steps"], r["final_loss"], r["max_sharpness"],
                     r["sharpness"][-1], max(r["lr_mult"])])
    return [
        Heading("Study: lr schedules and the catapult phase", 1),
        Paragraph(f"One νP NuMLP (depth {cfg.depth}, widths m·k² with m = {cfg.m}, {cfg.activation}) trained by NuP "
                  f"with base lr {cfg.lr} for {cfg.steps} full-batch steps on {cfg.n_train} digits (cross-entropy), "
                  f"under each schedule (warm-up: {cfg.warmup_fraction:.0%} of the steps). Sharpness measured every "
                  f"{cfg.every} steps. constant_matched: constant lr at the geometry run's mean effective lr. "
                  f"{env['wall_time_s']:.0f} s on {env['device']} with {env['torch_threads']} torch "
                  "thread(s)."),
        Paragraph("S = λ_max(H) of the loss; S_eff = λ_max(D^½HD^½) with D the per-tensor learning rates "
                  "α_P = η_t·s_P/‖∇_P L‖ of the NuP step, so S_eff > 2 is the edge of stability of the actual step. "
                  f"Catapult phase: the {cfg.every}-step intervals that start with S_eff > {EDGE:g} and over which S "
                  f"falls by at least {FALL:.0%}."),
        Table(["schedule", "base lr", "catapult steps", "span", "steps with S_eff > 2", "final loss", "max S",
               "final S", "max λ"], rows),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line: catapult steps and final loss per schedule."""
    return "; ".join(f"{n}: catapult {r['phase']['steps']} steps, final loss {fmt(r['final_loss'])}"
                     for n, r in results["runs"].items())
