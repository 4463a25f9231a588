"""The parameterizations the depth studies compare, as ``(m, NuMLP keywords)`` (also what :mod:`nup.theory` reads)."""

from __future__ import annotations

from typing import Any

from nup.theory import EFFECTIVE

VARIANTS = {
    "sp": "constant widths, every layer moved by 1",
    "sp_inv_depth": "constant widths, hidden moves 1/(L−2)",
    "nup": "νP, offset widths m·(k + k0)²",
    "nup_harmonic": "νP offset widths, hidden scales / T_hidden(L)",
    "nup_effective": "νP offset widths, hidden scales / Σ_{k≥2} e_k·ρ_k (batch efficiency at init)",
}


def variant_config(variant: str, m: int, sp_width: int, width_offset: int, activation: str,
                   max_width: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(m, NuMLP keywords)`` of a study parameterization; sp variants use width ``sp_width``; ``nup_effective``'s
    normalizer is :data:`nup.theory.EFFECTIVE`, for :func:`nup.theory.resolve_effective` to fill in per depth."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown parameterization {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant in ("sp", "sp_inv_depth"):
        return sp_width, {"parameterization": variant, "activation": activation}
    normalizer = {"nup_harmonic": "harmonic", "nup_effective": EFFECTIVE}.get(variant, "none")
    return m, {"parameterization": "nup", "width_offset": width_offset, "depth_normalizer": normalizer,
               "activation": activation, "max_width": max_width}

