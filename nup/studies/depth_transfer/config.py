"""The depth-transfer study's settings: its tasks, lr grid, horizons and metric window, and the
configuration a run depends on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from nup.studies import variants
from nup.studies._common import Flag
from nup.studies.variants import VARIANTS

TASKS = ("teacher", "digits")
GRID_RATIO = math.sqrt(2.0)
HORIZONS = (1, 2, 4)
"""Horizons as multiples of ``Config.horizon``; every run lasts the longest."""
SCHEDULES = ("cosine", "constant")
WINDOW = 0.2
"""The metric averages the minibatch loss over the last ``WINDOW`` of the steps up to a horizon."""
PROBE = 256
"""Train inputs on which each run records its readout inputs' mean cosine and inactive fraction, at init and
after T steps."""

FLAGS = (
    Flag("depths", "ints", "depths L (comma-separated)"),
    Flag("parameterizations", "strs",
         "among sp, sp_inv_depth, nup (offset widths), nup_harmonic, nup_effective (comma-separated)"),
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


def check(cfg: Config) -> None:
    """Raise ValueError, saying what to change, for settings the study cannot run with."""
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
