"""What SPEC §2 predicts for a NuMLP configuration: the move sums ``T(L)``, ``T_hidden(L)`` and the η* slope.

A normalized step of rate η moves layer k's pre-activations by a relative ``η·ρ_k``,
``ρ_k = s_P/√n_k``. At the EOC the moves reach the output at O(1) gain and add coherently, so one
step moves the output by about ``η·T(L)``, ``T(L) = Σ_{k<L} ρ_k``, and the optimal rate scales like
``η* ∝ 1/T(L)``. Everything here is computed from the layout (widths and scales), without weights.

A minibatch step moves less than a rank-one one: layer k's move is ``e_k·η·ρ_k`` with ``e_k`` set by how
alike its inputs are (:func:`batch_efficiency_at_init`, from the inputs' cosines and the EOC correlation
map). ``e_k`` rises with k, so ``T_e(L) = Σ_{k<L} e_k·ρ_k`` grows faster with depth than ``T(L)``.
The configuration keywords are NuMLP's: ``m``, ``parameterization``, ``width_schedule``,
``width_offset``, ``depth_normalizer``, ``activation``, ``max_width``, ``readout``, ``sigma_b2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nup.eoc import correlation_map, edge_of_chaos
from nup.parameterization import LayerLayout, layer_layout, resolve_parameterization
from nup_kernels.activations import get_activation

__all__ = ["EFFECTIVE", "T", "T_effective", "T_hidden", "batch_efficiency_at_init", "effective_divisor",
           "feature_cosine_at_init", "layout_of", "lr_slope", "predicted_lr_ratio", "predicted_lr_slope",
           "resolve_effective", "rho"]
CONFIG_KEYS = ("parameterization", "width_schedule", "width_offset", "depth_normalizer", "activation", "max_width",
               "readout", "sigma_b2")


def layout_of(depth: int, m: int, *, in_features: int = 1, out_features: int = 1, **config: Any) -> LayerLayout:
    """The :class:`~nup.parameterization.LayerLayout` ``NuMLP(in, out, depth, m, **config)`` would build."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown NuMLP configuration keys {sorted(unknown)}; use {', '.join(CONFIG_KEYS)}")
    param = resolve_parameterization(config.get("parameterization", "nup"), m, config.get("width_schedule"))
    sigma_w = edge_of_chaos(get_activation(config.get("activation", "relu")), config.get("sigma_b2", 0.0)).sigma_w
    return layer_layout(param, in_features, out_features, depth, m, sigma_w, config.get("readout", "mup"),
                        config.get("width_offset", 0), config.get("depth_normalizer", "none"),
                        config.get("max_width"))


def rho(depth: int, m: int, **config: Any) -> list[float]:
    """``[ρ_1, …, ρ_{L−1}]``: each layer's relative pre-activation move per unit lr."""
    return layout_of(depth, m, **config).rho


def T(depth: int, m: int, **config: Any) -> float:  # noqa: N802 (SPEC's name)
    """``T(L) = Σ_{k<L} ρ_k``: the output's move per unit lr (input layer included)."""
    return float(sum(rho(depth, m, **config)))


def T_hidden(depth: int, m: int, **config: Any) -> float:  # noqa: N802 (SPEC's name)
    """``T_hidden(L) = Σ_{k=2}^{L−1} ρ_k``: the hidden block's share of ``T(L)``."""
    return float(sum(rho(depth, m, **config)[1:]))


def lr_slope(depths: Sequence[int], move_sums: Sequence[float]) -> float:
    """Least-squares slope of ``log η*`` against ``log L`` under ``η* ∝ 1/move_sum`` (one per depth)."""
    if len(depths) < 2 or len(depths) != len(move_sums):
        raise ValueError(f"lr_slope needs two or more depths and one move sum each, got {list(depths)} and "
                         f"{list(move_sums)}")
    return float(np.polyfit(np.log(np.asarray(depths, dtype=float)), -np.log(np.asarray(move_sums)), 1)[0])


def predicted_lr_slope(depths: Sequence[int], m: int, **config: Any) -> float:
    """Least-squares slope of ``log η*`` against ``log L`` over ``depths`` under ``η* ∝ 1/T(L)``."""
    if len(depths) < 2:
        raise ValueError(f"predicted_lr_slope needs two or more depths, got {list(depths)}")
    return lr_slope(depths, [T(d, m, **config) for d in depths])


def predicted_lr_ratio(depths: Sequence[int], m: int, **config: Any) -> float:
    """``η*(L_max)/η*(L_min) = T(L_min)/T(L_max)`` under ``η* ∝ 1/T(L)``."""
    return T(min(depths), m, **config) / T(max(depths), m, **config)


MAP_GRID = 2001
"""Points in [−1, 1] at which :func:`feature_cosine_at_init` evaluates the correlation map (linear in between)."""


def feature_cosine_at_init(input_cosines: Sequence[float] | np.ndarray, depth: int, activation: str = "relu") -> float:
    """Mean over input pairs of the cosine between their readout inputs ``φ(h_{L−1})`` at init, infinite width.

    ``input_cosines``: the pairs' cosines ``cos(x_i, x_j)``, which are ``h_1``'s correlations (the first
    layer is linear in x with i.i.d. weights). SPEC §1's EOC correlation map (σ_b = 0, where it is also
    the cosine of ``φ(h)``) applied ``L − 1`` times gives each pair's cosine at the readout's input; a
    deep ReLU net at the EOC sends every pair towards 1 (inputs look alike to the readout).
    """
    return float(_layer_input_cosines(input_cosines, depth, activation)[-1].mean())


def _layer_input_cosines(input_cosines: Sequence[float] | np.ndarray, depth: int, activation: str) -> list[np.ndarray]:
    """The pairs' cosines at the inputs of layers 1 … L−1 and of the readout (``L`` arrays), at init and infinite
    width: ``x``'s, then SPEC §1's correlation map applied once per layer."""
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    grid = np.linspace(-1.0, 1.0, MAP_GRID)
    mapped = np.asarray(correlation_map(activation, grid), dtype=np.float64)
    out = [np.clip(np.asarray(input_cosines, dtype=np.float64), -1.0, 1.0)]
    if out[0].size == 0:
        raise ValueError("input_cosines is empty: pass the cosines of at least one pair of different inputs "
                         "(e.g. nup.diagnostics.pairwise_cosines of two or more rows)")
    for _ in range(depth - 1):
        out.append(np.interp(out[-1], grid, mapped))
    return out


def batch_efficiency_at_init(input_cosines: Sequence[float] | np.ndarray, depth: int, batch_size: int,
                             activation: str = "relu") -> list[float]:
    """``[e_1, …, e_{L−1}]``: how much of a rank-one move each layer's normalized batch step makes, at init.

    A step along ``G = Σ_i δ_i x_iᵀ`` of Frobenius norm 1 moves ``h`` at input ``x_j`` by
    ``‖Σ_i δ_i (x_i·x_j)‖/‖G‖``; with backward signals ``δ_i`` of equal norms and mutually orthogonal, its
    RMS over the batch is ``e·‖x‖`` with ``e² = mean_{i,j} cos²(x_i, x_j) = 1/B + (1 − 1/B)·mean_{i≠j} cos²``.
    A rank-one step (``B = 1``, or inputs all alike) has ``e = 1``. ``input_cosines`` are cosines between
    different inputs (e.g. :func:`nup.diagnostics.pairwise_cosines` of a probe batch); layer ``k``'s inputs
    are those pairs after ``k − 1`` steps of the correlation map, so e_k rises towards 1 with depth as deep
    inputs look alike. Measured by :func:`nup.diagnostics.step_efficiency`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    cosines = _layer_input_cosines(input_cosines, depth, activation)[:-1]
    return [math.sqrt(1 / batch_size + (1 - 1 / batch_size) * float(np.mean(c**2))) for c in cosines]


def T_effective(depth: int, m: int, input_cosines: Sequence[float] | np.ndarray, batch_size: int,  # noqa: N802
                **config: Any) -> float:
    """``T_e(L) = Σ_{k<L} e_k·ρ_k``: :func:`T` with each layer's move scaled by its batch efficiency at init
    (:func:`batch_efficiency_at_init`); ``η* ∝ 1/T_e(L)`` is the prediction for minibatch steps."""
    e = batch_efficiency_at_init(input_cosines, depth, batch_size, config.get("activation", "relu"))
    return float(sum(ek * r for ek, r in zip(e, rho(depth, m, **config))))


def effective_divisor(depth: int, m: int, input_cosines: Sequence[float] | np.ndarray, batch_size: int,
                      **config: Any) -> float:
    """``Σ_{k=2}^{L−1} e_k·ρ_k`` without a depth normalizer: passed as ``NuMLP(depth_normalizer=…)``, it makes the
    hidden block's effective move that of one layer at any depth, so ``T_e(L)`` (not ``T(L)``) is flat."""
    if depth < 3:
        raise ValueError(f"effective_divisor needs a hidden layer (depth >= 3), got {depth}")
    e = batch_efficiency_at_init(input_cosines, depth, batch_size, config.get("activation", "relu"))
    r = rho(depth, m, **{**config, "depth_normalizer": "none"})
    return float(sum(ek * rk for ek, rk in zip(e[1:], r[1:])))


EFFECTIVE = "effective"
"""The depth normalizer that needs data: a placeholder :func:`resolve_effective` replaces by its number."""


def resolve_effective(config: dict[str, Any], depth: int, m: int, input_cosines: Sequence[float] | np.ndarray,
                      batch_size: int) -> dict[str, Any]:
    """NuMLP keywords ``config`` with ``depth_normalizer=EFFECTIVE`` replaced by :func:`effective_divisor` for
    inputs with these pairwise cosines at this batch size (``"none"`` below depth 3, which has no hidden
    block); any other ``config`` is returned as it is."""
    if config.get("depth_normalizer") != EFFECTIVE:
        return config
    plain = {**config, "depth_normalizer": "none"}
    return plain if depth < 3 else {**config, "depth_normalizer": effective_divisor(depth, m, input_cosines,
                                                                                     batch_size, **plain)}
