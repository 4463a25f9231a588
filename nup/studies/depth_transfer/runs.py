"""The depth-transfer study's runs: each task's data, one training run, and the grid of runs
(each depth's lr grid extended until its optimum is interior; saved after every round, reused on resume)."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nup.io import write_json_atomic
from nup.schedule import WarmupCosineSchedule
from nup.studies._common import config_dict, finite_or_none
from nup.studies.depth_transfer.config import GRID_RATIO, PROBE, Config, grid_lr, horizons, variant_config, window_mean
from nup.studies.lr_optimum import optimal_lr

_DATA: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_COSINES: dict[tuple, np.ndarray] = {}


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


def probe_cosines(cfg: Config, task: str) -> np.ndarray:
    """The pairwise cosines of the task's first :data:`PROBE` train inputs (float64, ``PROBE·(PROBE − 1)/2``;
    cached per process, as the data)."""
    from nup.diagnostics import pairwise_cosines

    key = (task, cfg.n_train, tuple(cfg.teacher_shape), cfg.device)
    if key not in _COSINES:
        _COSINES[key] = pairwise_cosines(load_task(cfg, task)[0][:PROBE]).cpu().numpy()
    return _COSINES[key]


def model_config(cfg: Config, task: str, variant: str, depth: int) -> tuple[int, dict[str, Any]]:
    """``(m, NuMLP keywords)`` of a parameterization at one depth of a task (``nup_effective``'s divisor is
    computed from the task's probe inputs at the study's batch size)."""
    from nup.theory import resolve_effective

    m, kwargs = variant_config(cfg, variant)
    return m, resolve_effective(kwargs, depth, m, probe_cosines(cfg, task), cfg.batch_size)


def chance_loss(y: torch.Tensor) -> float:
    """Cross-entropy of the best constant prediction: the entropy of the label frequencies."""
    p = torch.bincount(y).double() / y.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def train_one(cfg: Config, task: str, variant: str, depth: int, j: int, seed: int) -> dict[str, Any]:
    """One run of 4T NuP steps; returns its metric at each horizon (inf where the loss was not finite)."""
    from nup import NuMLP, NuP
    from nup.data import batches
    from nup.diagnostics import readout_features

    x, y = load_task(cfg, task)
    lr = grid_lr(cfg, j)
    m, kwargs = model_config(cfg, task, variant, depth)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = NuMLP(x.shape[1], int(y.max()) + 1, depth, m, **kwargs).to(x.device)
    steps = horizons(cfg)[-1]
    schedule = WarmupCosineSchedule(steps) if cfg.schedule == "cosine" else None
    opt = NuP(model.named_parameters(), lr=lr, schedule=schedule)
    stream = batches(x, y, cfg.batch_size, torch.Generator().manual_seed(seed))
    trace = torch.full((steps,), math.inf, device=x.device)
    features = {"0": readout_features(model, x[:PROBE])}
    for t in range(steps):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace[t] = loss.detach()
        if t + 1 == cfg.horizon:
            features[str(cfg.horizon)] = readout_features(model, x[:PROBE])
        if t % 25 == 24 and not bool(torch.isfinite(trace[t - 24: t + 1]).all()):  # one sync per 25 steps
            break
    values = trace.cpu().numpy()
    return {"task": task, "parameterization": variant, "depth": depth, "j": j, "lr": lr, "seed": seed,
            "metric": {str(h): finite_or_none(window_mean(values, h)) for h in horizons(cfg)},
            "feature_cos": {k: finite_or_none(v["cos"]) for k, v in features.items()},
            "inactive": {k: v["inactive"] for k, v in features.items()},
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


def grid_extension(cfg: Config, runs: dict, key: tuple, js: list[int], chance: float) -> list[int]:
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
                grids[key] = sorted(grids[key] + grid_extension(cfg, runs, key, grids[key], chance[chain[0]]))
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
            for depth in cfg.depths:
                m, kwargs = model_config(cfg, task, variant, depth)
                with torch.device("meta"):
                    model = NuMLP(x.shape[1], int(y.max()) + 1, depth, m, **kwargs)
                sizes[task, variant, depth] = sum(p.numel() for p in model.parameters())
    return sizes
