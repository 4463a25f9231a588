"""Memory traffic of one training step, per weight matrix, for each update path (DESIGN.md).

Counts are in parameter-sized passes (one read or one write of a P-element tensor) over the
weight ``W``, the gradient ``G`` and the cumulative update ``C`` (or the initial weights
``P_0``); ``bytes = total_passes · P · dtype_bytes``. The small-batch paths never store ``G``
and recompute its rank-B tile instead, which adds ``2·B·P`` FLOPs.

The module itself is callable: ``nup_kernels.traffic(n_params, path, batch)`` is :func:`traffic`,
and :func:`table` gives every path's row for one configuration.
"""

from __future__ import annotations

import sys
import types
from itertools import pairwise

#: path -> (W passes, G passes, C or P_0 passes)
PASSES: dict[str, tuple[int, int, int]] = {
    "plain_sgd": (4, 2, 0),
    "unfused_stats": (4, 5, 4),
    "fused_materialized": (4, 2, 2),
    "fused_small_batch": (4, 0, 2),
    "fused_small_batch_init": (4, 0, 1),
    "lower_bound": (3, 0, 1),
}
#: paths that recompute the rank-B tile ``δᵀx`` instead of reading a stored G
RECOMPUTE_PATHS = ("fused_small_batch", "fused_small_batch_init", "lower_bound")


def traffic(n_params: int, path: str, batch: int | None = None, dtype_bytes: int = 4) -> dict[str, int]:
    """Passes and bytes for one ``n_params``-element weight matrix on ``path``.

    Returns ``{"n_params", "w", "g", "c", "total_passes", "bytes"}``, plus ``"recompute_flops"``
    (``2·batch·n_params`` on the small-batch paths, else 0) when ``batch`` is given.
    """
    if path not in PASSES:
        raise ValueError(f"traffic: unknown path {path!r}; choose one of {sorted(PASSES)}")
    if n_params < 0 or dtype_bytes <= 0:
        raise ValueError(f"traffic: need n_params >= 0 and dtype_bytes > 0, got {n_params}, {dtype_bytes}")
    w, g, c = PASSES[path]
    total = w + g + c
    out = {"n_params": n_params, "w": w, "g": g, "c": c, "total_passes": total,
           "bytes": total * n_params * dtype_bytes}  # fmt: skip
    if batch is not None:
        if batch < 1:
            raise ValueError(f"traffic: batch must be >= 1, got {batch}")
        out["recompute_flops"] = 2 * batch * n_params if path in RECOMPUTE_PATHS else 0
    return out


def model_traffic(
    widths: list[int], path: str, batch: int | None = None, dtype_bytes: int = 4
) -> dict[str, int]:
    """``traffic`` summed over the weight matrices ``(n_l, n_{l-1})`` of an MLP of widths ``[n_0..n_L]``.

    Pass counts (``w``, ``g``, ``c``, ``total_passes``) are in passes of the whole model's
    parameters; ``n_params``, ``bytes`` and ``recompute_flops`` are sums over the layers.
    """
    if len(widths) < 2:
        raise ValueError(f"model_traffic: widths needs at least [n_0, n_1], got {widths}")
    layers = [traffic(n_in * n_out, path, batch, dtype_bytes) for n_in, n_out in pairwise(widths)]
    out = dict(layers[0])
    for key in ("n_params", "bytes", "recompute_flops"):
        if key in out:
            out[key] = sum(layer[key] for layer in layers)
    return out


def table(n_params: int, batch: int | None = None, dtype_bytes: int = 4) -> dict[str, dict[str, int]]:
    """DESIGN.md's traffic table for one ``n_params``-element matrix: ``{path: traffic(...)}`` for every path."""
    return {path: traffic(n_params, path, batch, dtype_bytes) for path in PASSES}


class _CallableModule(types.ModuleType):
    """``nup_kernels.traffic(...)`` as the README writes it: calling the module calls :func:`traffic`."""

    def __call__(self, n_params: int, path: str, batch: int | None = None, dtype_bytes: int = 4) -> dict[str, int]:
        return traffic(n_params, path, batch, dtype_bytes)


sys.modules[__name__].__class__ = _CallableModule
