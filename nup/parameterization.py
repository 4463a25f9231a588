"""Width schedules and per-parameter update scales ``s_P`` (SPEC §1–2).

A parameterization is a width schedule (``k ↦ n_k`` for hidden layers k = 1 … L−1) plus a
scale rule (the Frobenius norm a normalized step of rate 1 takes on each tensor). The named
ones are ``nup`` (quadratic widths, the input layer's step on every hidden layer), ``sp``
(constant widths, every layer moved by a relative 1) and ``sp_inv_depth`` (constant widths,
hidden steps divided by L−2). A step of norm ``s_P`` moves its layer's pre-activations by a
relative ``ρ_k = s_P/√n_k``. :func:`layer_layout` resolves a whole network (widths, scales,
the depth normalizer) without allocating it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Role = Literal["input", "hidden", "readout", "bias"]
WidthSchedule = Callable[[int], int]

DEFAULT_WIDTH_LIMIT = 65_536
"""Widths above this need an explicit ``max_width`` (a 65,536² weight is 16 GiB in fp32)."""


@dataclass(frozen=True)
class ParamInfo:
    """What a scale rule may depend on. ``layer`` counts weight layers from 1 to ``depth``."""

    role: Role
    layer: int
    fan_in: int
    fan_out: int
    m: int
    depth: int
    sigma_w: float
    first_width: int | None = None
    """``n_1``, the first hidden width (None: ``m``, as under pure quadratic widths)."""

    @property
    def n1(self) -> int:
        return self.m if self.first_width is None else self.first_width


ScaleRule = Callable[[ParamInfo], float]


def _width_quadratic(m: int) -> WidthSchedule:
    return lambda k: m * k * k


def _width_linear(m: int) -> WidthSchedule:
    return lambda k: m * k


def _width_constant(m: int) -> WidthSchedule:
    return lambda k: m


WIDTH_SCHEDULES: dict[str, Callable[[int], WidthSchedule]] = {
    "quadratic": _width_quadratic,
    "linear": _width_linear,
    "constant": _width_constant,
}


def _hidden_nup(p: ParamInfo) -> float:
    return math.sqrt(p.n1)


def _hidden_sp(p: ParamInfo) -> float:
    return math.sqrt(p.fan_out)


def _hidden_sp_inv_depth(p: ParamInfo) -> float:
    return math.sqrt(p.fan_out) / max(p.depth - 2, 1)


HIDDEN_SCALE_RULES: dict[str, ScaleRule] = {
    "nup": _hidden_nup,
    "sp": _hidden_sp,
    "sp_inv_depth": _hidden_sp_inv_depth,
}

PARAMETERIZATIONS: dict[str, tuple[str, str]] = {
    "nup": ("quadratic", "nup"),
    "sp": ("constant", "sp"),
    "sp_inv_depth": ("constant", "sp_inv_depth"),
}


@dataclass(frozen=True)
class Parameterization:
    """A resolved width schedule and hidden-layer scale rule."""

    name: str
    width_schedule: WidthSchedule
    width_schedule_name: str
    hidden_scale: ScaleRule

    def hidden_widths(self, depth: int, width_offset: int = 0) -> list[int]:
        """``[n_1, …, n_{L−1}]`` for ``depth`` weight layers; the schedule is read at ``k + width_offset``."""
        return [int(self.width_schedule(k + width_offset)) for k in range(1, depth)]


def resolve_parameterization(
    parameterization: str | tuple[str | WidthSchedule, str | ScaleRule],
    m: int,
    width_schedule: str | WidthSchedule | None = None,
) -> Parameterization:
    """Resolve a name or a ``(width schedule, scale rule)`` pair; ``width_schedule`` overrides.

    A custom width schedule is a callable ``k ↦ n_k``; a custom scale rule is a callable
    ``ParamInfo ↦ s`` used for hidden weights.
    """
    if isinstance(parameterization, str):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; choose one of {sorted(PARAMETERIZATIONS)} "
                "or pass a (width_schedule, scale_rule) pair"
            )
        name = parameterization
        default_schedule, rule = PARAMETERIZATIONS[parameterization]
    elif isinstance(parameterization, tuple) and len(parameterization) == 2:
        name = "custom"
        default_schedule, rule = parameterization
    else:
        raise ValueError(
            f"parameterization must be a name or a (width_schedule, scale_rule) pair, got {parameterization!r}"
        )

    schedule_spec = default_schedule if width_schedule is None else width_schedule
    if isinstance(schedule_spec, str):
        if schedule_spec not in WIDTH_SCHEDULES:
            raise ValueError(
                f"unknown width schedule {schedule_spec!r}; choose one of {sorted(WIDTH_SCHEDULES)} or pass k -> n_k"
            )
        schedule, schedule_name = WIDTH_SCHEDULES[schedule_spec](m), schedule_spec
    elif callable(schedule_spec):
        schedule, schedule_name = schedule_spec, getattr(schedule_spec, "__name__", "custom")
    else:
        raise ValueError(f"width_schedule must be a name or a callable, got {schedule_spec!r}")

    if isinstance(rule, str):
        if rule not in HIDDEN_SCALE_RULES:
            raise ValueError(
                f"unknown scale rule {rule!r}; choose one of {sorted(HIDDEN_SCALE_RULES)} or pass a callable"
            )
        rule_fn = HIDDEN_SCALE_RULES[rule]
    elif callable(rule):
        rule_fn = rule
    else:
        raise ValueError(f"scale rule must be a name or a callable, got {rule!r}")
    return Parameterization(name, schedule, schedule_name, rule_fn)


def weight_scale(info: ParamInfo, hidden_rule: ScaleRule, readout: str) -> float:
    """``s_P`` of a weight matrix (SPEC §2's table)."""
    if info.role == "input":
        return math.sqrt(info.fan_out)
    if info.role == "hidden":
        return float(hidden_rule(info))
    if info.role == "readout":
        return math.sqrt(info.fan_in) if readout == "mup" else 1.0
    raise ValueError(f"weight_scale got role {info.role!r}")


def bias_scale_of(weight_info: ParamInfo, weight_s: float, sigma_b: float, q_star: float) -> float:
    """``s_b = ρ_k·√(n_k·q*)/σ_b`` with ``ρ_k = s_W/√n_k`` the relative move of the layer's weight."""
    rho = weight_s / math.sqrt(weight_info.fan_out)
    return rho * math.sqrt(weight_info.fan_out * q_star) / sigma_b


DEPTH_NORMALIZERS = ("none", "harmonic")
"""Named depth normalizers; a positive number is also one (every hidden ``s_P`` divided by it)."""


def check_depth_normalizer(value: object) -> None:
    """Raise ValueError unless ``value`` is a named depth normalizer or a positive finite number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (value in DEPTH_NORMALIZERS if isinstance(value, str) else number and math.isfinite(value) and value > 0):
        raise ValueError(f"unknown depth_normalizer {value!r}; choose one of {DEPTH_NORMALIZERS} or a positive number "
                         "(every hidden update scale divided by it, e.g. nup.theory.effective_divisor)")


def layer_rho(widths: list[int], scales: list[float]) -> list[float]:
    """``[ρ_1, …, ρ_{L−1}]``, ``ρ_k = s_k/√n_k``: the relative move of ``h_k`` per unit lr (SPEC §2)."""
    return [s / math.sqrt(n) for s, n in zip(scales[:-1], widths[1:-1])]


@dataclass(frozen=True)
class LayerLayout:
    """A network resolved without its weights: widths ``[n_0 … n_L]``, roles and ``s_P`` of ``W_1 … W_L``."""

    widths: list[int]
    roles: list[Role]
    infos: list[ParamInfo]
    scales: list[float]
    capped: bool
    hidden_divisor: float
    """What every hidden ``s_P`` was divided by: ``T_hidden(L)`` under the harmonic normalizer, the number
    given as one, else 1."""

    @property
    def rho(self) -> list[float]:
        return layer_rho(self.widths, self.scales)


def layer_layout(
    param: Parameterization,
    in_features: int,
    out_features: int,
    depth: int,
    m: int,
    sigma_w: float,
    readout: str = "mup",
    width_offset: int = 0,
    depth_normalizer: str | float = "none",
    max_width: int | None = None,
) -> LayerLayout:
    """Widths and weight scales of a depth-``L`` network (what NuMLP builds, with no allocation).

    ``width_offset`` k0 gives ``n_k = schedule(k + k0)`` (``m·(k + k0)²`` under quadratic);
    ``depth_normalizer="harmonic"`` divides every hidden ``s_P`` by ``T_hidden(L) = Σ_{k=2}^{L−1} ρ_k``, and a
    positive number divides them by that number.
    """
    if not isinstance(width_offset, int) or isinstance(width_offset, bool) or width_offset < 0:
        raise ValueError(f"width_offset must be an integer >= 0, got {width_offset!r}")
    check_depth_normalizer(depth_normalizer)
    hidden = param.hidden_widths(depth, width_offset)
    if any(n < 1 for n in hidden):
        raise ValueError(f"the width schedule gave non-positive widths {hidden}")
    capped = max_width is not None and any(n > max_width for n in hidden)
    if max_width is not None:
        hidden = [min(n, max_width) for n in hidden]
    widths = [in_features, *hidden, out_features]
    roles: list[Role] = ["input" if k == 1 else "readout" if k == depth else "hidden" for k in range(1, depth + 1)]
    infos = [ParamInfo(role, k, widths[k - 1], widths[k], m, depth, sigma_w, widths[1])
             for k, role in zip(range(1, depth + 1), roles)]
    scales = [weight_scale(info, param.hidden_scale, readout) for info in infos]
    divisor = 1.0
    if depth_normalizer == "harmonic" and depth > 2:
        divisor = sum(layer_rho(widths, scales)[1:])
    elif not isinstance(depth_normalizer, str):
        divisor = float(depth_normalizer)
    if divisor != 1.0:
        scales = [s / divisor if role == "hidden" else s for s, role in zip(scales, roles)]
    return LayerLayout(widths, roles, infos, scales, capped, divisor)
