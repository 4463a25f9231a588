"""Do geometry-aware schedules prolong the catapult? MSE, full batch, seeds and fair controls (SPEC §4, §5).

One νP NuMLP (ReLU, EOC) is trained by NuP with full-batch steps on ``n_train`` digits under
``L = (1/2n)·Σ‖f(x_i) − onehot(y_i)‖²``, once per seed and arm:

- the controllers in ``schedules`` (``geometry``: the random-walk test; ``geometry_cosine``: SPEC's
  original; ``geometry_sharpness``: fed the measured ``η·S`` below at every measurement, holding it
  at ``sharpness_target``, by default 3: inside Lewkowycz et al.'s catapult window 2–4);
- ``constant_x{f}``: constant lr ``f·lr`` for every factor of ``const_factors``; the *tuned*
  constant is the factor with the lowest mean final loss over the seeds;
- ``replay``: a geometry run's ``λ_t`` played open loop, that of the next seed (cyclically): full
  batch is deterministic, so the same seed's replay would repeat its run exactly;
- ``warmup_cosine``: linear warm-up over ``warmup_fraction`` of the steps to the geometry run's
  peak ``λ``, then cosine decay to 0.

A NuP step is gradient descent preconditioned by ``D = diag(α_P)``, ``α_P = η_t·s_P/‖∇_P L‖``, so
the step's own edge quantities are those of ``D``: every ``every`` steps, before the step,

- ``η·S = λ_max(D^½ H D^½)`` (Lanczos on Hessian-vector products; 2 is the edge of stability);
- ``η·λ₀ = λ_max(J D Jᵀ)/n`` (``J``: the Jacobian of the outputs; 2 is Lewkowycz et al.'s lazy /
  catapult boundary) and the plain NTK eigenvalue ``λ₀ = λ_max(J Jᵀ)/n``.

**Catapult** (Lewkowycz et al. 2020): a loss spike that ends with a drop of ``λ₀``, with η above
``2/λ₀``. Operationally an *episode* starts at the first step whose loss exceeds ``(1 + SPIKE)`` ×
its running minimum and ends at the first later step whose loss is back at or below that minimum
(or at the end of training). It counts when it lasts at least ``MIN_LENGTH`` steps (so a
period-2 flip-flop at the edge of stability is not a catapult), ``η·λ₀ > 2`` at some measurement from the last one
before its start to the first one after its end, and ``λ₀`` at the first measurement after its
end is below ``(1 − DROP)`` × ``λ₀`` at the last one before its start. The catapult duration of a
run is the total length of its counted episodes. Confidence intervals are Student-t 95% over
seeds (paired over seeds for differences).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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

SPIKE = 0.2
MIN_LENGTH = 2
DROP = 0.05
EDGE = 2.0
CONTROLLERS = ("geometry", "geometry_cosine", "geometry_sharpness")

FLAGS = (
    Flag("schedules", "strs", "controllers to compare (geometry, geometry_per_layer, geometry_cosine, "
                              "geometry_cosine_per_layer, geometry_sharpness)"),
    Flag("lr", "float", "base lr η (multiplied by each schedule's λ_t)"),
    Flag("depth", "int", "depth L of the model"),
    Flag("every", "int", "measure the sharpness every this many steps"),
    Flag("warmup_fraction", "float", "warm-up length of warmup schedules, as a fraction of the steps"),
    Flag("seeds", "int", "number of seeds (initializations): seed, seed + 1, ..."),
    Flag("const_factors", "floats", "the constant-lr sweep: factors of --lr"),
    Flag("sharpness_target", "float", "geometry_sharpness: the η·S it holds (2: the edge; 2–4: Lewkowycz's "
                                      "catapult window)"),
)


@dataclass
class Config:
    """The study's settings."""

    schedules: tuple[str, ...] = CONTROLLERS
    depth: int = 4
    m: int = 8
    lr: float = 0.25
    steps: int = 200
    every: int = 4
    n_train: int = 64
    seeds: int = 4
    const_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    sharpness_target: float = 3.0
    warmup_fraction: float = 0.1
    activation: str = "relu"
    seed: int = 0
    device: str = "cpu"


QUICK = {"depth": 3, "m": 2, "steps": 16, "every": 4, "n_train": 8, "seeds": 2, "const_factors": (0.5, 4.0)}


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


def effective_sharpness(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], alphas: list[float]) -> float:
    """``λ_max(D^½ H D^½)`` of the MSE loss, ``D = diag(α_P)``: ``η·S`` of the actual step (edge: 2)."""
    from nup.diagnostics import sharpness

    x, target = batch
    pre = _Preconditioned(model, alphas)
    return sharpness(pre, lambda w, b: half_mse(plain_forward(model, x, w.shifted()), target), batch)


def ntk_eigenvalues(model: nn.Module, x: torch.Tensor, alphas: list[float]) -> tuple[float, float]:
    """``(λ₀, η·λ₀)``: ``λ_max(J Jᵀ)/n`` and ``λ_max(J D Jᵀ)/n`` with ``J`` the ``(n·k, P)`` output Jacobian."""
    from torch.func import jacrev, vmap

    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: plain_forward(model, xi[None], p)[0]), in_dims=(None, 0))(params, x)
    n = x.shape[0]
    cols = [jac[name].reshape(n * jac[name].shape[1], -1) for name in names]
    j = torch.cat(cols, dim=1).double()
    scale = torch.cat([torch.full((c.shape[1],), math.sqrt(a), dtype=torch.float64) for c, a in zip(cols, alphas)])
    jd = j * scale.to(j.device)
    top = [float(torch.linalg.eigvalsh(m @ m.T)[-1]) / n for m in (j, jd)]
    return top[0], top[1]


def catapults(loss: list[float], m_step: list[int], lam0: list[float], eta_lam0: list[float]) -> dict[str, Any]:
    """The catapult episodes of one run (module docstring): each ``[start, end)``, and their total length."""
    episodes, counted = [], []
    t, best = 1, loss[0]
    while t < len(loss):
        if loss[t] > (1.0 + SPIKE) * best:
            end = next((s for s in range(t + 1, len(loss)) if loss[s] <= best), len(loss))
            before = max(i for i, s in enumerate(m_step) if s <= t)
            after = next((i for i, s in enumerate(m_step) if s >= end), len(m_step) - 1)
            beyond = max(eta_lam0[before:after + 1]) > EDGE
            dropped = lam0[after] < (1.0 - DROP) * lam0[before]
            episodes.append([t, end])
            if beyond and dropped and end - t >= MIN_LENGTH:
                counted.append([t, end])
            t = end
            continue
        best = min(best, loss[t])
        t += 1
    return {"episodes": episodes, "catapults": counted, "steps": sum(e - s for s, e in counted)}


def train_one(cfg: Config, arm: str, schedule, seed: int, batch, bar, lr: float) -> dict[str, Any]:
    """Full-batch NuP training of the seed's model under ``schedule``; the records of arm ``arm``."""
    from nup import NuMLP, NuP, SharpnessTargetLR

    x, target = batch
    torch.manual_seed(seed)
    model = NuMLP(x.shape[1], target.shape[1], cfg.depth, cfg.m, activation=cfg.activation).to(x.device)
    opt = NuP(model.named_parameters(), lr=lr, schedule=schedule)
    rec: dict[str, list] = {k: [] for k in ("loss", "lr_mult", "m_step", "eta_sharpness", "lam0", "eta_lam0")}
    n_tensors = len(list(model.parameters()))
    for t in range(cfg.steps + 1):
        loss = half_mse(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t % cfg.every == 0 or t == cfg.steps:
            alphas = step_lrs(model, opt)
            s_eff = effective_sharpness(model, batch, alphas)
            lam0, eta_lam0 = ntk_eigenvalues(model, x, alphas)
            for key, val in zip(("m_step", "eta_sharpness", "lam0", "eta_lam0"), (t, s_eff, lam0, eta_lam0)):
                rec[key].append(float(f"{val:.6g}"))
            if isinstance(schedule, SharpnessTargetLR) and t < cfg.steps:
                schedule.observe(s_eff)
        rec["loss"].append(float(f"{loss.item():.6g}"))
        if t == cfg.steps or not math.isfinite(rec["loss"][-1]):
            break
        rec["lr_mult"].append(float(f"{opt.schedule.multiplier(n_tensors, x.device).mean().item():.6g}"))
        opt.step()
        bar.update()
    phase = catapults(rec["loss"], rec["m_step"], rec["lam0"], rec["eta_lam0"])
    return {"arm": arm, "seed": seed, "lr": lr, "catapult": phase, "final_loss": finite_or_none(rec["loss"][-1]),
            **rec}


def mean_ci(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the Student-t 95% half-width over ``values`` (None with fewer than two)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "ci95": half, "n": int(len(v))}


def _digits_mse(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from nup.data import load_digits_split

    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    x, y = x_all[: cfg.n_train], y_all[: cfg.n_train]
    return x, torch.nn.functional.one_hot(y, 10).to(x.dtype)


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup import ReplaySchedule, WarmupCosineSchedule, make_schedule

    if min(cfg.depth - 2, cfg.m, cfg.steps, cfg.every, cfg.n_train, cfg.seeds) < 1 or not cfg.const_factors:
        raise ValueError("depth must be >= 3, m, steps, every, n_train and seeds >= 1, const_factors non-empty")
    if "geometry" not in cfg.schedules:
        raise ValueError("the controls replay and warm up to the geometry run: keep geometry in --schedules")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    batch = _digits_mse(cfg, device)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    arms_per_seed = len(cfg.schedules) + len(cfg.const_factors) + 2
    runs: dict[str, list[dict]] = {}
    with tqdm(total=cfg.steps * arms_per_seed * len(seeds), desc="schedule", unit="step",
              disable=None if progress else True, leave=False) as bar:
        def one(arm, schedule, seed, lr=cfg.lr):
            bar.set_postfix_str(f"{arm} seed {seed}", refresh=False)
            runs.setdefault(arm, []).append(train_one(cfg, arm, schedule, seed, batch, bar, lr))

        for seed in seeds:
            for name in cfg.schedules:
                kwargs = {"target": cfg.sharpness_target} if name == "geometry_sharpness" else {}
                one(name, make_schedule(name, **kwargs), seed)
        for i, seed in enumerate(seeds):
            geo = runs["geometry"][i]["lr_mult"]
            # full batch is deterministic: the same seed's replay would repeat the run exactly
            one("replay", ReplaySchedule(runs["geometry"][(i + 1) % len(seeds)]["lr_mult"]), seed)
            one("warmup_cosine", WarmupCosineSchedule(cfg.steps, warmup=warmup, peak=max(geo)), seed)
            for f in cfg.const_factors:
                one(f"constant_x{f:g}", make_schedule("constant"), seed, lr=cfg.lr * f)
    summary = _summarize(cfg, runs)
    figures = [_plot(cfg, runs, summary, out)]
    env = environment(device, time.perf_counter() - start)
    definition = {"spike": SPIKE, "min_length": MIN_LENGTH, "drop": DROP, "edge": EDGE}
    results = {"study": "schedule", "config": config_dict(cfg), "definition": definition, "summary": summary,
               "runs": runs, "figures": figures, "environment": env}
    write_outputs(out, results, _readme(cfg, summary, env, figures))
    return results


def _summarize(cfg: Config, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Per arm: catapult steps and final loss (mean, CI); the tuned constant; paired differences."""
    per_arm = {arm: {"catapult_steps": mean_ci([r["catapult"]["steps"] for r in rs]),
                     "final_loss": mean_ci([r["final_loss"] for r in rs]),
                     "log10_final_loss": mean_ci([math.log10(r["final_loss"]) if r["final_loss"] else None
                                                  for r in rs]),
                     "peak_lr_mult": max(max(r["lr_mult"]) for r in rs)}
               for arm, rs in runs.items()}
    constants = [a for a in runs if a.startswith("constant_x")]
    tuned = min(constants, key=lambda a: per_arm[a]["log10_final_loss"]["mean"] or math.inf)
    paired = {}
    for other in ("replay", "warmup_cosine", tuned):
        diffs = [g["catapult"]["steps"] - o["catapult"]["steps"] for g, o in zip(runs["geometry"], runs[other])]
        paired[f"geometry - {other}"] = mean_ci(diffs)
    return {"arms": per_arm, "tuned_constant": tuned, "paired_catapult_steps": paired}


def _plot(cfg: Config, runs: dict[str, list[dict]], summary: dict, out: Path) -> str:
    shown = [*cfg.schedules, "replay", "warmup_cosine", summary["tuned_constant"]]
    fig = figure(14.0, 8.0)
    axes = fig.subplots(2, 3).ravel()
    for i, arm in enumerate(shown):
        c = f"C{i}"
        for j, r in enumerate(runs[arm]):
            kw = {"color": c, "lw": 1.0 if j == 0 else 0.6, "alpha": 1.0 if j == 0 else 0.45,
                  "label": arm if j == 0 else None}
            axes[0].plot(range(len(r["loss"])), r["loss"], **kw)
            axes[1].plot(r["m_step"], r["eta_sharpness"], **kw)
            axes[2].plot(r["m_step"], r["eta_lam0"], **kw)
            axes[3].plot(r["m_step"], r["lam0"], **kw)
            axes[4].plot(range(len(r["lr_mult"])), [r["lr"] * v for v in r["lr_mult"]], **kw)
    for ax in (axes[1], axes[2]):
        ax.axhline(EDGE, color="k", ls=":", lw=0.8)
    arms = summary["arms"]
    names = list(arms)
    ys = [arms[a]["catapult_steps"]["mean"] or 0.0 for a in names]
    errs = [arms[a]["catapult_steps"]["ci95"] or 0.0 for a in names]
    colours = [f"C{shown.index(a)}" if a in shown else "0.6" for a in names]
    axes[5].barh(range(len(names)), ys, xerr=errs, color=colours)
    axes[5].set_yticks(range(len(names)), names, fontsize="small")
    titles = ("train loss (full batch, MSE)", "η·S = λ_max(D^½HD^½) (edge 2)", "η·λ₀ = λ_max(JDJᵀ)/n (edge 2)",
              "NTK top eigenvalue λ₀", "effective lr η_t = base lr·λ_t", "catapult steps (mean, 95% CI)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("steps" if ax is axes[5] else "step")
    for ax in axes[:5]:
        ax.set_yscale("log")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"schedules on a νP MLP (depth {cfg.depth}, m {cfg.m}, {cfg.n_train} digits, full batch, "
                 f"{cfg.seeds} seeds; thick: seed {cfg.seed})")
    return save_figure(fig, out / "schedules.png")


def _ci(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    return f"{fmt(entry['mean'])} ± {fmt(entry['ci95'])}" if entry["ci95"] is not None else fmt(entry["mean"])


def _readme(cfg: Config, summary: dict, env: dict, figures: list[str]) -> list:
    arms = summary["arms"]
    rows = [[arm, _ci(a["catapult_steps"]), _ci(a["final_loss"]), _ci(a["log10_final_loss"]), a["peak_lr_mult"]]
            for arm, a in arms.items()]
    paired = [[k, _ci(v)] for k, v in summary["paired_catapult_steps"].items()]
    return [
        Heading("Study: lr schedules and the catapult phase", 1),
        Paragraph(f"One νP NuMLP (depth {cfg.depth}, widths m·k² with m = {cfg.m}, {cfg.activation}) trained by NuP "
                  f"with base lr {cfg.lr} for {cfg.steps} full-batch steps on {cfg.n_train} digits, MSE loss "
                  f"(1/2n)·Σ‖f − onehot(y)‖², {cfg.seeds} seeds (initializations) from {cfg.seed}. Arms: the "
                  f"controllers {', '.join(cfg.schedules)} (geometry_sharpness holds η·S at "
                  f"{cfg.sharpness_target:g}); replay = the next seed's geometry λ_t, open loop; "
                  f"warmup_cosine = {cfg.warmup_fraction:.0%} linear warm-up to the geometry run's peak λ, then "
                  f"cosine decay to 0; constant_x f = constant lr f·{cfg.lr}. Tuned constant (lowest mean log final "
                  f"loss): {summary['tuned_constant']}. Curvatures every {cfg.every} steps. "
                  f"{env['wall_time_s']:.0f} s on {env['device']} with {env['torch_threads']} torch thread(s)."),
        Paragraph(f"η·S = λ_max(D^½HD^½) and η·λ₀ = λ_max(JDJᵀ)/n use D = diag(α_P), α_P = η_t·s_P/‖∇_P L‖, the "
                  "per-tensor rates of the NuP step (a NuP step is GD preconditioned by D); λ₀ = λ_max(JJᵀ)/n. "
                  f"Catapult episode: the loss rises above (1 + {SPIKE:g})× its running minimum and later returns "
                  f"to it; it counts when it lasts ≥ {MIN_LENGTH} steps, η·λ₀ > {EDGE:g} during it and λ₀ falls by "
                  f"more than {DROP:.0%} across it. ± is a Student-t 95% interval over seeds."),
        Table(["arm", "catapult steps", "final loss", "log10 final loss", "peak λ"], rows),
        Heading("Does geometry prolong the catapult? (paired over seeds)"),
        Table(["difference in catapult steps", "mean ± 95% CI"], paired),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line: catapult steps (mean ± CI) and the paired differences."""
    s = results["summary"]
    arms = "; ".join(f"{a}: {_ci(v['catapult_steps'])} catapult steps" for a, v in s["arms"].items()
                     if not a.startswith("constant_x") or a == s["tuned_constant"])
    return f"{arms} (tuned constant: {s['tuned_constant']})"
