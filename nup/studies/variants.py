"""The parameterizations the depth studies compare, as ``(m, NuMLP keywords)`` (also what :mod:`nup.theory` reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

VARIANTS = {
    "sp": "constant widths, every layer moved by 1",
    "sp_inv_depth": "constant widths, hidden moves 1/(L−2)",
    "nup": "νP, offset widths m·(k + k0)²",
    "nup_harmonic": "νP offset widths, hidden scales / T_hidden(L)",
    "nup_effective": "νP offset widths, hidden scales / Σ_{k≥2} e_k·ρ_k (batch efficiency at init)",
}
EFFECTIVE = "effective"
"""The depth normalizer ``variant_config`` gives ``nup_effective``: a placeholder for the number
:func:`at_depth` puts in its place, which needs the depth and the data."""


def variant_config(variant: str, m: int, sp_width: int, width_offset: int, activation: str,
                   max_width: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(m, NuMLP keywords)`` of a study parameterization; sp variants use width ``sp_width``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown parameterization {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant in ("sp", "sp_inv_depth"):
        return sp_width, {"parameterization": variant, "activation": activation}
    normalizer = {"nup_harmonic": "harmonic", "nup_effective": EFFECTIVE}.get(variant, "none")
    return m, {"parameterization": "nup", "width_offset": width_offset, "depth_normalizer": normalizer,
               "activation": activation, "max_width": max_width}


def at_depth(kwargs: dict[str, Any], depth: int, m: int, input_cosines: Sequence[float] | np.ndarray,
             batch_size: int) -> dict[str, Any]:
    """NuMLP keywords for one depth: the :data:`EFFECTIVE` normalizer replaced by
    :func:`nup.theory.effective_divisor` for inputs with these pairwise cosines at this batch size."""
    if kwargs.get("depth_normalizer") != EFFECTIVE:
        return kwargs
    from nup.theory import effective_divisor

    plain = {**kwargs, "depth_normalizer": "none"}
    return {**kwargs, "depth_normalizer": effective_divisor(depth, m, input_cosines, batch_size, **plain)}
