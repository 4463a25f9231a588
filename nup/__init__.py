"""nup: νP (Normalized Update Parameterization) for deep MLPs at the Edge of Chaos.

The model (:class:`NuMLP`), the optimizer with per-layer update geometry (:class:`NuP`), the
geometry-aware learning-rate schedules (:class:`RandomWalkLR`, the default; :class:`GeometryAwareLR`,
SPEC's original) and the EOC solver.
"""

from nup.eoc import EOCPoint, correlation_map, edge_of_chaos
from nup.graphed import graphed_step
from nup.model import NuLinear, NuMLP, ParamMeta
from nup.optim import NuP
from nup.schedule import (
    SCHEDULES,
    ConstantSchedule,
    GeometryAwareLR,
    MultiplierSchedule,
    RandomWalkLR,
    ReplaySchedule,
    SharpnessTargetLR,
    WarmupCosineSchedule,
    make_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "EOCPoint",
    "correlation_map",
    "edge_of_chaos",
    "graphed_step",
    "NuLinear",
    "NuMLP",
    "ParamMeta",
    "NuP",
    "SCHEDULES",
    "ConstantSchedule",
    "GeometryAwareLR",
    "MultiplierSchedule",
    "RandomWalkLR",
    "ReplaySchedule",
    "SharpnessTargetLR",
    "WarmupCosineSchedule",
    "make_schedule",
]
