"""What SPEC §2 predicts for a NuMLP configuration: the move sums ``T(L)``, ``T_hidden(L)`` and the η* slope.

A normalized step of rate η moves layer k's pre-activations by a relative ``η·ρ_k``,
``ρ_k = s_P/√n_k``. At the EOC the moves reach the output at O(1) gain and add coherently, so one
step moves the output by about ``η·T(L)``, ``T(L) = Σ_{k<L} ρ_k``, and the optimal rate scales like
``η* ∝ 1/T(L)``. Everything here is computed from the layout (widths and scales), without weights.
The configuration keywords are NuMLP's: ``m``, ``parameterization``, ``width_schedule``,
``width_offset``, ``depth_normalizer``, ``activation``, ``max_width``, ``readout``, ``sigma_b2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nup.eoc import correlation_map, edge_of_chaos
from nup.parameterization import LayerLayout, layer_layout, resolve_parameterization
from nup_kernels.activations import get_activation

__all__ = ["T", "T_hidden", "feature_cosine_at_init", "layout_of", "predicted_lr_ratio", "predicted_lr_slope",
           "rho"]
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


def predicted_lr_slope(depths: Sequence[int], m: int, **config: Any) -> float:
    """Least-squares slope of ``log η*`` against ``log L`` over ``depths`` under ``η* ∝ 1/T(L)``."""
    if len(depths) < 2:
        raise ValueError(f"predicted_lr_slope needs two or more depths, got {list(depths)}")
    ts = [T(d, m, **config) for d in depths]
    return float(np.polyfit(np.log(np.asarray(depths, dtype=float)), -np.log(ts), 1)[0])


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
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    grid = np.linspace(-1.0, 1.0, MAP_GRID)
    mapped = np.asarray(correlation_map(activation, grid), dtype=np.float64)
    c = np.clip(np.asarray(input_cosines, dtype=np.float64), -1.0, 1.0)
    for _ in range(depth - 1):
        c = np.interp(c, grid, mapped)
    return float(c.mean())
