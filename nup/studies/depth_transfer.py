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
comes with a bootstrap 95% interval over seeds, beside the slope SPEC §2 predicts, η* ∝ 1/T(L).
Each run also records how alike its inputs look to the readout (the mean cosine of ``φ(h_{L−1})`` over
:data:`PROBE` train inputs, at init and after T steps), beside the EOC correlation map's prediction at init.
The runs are saved to ``results.json`` after every round; a rerun into the same folder with the
same run settings reuses them (an interrupted study resumes; a narrower one re-analyses).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nup.io import write_json_atomic
from nup.report import Figure, Heading, Paragraph, Table
from nup.schedule import WarmupCosineSchedule
from nup.studies import variants
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
from nup.studies.lr_optimum import optimal_lr, shared_drift, slope_with_ci
from nup.studies.variants import VARIANTS

TASKS = ("teacher", "digits")
GRID_RATIO = math.sqrt(2.0)
HORIZONS = (1, 2, 4)
"""Horizons as multiples of ``Config.horizon``; every run lasts the longest."""
SCHEDULES = ("cosine", "constant")
WINDOW = 0.2
"""The metric averages the minibatch loss over the last ``WINDOW`` of the steps up to a horizon."""
PROBE = 256
"""Train inputs on which each run records the readout inputs' mean cosine, at init and after T steps."""

FLAGS = (
    Flag("depths", "ints", "depths L (comma-separated)"),
    Flag("parameterizations", "strs", "among sp, sp_inv_depth, nup (offset widths), nup_harmonic (comma-separated)"),
    Flag("tasks", "strs", "tasks among teacher, digits (comma-separated)"),
    Flag("horizon", "int", "horizon T in steps; runs last 4T, metrics at T, 2T and 4T"),
    Flag("lr_centre", "float", "centre of the first depth's lr grid (later depths start at the previous optimum)"),
    Flag("lr_points", "int", "lr grid points per depth before extension (ratio √2)"),
    Flag("max_lr_points", "int", "cap on grid points per depth when extending towards an interior optimum"),
    Flag("batch_size", "int", "minibatch size"),
    Flag("schedule", "str", "lr schedule of every run: cosine (decays to 0 at 4T) or constant"),
    Flag("m", "int", "νP base width: hidden widths m·(k + k0)²"),
    Flag("width_offset", "int", "νP width offset k0"),
    Flag("sp_width", "int", "constant hidden width of sp and sp_inv_depth"),
    Flag("max_width", "width", "cap on νP hidden widths (0: uncapped; a capped run is not νP)"),
    Flag("activation", "str", "activation (relu, abs, tanh, ...)"),
    Flag("n_train", "int", "train samples (depth_transfer: of the teacher–student task)"),
    Flag("teacher_shape", "ints", "teacher–student input dim, teacher hidden units, classes (comma-separated)"),
    Flag("seeds", "int", "seeds per configuration (at least 2 for a confidence interval)"),
    Flag("bootstrap", "int", "bootstrap replicates for the slope's confidence interval"),
    Flag("workers", "int", "worker processes (one torch thread each)"),
    Flag("reanalyse", "bool", "no new runs: analyse the runs saved in --out (an interrupted study's complete lrs)"),
)


@dataclass
class Config:
    """The study's settings (CPU default: depths 4 → 32, two tasks, two worker processes)."""

    depths: tuple[int, ...] = (4, 8, 16, 32)
    parameterizations: tuple[str, ...] = ("sp", "sp_inv_depth", "nup", "nup_harmonic")
    tasks: tuple[str, ...] = ("teacher", "digits")
    horizon: int = 75
    lr_centre: float = 0.25
    lr_points: int = 5
    max_lr_points: int = 10
    batch_size: int = 64
    schedule: str = "cosine"
    m: int = 1
    width_offset: int = 3
    sp_width: int = 128
    max_width: int | None = None
    activation: str = "relu"
    n_train: int = 16384
    teacher_shape: tuple[int, ...] = (8, 16, 4)
    seeds: int = 3
    bootstrap: int = 1000
    workers: int = 2
    reanalyse: bool = False
    seed: int = 0
    device: str = "cpu"


QUICK = {"depths": (3, 6), "tasks": ("teacher",), "horizon": 10, "lr_points": 3, "max_lr_points": 5,
         "batch_size": 16, "sp_width": 16, "n_train": 512, "teacher_shape": (4, 8, 2), "seeds": 2, "bootstrap": 50,
         "workers": 1}


def _check(cfg: Config) -> None:
    if not cfg.depths or min(cfg.depths) < 3 or list(cfg.depths) != sorted(set(cfg.depths)):
        raise ValueError(f"depths must be increasing integers >= 3, got {cfg.depths}")
    for name, values, known in (("parameterization", cfg.parameterizations, VARIANTS), ("task", cfg.tasks, TASKS),
                                ("schedule", (cfg.schedule,), SCHEDULES)):
        for v in values:
            if v not in known:
                raise ValueError(f"unknown {name} {v!r}; choose from {', '.join(known)}")
    if not (cfg.lr_centre > 0 and math.isfinite(cfg.lr_centre)):
        raise ValueError(f"lr_centre must be a positive number, got {cfg.lr_centre}")
    if not 3 <= cfg.lr_points <= cfg.max_lr_points:
        raise ValueError(f"need 3 <= lr_points <= max_lr_points, got {cfg.lr_points} and {cfg.max_lr_points}")
    if min(cfg.horizon, cfg.batch_size, cfg.m, cfg.sp_width, cfg.n_train, cfg.seeds, cfg.workers) < 1:
        raise ValueError("horizon, batch_size, m, sp_width, n_train, seeds and workers must be >= 1")
    if len(cfg.teacher_shape) != 3 or min(cfg.teacher_shape) < 1 or cfg.teacher_shape[2] < 2:
        raise ValueError(f"teacher_shape is dim,hidden,classes (positive, classes >= 2), got {cfg.teacher_shape}")
    if cfg.width_offset < 0 or cfg.bootstrap < 0:
        raise ValueError("width_offset and bootstrap must be >= 0")


def variant_config(cfg: Config, variant: str) -> tuple[int, dict[str, Any]]:
    """``(m, NuMLP keywords)`` of a study parameterization under ``cfg``."""
    return variants.variant_config(variant, cfg.m, cfg.sp_width, cfg.width_offset, cfg.activation, cfg.max_width)


def grid_lr(cfg: Config, j: int) -> float:
    """The lr of grid index ``j``: ``lr_centre·√2^j``."""
    return cfg.lr_centre * GRID_RATIO**j


def horizons(cfg: Config) -> list[int]:
    return [h * cfg.horizon for h in HORIZONS]


def window_mean(trace: np.ndarray, horizon: int) -> float:
    """Mean of ``trace[⌈(1 − WINDOW)·H⌉ : H]``; inf if any of those losses is not finite."""
    part = trace[min(math.ceil((1 - WINDOW) * horizon), horizon - 1): horizon]
    return float(part.mean()) if np.isfinite(part).all() else math.inf


_DATA: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def load_task(cfg: Config, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train inputs ``(n, d)`` and labels ``(n,)`` of a task (cached per process)."""
    from nup.data import load_digits_split, teacher_student

    key = (task, cfg.n_train, tuple(cfg.teacher_shape), cfg.device)
    device = cfg.device
    if key not in _DATA:
        if task == "teacher":
            dim, hidden, classes = cfg.teacher_shape
            x, y, _, _ = teacher_student(n_train=cfg.n_train, n_test=1, dim=dim, seed=0, device=device,
                                         n_classes=classes, hidden=hidden)
        else:
            x, y, _, _ = load_digits_split(seed=0, device=device)
        _DATA[key] = (x, y)
    return _DATA[key]


def chance_loss(y: torch.Tensor) -> float:
    """Cross-entropy of the best constant prediction: the entropy of the label frequencies."""
    p = torch.bincount(y).double() / y.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def train_one(cfg: Config, task: str, variant: str, depth: int, j: int, seed: int) -> dict[str, Any]:
    """One run of 4T NuP steps; returns its metric at each horizon (inf where the loss was not finite)."""
    from nup import NuMLP, NuP
    from nup.data import batches
    from nup.diagnostics import feature_cosine

    x, y = load_task(cfg, task)
    lr = grid_lr(cfg, j)
    m, kwargs = variant_config(cfg, variant)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = NuMLP(x.shape[1], int(y.max()) + 1, depth, m, **kwargs).to(x.device)
    steps = horizons(cfg)[-1]
    schedule = WarmupCosineSchedule(steps) if cfg.schedule == "cosine" else None
    opt = NuP(model.named_parameters(), lr=lr, schedule=schedule)
    stream = batches(x, y, cfg.batch_size, torch.Generator().manual_seed(seed))
    trace = torch.full((steps,), math.inf, device=x.device)
    features = {"0": feature_cosine(model, x[:PROBE])}
    for t in range(steps):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace[t] = loss.detach()
        if t + 1 == cfg.horizon:
            features[str(cfg.horizon)] = feature_cosine(model, x[:PROBE])
        if t % 25 == 24 and not bool(torch.isfinite(trace[t - 24: t + 1]).all()):  # one sync per 25 steps
            break
    values = trace.cpu().numpy()
    return {"task": task, "parameterization": variant, "depth": depth, "j": j, "lr": lr, "seed": seed,
            "metric": {str(h): finite_or_none(window_mean(values, h)) for h in horizons(cfg)},
            "feature_cos": {k: finite_or_none(v) for k, v in features.items()},
            "diverged": not bool(np.isfinite(values).all()), "widths_capped": bool(model.capped),
            "max_hidden_width": max(model.widths[1:-1]), "time_s": round(time.perf_counter() - t0, 3)}


def _job(cfg_dict: dict[str, Any], job: tuple) -> dict[str, Any]:
    return train_one(Config(**cfg_dict), *job)


def curve(cfg: Config, runs: dict[tuple, dict], key: tuple, js: list[int], horizon: int) -> np.ndarray:
    """``(n_seeds, len(js))`` metrics of ``key = (task, variant, depth)`` at ``horizon`` (inf: diverged)."""
    rows = []
    for s in range(cfg.seeds):
        values = [runs[(*key, j, cfg.seed + s)]["metric"][str(horizon)] for j in js]
        rows.append([math.inf if v is None else v for v in values])
    return np.asarray(rows, dtype=np.float64)


def _extension(cfg: Config, runs: dict, key: tuple, js: list[int], chance: float) -> list[int]:
    """Grid indices to add so that η* is interior at every horizon where the depth trained, and at the
    longest horizon in any case (an optimum at the grid's edge may be a depth that trains at another lr)."""
    add = set()
    for h in horizons(cfg):
        mean = curve(cfg, runs, key, js, h).mean(axis=0)
        opt = optimal_lr([grid_lr(cfg, j) for j in js], mean)
        if opt["loss"] is None or (opt["loss"] > chance / 2 and h != horizons(cfg)[-1]):
            continue
        i = int(np.argmin(np.where(np.isfinite(mean), mean, np.inf)))
        if i == 0:
            add.add(js[0] - 1)
        elif i == len(js) - 1:
            add.add(js[-1] + 1)
    return sorted(add)[: max(cfg.max_lr_points - len(js), 0)]


def _save_runs(cfg: Config, out: Path, runs: dict[tuple, dict]) -> None:
    """``results.json`` with the runs so far and no analysis: what survives an interrupted study."""
    write_json_atomic(out / "results.json", {"study": "depth_transfer", "config": config_dict(cfg), "analysis": None,
                                             "runs": [runs[k] for k in sorted(runs)]})


RUN_FIELDS = ("horizon", "lr_centre", "lr_points", "batch_size", "schedule", "m", "width_offset", "sp_width",
              "max_width", "activation", "n_train", "teacher_shape", "seed", "device")
"""Config fields a run's result depends on (with its task, parameterization, depth, lr and seed)."""
OLD_DEFAULTS = {"schedule": "constant"}
"""Run fields a results.json from before the field existed was made with."""


def cached_runs(cfg: Config, out: Path) -> dict[tuple, dict]:
    """Runs in ``out/results.json`` made under the same :data:`RUN_FIELDS` (a killed study resumes from them)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    now = config_dict(cfg)
    if old.get("study") != "depth_transfer" or any(old["config"].get(k, OLD_DEFAULTS.get(k)) != now[k]
                                                   for k in RUN_FIELDS):
        return {}
    return {(r["task"], r["parameterization"], r["depth"], r["j"], r["seed"]): r for r in old["runs"]}


def saved_grid(cfg: Config, out: Path) -> tuple[dict[tuple, dict], dict[tuple, list[int]], dict[str, float]]:
    """:func:`run_grid`'s result from the runs saved in ``out`` alone: every lr that has all seeds.

    Depths missing for some task and parameterization are dropped from ``cfg.depths`` (in place).
    """
    runs = cached_runs(cfg, out)
    if not runs:
        raise ValueError(f"no saved runs with these run settings in {out}/results.json; run without --reanalyse")
    grids: dict[tuple, list[int]] = {}
    for task, variant, depth, j, _ in runs:
        if all((task, variant, depth, j, cfg.seed + s) in runs for s in range(cfg.seeds)):
            grids.setdefault((task, variant, depth), [])
            if j not in grids[task, variant, depth]:
                grids[task, variant, depth].append(j)
    grids = {k: sorted(v) for k, v in grids.items()}
    cfg.depths = tuple(d for d in cfg.depths
                       if all((t, v, d) in grids for t in cfg.tasks for v in cfg.parameterizations))
    if not cfg.depths:
        raise ValueError(f"the runs saved in {out} cover no depth for every task and parameterization")
    return runs, grids, {task: chance_loss(load_task(cfg, task)[1]) for task in cfg.tasks}


def run_grid(cfg: Config, out: Path, progress: bool = True) -> tuple[dict[tuple, dict], dict[tuple, list[int]],
                                                                     dict[str, float]]:
    """Every run of the study: per task and parameterization, depth by depth, each grid extended until
    its optimum is interior; the next depth's grid starts at this one's optimum.

    Each (task, parameterization) chain advances on its own, so no worker waits for another chain's
    depth to finish; the runs waiting for a worker start largest model first. The runs and grids are
    those of a study that finishes every depth of every chain before the next (each chain's decisions
    read its own runs only). Returns ``(runs keyed by (task, variant, depth, j, seed), grid indices per
    (task, variant, depth), chance loss per task)``; the runs so far are saved to ``out`` whenever a
    chain's round ends.
    """
    import os

    from tqdm.auto import tqdm

    from nup.sweep import _init_worker

    data = {task: load_task(cfg, task) for task in cfg.tasks}
    chance = {task: chance_loss(y) for task, (_, y) in data.items()}
    cache = cached_runs(cfg, out)
    runs: dict[tuple, dict] = {}
    grids: dict[tuple, list[int]] = {}
    level = {(t, v): 0 for t in cfg.tasks for v in cfg.parameterizations}  # index into cfg.depths
    centre = dict.fromkeys(level, 0)
    waiting: dict[tuple, set] = {}  # chain → its runs of this round not finished yet
    queue: list[tuple] = []  # runs waiting for a worker
    sizes = _model_sizes(cfg, data)
    bar = tqdm(desc="depth_transfer", unit="run", disable=None if progress else True, leave=False, total=0)

    def advance(chain: tuple, extend: bool) -> None:
        """Queue the chain's next round: its grid extended, or the next depth's grid once this one is settled."""
        while level[chain] < len(cfg.depths):
            key = (*chain, cfg.depths[level[chain]])
            if key not in grids:
                first = centre[chain] - cfg.lr_points // 2
                grids[key] = list(range(first, first + cfg.lr_points))
            elif extend:
                grids[key] = sorted(grids[key] + _extension(cfg, runs, key, grids[key], chance[chain[0]]))
            todo = [(*key, j, cfg.seed + s) for j in grids[key] for s in range(cfg.seeds)
                    if (*key, j, cfg.seed + s) not in runs]
            extend = True
            if not todo:  # settled: the next depth starts at this one's optimum
                mean = curve(cfg, runs, key, grids[key], horizons(cfg)[-1]).mean(axis=0)
                eta = optimal_lr([grid_lr(cfg, j) for j in grids[key]], mean)["refined"]
                if eta is not None:
                    centre[chain] = round(math.log(eta / cfg.lr_centre) / math.log(GRID_RATIO))
                level[chain] += 1
                continue
            runs.update({job: cache[job] for job in todo if job in cache})
            todo = [job for job in todo if job not in runs]
            if todo:
                waiting[chain] = set(todo)
                queue.extend(todo)
                bar.total += len(todo)
                return

    def finished(job: tuple, record: dict) -> None:
        runs[job] = record
        bar.update()
        chain = job[:2]
        waiting[chain].discard(job)
        if not waiting[chain]:
            _save_runs(cfg, out, runs)
            advance(chain, True)

    pool = None
    if cfg.workers > 1:
        pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(os.getpid(),))
    try:
        for chain in level:
            advance(chain, False)
        running: dict[Any, tuple] = {}
        while queue or running:
            queue.sort(key=lambda job: sizes[job[:3]])  # the largest last, popped first
            if pool is None:  # one at a time: the runs a finished round queued are sorted in first
                job = queue.pop()
                finished(job, train_one(cfg, *job))
                continue
            while queue and len(running) < cfg.workers:
                job = queue.pop()
                running[pool.submit(_job, asdict(cfg), job)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished(running.pop(future), future.result())
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return dict(sorted(runs.items())), grids, chance  # one order however the runs finished


def _model_sizes(cfg: Config, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[tuple, int]:
    """Parameters of each (task, variant, depth)'s NuMLP (built on the meta device) for the tasks' ``(x, y)``:
    the order runs wait for a worker in."""
    from nup import NuMLP

    sizes = {}
    for task, (x, y) in data.items():
        for variant in cfg.parameterizations:
            m, kwargs = variant_config(cfg, variant)
            for depth in cfg.depths:
                with torch.device("meta"):
                    model = NuMLP(x.shape[1], int(y.max()) + 1, depth, m, **kwargs)
                sizes[task, variant, depth] = sum(p.numel() for p in model.parameters())
    return sizes


def analyse(cfg: Config, runs: dict, grids: dict, chance: dict[str, float]) -> dict[str, Any]:
    """Per task, parameterization and horizon: each depth's curve and η*, and the fitted and predicted slopes."""
    from nup.theory import T, predicted_lr_slope

    out: dict[str, Any] = {}
    for task in cfg.tasks:
        per_variant, boots = {}, {}
        for variant in cfg.parameterizations:
            m, kwargs = variant_config(cfg, variant)
            theory_t = {str(d): T(d, m, **kwargs) for d in cfg.depths}
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
                fit["predicted_slope"] = predicted_lr_slope(fit_depths, m, **kwargs) if len(fit_depths) > 1 else None
                per_h[str(h)] = {"by_depth": by_depth, "fit": fit}
            per_variant[variant] = {"T": theory_t, "horizons": per_h,
                                    "features": features(cfg, runs, grids, (task, variant), chance[task] / 2)}
        out[task] = {"chance_loss": chance[task], "parameterizations": per_variant,
                     "shared_drift": {str(h): _drift(per_variant, boots, h) for h in horizons(cfg)},
                     "feature_cos_predicted": predicted_features(cfg, task)}
    return out


def _drift(per_variant: dict[str, Any], boots: dict[tuple, np.ndarray], h: int) -> dict[str, Any] | None:
    """:func:`~nup.studies.lr_optimum.shared_drift` at horizon ``h`` over the parameterizations with a fitted
    slope (None below two)."""
    fits = {v: e["horizons"][str(h)]["fit"] for v, e in per_variant.items()}
    names = [v for v, f in fits.items() if f["slope"] is not None and f["predicted_slope"] is not None]
    if len(names) < 2:
        return None
    return {"parameterizations": names, **shared_drift({v: fits[v]["slope"] for v in names},
                                                       {v: fits[v]["predicted_slope"] for v in names},
                                                       {v: boots[v, h] for v in names})}


def predicted_features(cfg: Config, task: str) -> dict[str, float]:
    """Per depth, the readout inputs' mean cosine at init on the probe at infinite width (EOC correlation map)."""
    from nup.diagnostics import pairwise_cosines
    from nup.theory import feature_cosine_at_init

    cosines = pairwise_cosines(load_task(cfg, task)[0][:PROBE]).numpy()
    return {str(d): feature_cosine_at_init(cosines, d, cfg.activation) for d in cfg.depths}


def features(cfg: Config, runs: dict, grids: dict, chain: tuple, half: float) -> dict[str, Any] | None:
    """Per depth, the runs' readout-input cosine at init, and after T steps split by whether the run trained
    (metric at 4T ≤ ``half``) or stayed above half of chance; None for runs saved before it was recorded."""
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
                           **{name: {"runs": len(g), "at_T": _mean([r["feature_cos"].get(t) for r in g])}
                              for name, g in groups.items()}}
    return out


def _mean(values: list) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _plots(cfg: Config, analysis: dict, out: Path) -> list[str]:
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
                    # SPEC's prediction η* ∝ 1/T(L), through the fitted points' geometric mean
                    inv = np.array([1 / v["T"][str(d)] for d, _ in fitted])
                    c = math.exp(np.mean(np.log([eta for _, eta in fitted]) - np.log(inv)))
                    ax.plot([d for d, _ in fitted], c * inv, "--", color=f"C{i}", lw=0.9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("depth L")
            ax.set_title(f"horizon {h} steps")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small")
        axes[0].set_ylabel("η*")
        fig.suptitle(f"{task}: η* against depth (dashed: SPEC's η* ∝ 1/T(L); hollow: left out of the fit)")
        names.append(save_figure(fig, out / f"optimal_lr_{task}.png"))
    return names


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


def _readme(cfg: Config, analysis: dict, runs: dict, env: dict, figures: list[str]) -> list:
    hs = horizons(cfg)
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
                  f"({sum(r['diverged'] for r in runs.values())} with a non-finite loss), {env['wall_time_s']:.0f} s "
                  f"on {env['device']} with {cfg.workers} worker process(es)."),
        *([Paragraph(WHY_COSINE)] if cfg.schedule == "cosine" else []),
        Paragraph("Prediction (SPEC §2): one step moves the output by about η·T(L), T(L) = Σ_{k<L} ρ_k, so "
                  "η* ∝ 1/T(L); the predicted slope is the least-squares slope of −log T(L) over the fitted depths."),
    ]
    for task, entry in analysis.items():
        rows = []
        for variant, v in entry["parameterizations"].items():
            for h in hs:
                fit = v["horizons"][str(h)]["fit"]
                excluded = [d for d in cfg.depths if d not in fit["depths"]]
                rows.append([variant, h, _signed(fit["slope"]), _ci(fit), _signed(fit["predicted_slope"]),
                             ", ".join(map(str, fit["depths"])) or "none", ", ".join(map(str, excluded)) or "none"])
        blocks += [Heading(f"{task}: slope of log η* against log L"),
                   Table(["parameterization", "horizon", "measured slope", "95% CI", "T(L) prediction",
                          "depths fitted", "left out"], rows)]
        drifts = {h: d for h in hs if (d := entry["shared_drift"][str(h)])}
        if drifts:
            names = list(entry["parameterizations"])
            blocks += [Heading(f"{task}: what T(L) misses, shared by all parameterizations and left to each"),
                       Paragraph("Shared drift: the mean over parameterizations of measured − predicted slope. Left "
                                 "to each: its measured − predicted minus the shared drift; 0 where T(L) gets the "
                                 "differences between parameterizations right. 95% intervals from the same seed "
                                 "resamples for every parameterization."),
                       Table(["horizon", "shared drift", *names],
                             [[h, f"{_signed(d['drift'])} {_ci(d)}",
                               *(f"{_signed(d['beyond'][v]['value'])} {_ci(d['beyond'][v])}" if v in d["beyond"]
                                 else "n/a" for v in names)] for h, d in drifts.items()])]
        rows = []
        for variant, v in entry["parameterizations"].items():
            for d in cfg.depths:
                cells = [variant, d, fmt(v["T"][str(d)])]
                for h in hs:
                    e = v["horizons"][str(h)]["by_depth"][str(d)]
                    o = e["optimum"]
                    note = "" if e["trained"] else " (not trained)"
                    note += " (edge)" if o["at_edge"] else ""
                    cells.append(f"{fmt(o['refined'])} @ {fmt(o['loss'])}{note}")
                rows.append(cells)
        blocks += [Heading(f"{task}: η* @ best loss per depth (chance {entry['chance_loss']:.3f})"),
                   Table(["parameterization", "depth", "T(L)", *[f"H = {h}" for h in hs]], rows)]
        rows = [[variant, d, ", ".join(f"{fmt(lr)}: {k}" for lr, k in zip(e["lrs"], e["stuck"]))]
                for variant, v in entry["parameterizations"].items() for d in cfg.depths
                for e in (v["horizons"][str(hs[-1])]["by_depth"][str(d)],)]
        blocks += [Heading(f"{task}: runs left above half of chance at H = {hs[-1]}, of {cfg.seeds} seeds per lr"),
                   Paragraph("Runs whose metric is above half of chance (or not finite): slow to train at small "
                             "lr, or left on a plateau. η* comes from the mean over seeds, so where such runs grow "
                             "in number with lr, η* follows how often they occur, not T(L) alone."),
                   Table(["parameterization", "depth", "lr: runs stuck"], rows)]
        rows = [[variant, d, fmt(entry["feature_cos_predicted"][str(d)]), fmt(f["init"]),
                 *(f"{fmt(f[g]['at_T'])} ({f[g]['runs']})" for g in ("trained", "stuck"))]
                for variant, v in entry["parameterizations"].items() if v["features"]
                for d in cfg.depths for f in (v["features"][str(d)],)]
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
    blocks += [Figure(Path(name), name.removesuffix(".png").replace("_", " ")) for name in figures]
    return blocks


def run(cfg: Config, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the study into ``out``; returns the results written to ``results.json``."""
    _check(cfg)
    out = prepare_out(out)
    start = time.perf_counter()
    runs_env = None
    if cfg.reanalyse:  # keep the environment the runs were made in
        runs, grids, chance = saved_grid(cfg, out)  # raises if out has no saved runs
        saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
        runs_env = saved.get("runs_environment") or saved.get("environment")
    else:
        runs, grids, chance = run_grid(cfg, out, progress)
    analysis = analyse(cfg, runs, grids, chance)
    figures = _plots(cfg, analysis, out)
    env = environment(cfg.device, time.perf_counter() - start)
    runs_env = runs_env or env
    results = {"study": "depth_transfer", "config": config_dict(cfg), "horizons": horizons(cfg),
               "analysis": analysis, "runs": list(runs.values()), "figures": figures, "environment": env,
               "runs_environment": runs_env}
    write_outputs(out, results, _readme(cfg, analysis, runs, runs_env, figures))
    return results


def summary_line(results: dict[str, Any]) -> str:
    """One line: the measured slope, its CI and the prediction at the longest horizon, per task and variant."""
    h = str(results["horizons"][-1])
    parts = []
    for task, entry in results["analysis"].items():
        for variant, v in entry["parameterizations"].items():
            fit = v["horizons"][h]["fit"]
            parts.append(f"{task} {variant}: slope {_signed(fit['slope'])} {_ci(fit)} "
                         f"(T(L) {_signed(fit['predicted_slope'])})")
        if drift := entry.get("shared_drift", {}).get(h):
            parts.append(f"{task} shared drift {_signed(drift['drift'])} {_ci(drift)}")
    return "; ".join(parts)
