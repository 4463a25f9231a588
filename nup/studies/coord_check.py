"""Coordinate check across depth, judged against its prediction (SPEC §5).

For each parameterization (``sp``, ``sp_inv_depth``, νP with offset widths, νP + harmonic), depth L,
lr and seed, a NuMLP takes a few NuP steps on one fixed batch of digits. After t steps:

- **each layer's own move**: ``‖α_k·(W_k(t) − W_k(0))·x_{k−1}(0)‖/‖h_k(0)‖``, the change of ``h_k``
  with the layer's input held at its initial value. SPEC predicts ``t·η·ρ_k`` for a rank-one
  (batch 1) gradient; a batch gradient is spread over more directions and moves less: the ratio is
  the layer's **efficiency**;
- **the change at layer ℓ**, ``‖h_ℓ(t) − h_ℓ(0)‖/‖h_ℓ(0)‖``, at fixed ℓ/L (ℓ = L − 1 and ℓ = ⌈L/2⌉),
  against ``t·η·Σ_{k≤ℓ} ρ_k`` (coherent addition of the own moves): its slope against log L is
  predicted flat only under the harmonic depth normalizer;
- **the output's change split** into the readout's own move ``α_L·ΔW_L·φ(h_{L−1}(0))`` and the
  body's (the output with the new body and the initial readout, minus the initial output).
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

from nup.diagnostics import layer_io, pairwise_cosines
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
from nup.studies.variants import VARIANTS, variant_config

FLAT = 0.15
"""|slope| at or below which a curve counts as flat in depth (a factor ≤ 1.37 over 4 → 32)."""

FLAGS = (
    Flag("steps", "int", "optimizer steps (per run)"),
    Flag("lrs", "floats", "learning rates (comma-separated)"),
)


@dataclass
class Config:
    """The study's settings (uncapped νP widths m·(k + k0)², up to 34² at depth 32)."""

    depths: tuple[int, ...] = (4, 8, 16, 32)
    parameterizations: tuple[str, ...] = ("sp", "sp_inv_depth", "nup", "nup_harmonic")
    steps: int = 4
    lrs: tuple[float, ...] = (0.01, 0.1)
    batch_size: int = 64
    m: int = 1
    width_offset: int = 3
    sp_width: int = 128
    max_width: int | None = None
    activation: str = "relu"
    seeds: int = 2
    seed: int = 0
    device: str = "cpu"


QUICK = {"depths": (3, 5), "steps": 2, "batch_size": 16, "sp_width": 8, "seeds": 1}


def _rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def measure(model, lr: float, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[dict[str, Any]]:
    """One record per step t = 1 … steps: own moves, changes per layer and the output's split."""
    from nup import NuP

    opt = NuP(model.named_parameters(), lr=lr)
    with torch.no_grad():
        x0, h0 = layer_io(model, x)
    w0 = [layer.weight.detach().clone() for layer in model.layers]
    readout = model.layers[-1]
    out = []
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            x_now, h = layer_io(model, x)
            own = [(layer.alpha * (x_in @ (layer.weight - w).T)).norm().item() / h_init.norm().item()
                   for layer, x_in, w, h_init in zip(model.layers[:-1], x0, w0, h0)]
            change = [(a - b).norm().item() / b.norm().item() for a, b in zip(h[:-1], h0[:-1])]
            f_readout = readout.alpha * (x0[-1] @ (readout.weight - w0[-1]).T)
            f_body = readout.alpha * (x_now[-1] @ w0[-1].T) - h0[-1]
        out.append({"own": own, "change": change, "df": _rms(h[-1] - h0[-1]), "df_readout": _rms(f_readout),
                    "df_body": _rms(f_body)})
    return out


def _levels(depth: int) -> dict[str, int]:
    """The layers judged at fixed ℓ/L: the middle and the last hidden layer."""
    return {"mid": math.ceil(depth / 2), "last": depth - 1}


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    from tqdm.auto import tqdm

    from nup import NuMLP
    from nup.data import load_digits_split
    from nup.theory import batch_efficiency_at_init, resolve_effective

    if len(cfg.depths) < 2 or min(cfg.depths) < 3:
        raise ValueError(f"depths needs two or more integers >= 3, got {cfg.depths}")
    if not cfg.lrs or min(cfg.lrs) <= 0:
        raise ValueError(f"lrs must be positive, got {cfg.lrs}")
    for v in cfg.parameterizations:
        if v not in VARIANTS:
            raise ValueError(f"unknown parameterization {v!r}; choose from {', '.join(VARIANTS)}")
    out = prepare_out(out)
    start = time.perf_counter()
    device = torch.device(cfg.device)
    x_all, y_all, _, _ = load_digits_split(seed=0, device=device)
    x, y = x_all[: cfg.batch_size], y_all[: cfg.batch_size]
    cosines = pairwise_cosines(x).cpu().numpy()  # the predicted efficiencies and nup_effective's divisor
    predicted = {d: batch_efficiency_at_init(cosines, d, x.shape[0], cfg.activation) for d in cfg.depths}
    results: dict[str, dict[str, Any]] = {}
    jobs = [(lr, v, d) for lr in cfg.lrs for v in cfg.parameterizations for d in cfg.depths]
    for lr, variant, depth in tqdm(jobs, desc="coord_check", unit="config", disable=None if progress else True,
                                   leave=False):
        m, kwargs = variant_config(variant, cfg.m, cfg.sp_width, cfg.width_offset, cfg.activation, cfg.max_width)
        kwargs = resolve_effective(kwargs, depth, m, cosines, x.shape[0])
        per_seed = []
        for s in range(cfg.seeds):
            torch.manual_seed(cfg.seed + s)
            model = NuMLP(x.shape[1], 10, depth, m, **kwargs).to(device)
            per_seed.append(measure(model, lr, x, y, cfg.steps))
        rho = model.layout.rho
        mean = [{key: np.mean([seed[t][key] for seed in per_seed], axis=0).tolist() for key in per_seed[0][t]}
                for t in range(cfg.steps)]
        results.setdefault(str(lr), {}).setdefault(variant, {})[str(depth)] = {
            "rho": rho, "efficiency_predicted": predicted[depth], "steps": mean}
    judged = {lr: {v: judge(cfg, float(lr), by_depth) for v, by_depth in per_v.items()}
              for lr, per_v in results.items()}
    figures = _plots(cfg, results, judged, out)
    env = environment(device, time.perf_counter() - start)
    out_results = {"study": "coord_check", "config": config_dict(cfg), "flat_threshold": FLAT, "lrs": results,
                   "judged": judged, "figures": figures, "environment": env}
    write_outputs(out, out_results, _readme(cfg, judged, env, figures))
    return out_results


def judge(cfg: Config, lr: float, by_depth: dict[str, Any]) -> dict[str, Any]:
    """Measured against predicted, per depth and as slopes against depth (at t = 1 and t = steps)."""
    depths = [int(d) for d in by_depth]
    out: dict[str, Any] = {"by_depth": {}}
    for d in depths:
        e = by_depth[str(d)]
        rho, first, last = e["rho"], e["steps"][0], e["steps"][-1]
        eff = [own / (lr * r) for own, r in zip(first["own"], rho)]
        predicted = e["efficiency_predicted"]
        row = {"efficiency": eff, "efficiency_median": float(np.median(eff)), "efficiency_predicted": predicted,
               "efficiency_predicted_median": float(np.median(predicted)),
               "efficiency_miss": float(np.max(np.abs(np.subtract(eff, predicted))))}
        for name, ell in _levels(d).items():
            predicted = lr * cfg.steps * sum(rho[:ell])
            row[f"change_{name}"] = last["change"][ell - 1]
            row[f"predicted_{name}"] = predicted
            row[f"predicted_eff_{name}"] = lr * cfg.steps * sum(e * r for e, r in zip(eff[:ell], rho[:ell]))
            row[f"ratio_{name}"] = last["change"][ell - 1] / predicted
            row[f"coherence_{name}"] = first["change"][ell - 1] / sum(first["own"][:ell])
        row.update({k: last[k] for k in ("df", "df_readout", "df_body")})
        out["by_depth"][str(d)] = row
    rows = [out["by_depth"][str(d)] for d in depths]
    for name in ("mid", "last"):
        out[f"slope_{name}"] = finite_or_none(loglog_slope(depths, [r[f"change_{name}"] for r in rows]))
        out[f"predicted_slope_{name}"] = finite_or_none(loglog_slope(depths, [r[f"predicted_{name}"] for r in rows]))
        out[f"predicted_eff_slope_{name}"] = finite_or_none(
            loglog_slope(depths, [r[f"predicted_eff_{name}"] for r in rows]))
    for key in ("df", "df_readout", "df_body", "efficiency_median"):
        out[f"slope_{key}"] = finite_or_none(loglog_slope(depths, [r[key] for r in rows]))
    return out


def _plots(cfg: Config, results: dict, judged: dict, out: Path) -> list[str]:
    lr = str(cfg.lrs[-1])
    params = list(judged[lr])
    fig = figure(4.0 * len(params), 3.4)
    axes = fig.subplots(1, len(params), squeeze=False, sharey=True)[0]
    for ax, variant in zip(axes, params):
        for i, d in enumerate(cfg.depths):
            row = judged[lr][variant]["by_depth"][str(d)]
            ax.plot([k / d for k in range(1, d)], row["efficiency"], "o-", ms=3, color=f"C{i}", label=f"L={d}")
            ax.plot([k / d for k in range(1, d)], row["efficiency_predicted"], ":", color=f"C{i}", lw=1.0)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("ℓ/L")
        ax.set_title(variant)
        ax.set_yscale("log")
    axes[0].set_ylabel("own move / (η·ρ_k), t = 1")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"each layer's own move against SPEC's η·ρ_k (dashed: rank one; dotted: predicted efficiency), "
                 f"lr {lr}, batch {cfg.batch_size}")
    names = [save_figure(fig, out / "coord_check_efficiency.png")]

    fig = figure(12.0, 3.6)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    for i, variant in enumerate(params):
        rows = [judged[lr][variant]["by_depth"][str(d)] for d in cfg.depths]
        for ax, name in zip(axes[:2], ("last", "mid")):
            ax.plot(cfg.depths, [r[f"change_{name}"] for r in rows], "o-", color=f"C{i}", label=variant)
            ax.plot(cfg.depths, [r[f"predicted_{name}"] for r in rows], "--", color=f"C{i}", lw=0.9)
        axes[2].plot(cfg.depths, [r["df_readout"] for r in rows], "s:", color=f"C{i}", label=f"{variant} readout")
        axes[2].plot(cfg.depths, [r["df_body"] for r in rows], "o-", color=f"C{i}", label=f"{variant} body")
    for ax, title in zip(axes, ("RMS(Δh)/RMS(h) at ℓ = L − 1", "RMS(Δh)/RMS(h) at ℓ = ⌈L/2⌉",
                                "RMS(Δf): readout's own move and body's")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_title(f"{title}, t = {cfg.steps}", fontsize="medium")
    axes[0].legend(fontsize="x-small")
    axes[2].legend(fontsize="xx-small")
    fig.suptitle(f"change against depth, lr {lr} (dashed: t·η·Σ_(k≤ℓ) ρ_k, coherent moves at efficiency 1)")
    names.append(save_figure(fig, out / "coord_check_depth.png"))
    return names


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value, 2) + 0.0:+.2f}"


def _readme(cfg: Config, judged: dict, env: dict, figures: list[str]) -> list:
    rows, split = [], []
    big = str(max(cfg.depths))
    for lr, per_v in judged.items():
        for variant, j in per_v.items():
            flat = j["slope_last"] is not None and abs(j["slope_last"]) <= FLAT
            expected = j["predicted_slope_last"] is not None and abs(j["predicted_slope_last"]) <= FLAT
            effs = [j["by_depth"][str(d)]["efficiency_median"] for d in cfg.depths]
            theory = [j["by_depth"][str(d)]["efficiency_predicted_median"] for d in cfg.depths]
            miss = max(j["by_depth"][str(d)]["efficiency_miss"] for d in cfg.depths)
            rows.append([lr, variant, f"{min(effs):.2f}–{max(effs):.2f}", f"{min(theory):.2f}–{max(theory):.2f}",
                         f"{miss:.2f}",
                         fmt(np.median([j["by_depth"][str(d)]["coherence_last"] for d in cfg.depths])),
                         *[_signed(j[k]) for k in ("slope_last", "predicted_slope_last", "predicted_eff_slope_last",
                                                   "slope_mid", "predicted_slope_mid")],
                         fmt(j["by_depth"][big]["ratio_last"]), "yes" if flat else "no", "yes" if expected else "no"])
            b = j["by_depth"][big]
            split.append([lr, variant, fmt(b["df"]), fmt(b["df_readout"]), fmt(b["df_body"]),
                          _signed(j["slope_df_readout"]), _signed(j["slope_df_body"])])
    return [
        Heading("Study: coordinate check across depth", 1),
        Paragraph(f"NuMLP ({cfg.activation}, EOC), {cfg.steps} NuP steps (constant lr "
                  f"{' and '.join(map(str, cfg.lrs))}) on one fixed batch of {cfg.batch_size} digits "
                  "(cross-entropy); depths "
                  f"{', '.join(map(str, cfg.depths))}; νP widths m·(k + k0)², m = {cfg.m}, k0 = {cfg.width_offset}"
                  f"{f', capped at {cfg.max_width}' if cfg.max_width else ' (uncapped)'}; sp and sp_inv_depth width "
                  f"{cfg.sp_width}; {cfg.seeds} seed(s), values are seed means. {env['wall_time_s']:.0f} s on "
                  f"{env['device']} with {env['torch_threads']} torch thread(s)."),
        Paragraph("Judged against SPEC §5's prediction, not against 'flat'. Efficiency: each layer's own move "
                  "(its input held at init) over η·ρ_k at t = 1, median over layers, range over depths (1 = a "
                  "rank-one step; a batch gradient of higher rank moves less), beside its prediction at init, "
                  "e_k² = 1/B + (1 − 1/B)·mean cos² of the layer's inputs by the EOC map "
                  "(nup.theory.batch_efficiency_at_init), and the largest |measured − predicted| over layers and "
                  "depths. Coherence: the change at ℓ = L − 1 "
                  "over the sum of the own moves of layers 1 … ℓ at t = 1 (1 = the moves add coherently), median "
                  f"over depths. Slopes of log RMS(Δh_ℓ)/RMS(h_ℓ) against log L at t = {cfg.steps}, measured and "
                  "predicted (t·η·Σ_{k≤ℓ} ρ_k, and t·η·Σ_{k≤ℓ} e_k·ρ_k with each layer's measured efficiency e_k); "
                  "ratio = measured over predicted at the largest depth. Flat = "
                  f"|slope| ≤ {FLAT}; flat is expected only where the prediction is flat (the harmonic normalizer)."),
        Table(["lr", "parameterization", "efficiency", "predicted efficiency", "largest miss", "coherence",
               "slope ℓ=L−1", "predicted",
               "predicted × efficiency", "slope ℓ=⌈L/2⌉", "predicted", f"ratio at L={big}", "flat", "flat expected"],
              rows),
        Heading("The output's change, split"),
        Paragraph(f"RMS of the output's change after {cfg.steps} steps at depth {big}: total, the readout's own move "
                  "(new readout on the initial features) and the body's (new body through the initial readout); "
                  "then their slopes against log L."),
        Table(["lr", "parameterization", "Δf", "readout", "body", "readout slope", "body slope"], split),
        *[Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures],
    ]


def summary_line(results: dict[str, Any]) -> str:
    """One line: the measured and predicted slope of the last hidden layer's change, per lr and parameterization."""
    return "; ".join(f"lr {lr} {v}: Δh(L−1) slope {_signed(j['slope_last'])} "
                     f"(predicted {_signed(j['predicted_slope_last'])})"
                     for lr, per_v in results["judged"].items() for v, j in per_v.items())
