"""Activation functions shared by the kernels, the reference path and the EOC solver.

The piecewise-linear family ``φ(s) = a·s + b·|s|`` (ReLU, absolute value, leaky ReLU,
identity) is one kernel branch with two float parameters; tanh, GELU (exact, erf) and SiLU
are the smooth ones. A derivative at ``s = 0`` takes the left branch ``a − b``, which matches
``torch.relu`` and ``torch.nn.functional.leaky_relu``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Kernel codes for ``ACTIVATION: tl.constexpr``.
LINEAR_ABS, TANH, GELU, SILU = 0, 1, 2, 3
_SMOOTH_CODES = {"tanh": TANH, "gelu": GELU, "silu": SILU}


@dataclass(frozen=True)
class Activation:
    """An activation φ with its derivative.

    ``name`` is ``"linear_abs"`` (then ``a`` and ``b`` are used), ``"tanh"``, ``"gelu"``,
    ``"silu"`` or ``"custom"`` (then ``fn`` is any elementwise callable; its derivative is
    taken by autograd, and it runs on the reference path only).
    """

    name: str
    a: float = 0.0
    b: float = 0.0
    label: str = ""
    fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.name == "linear_abs" and not (math.isfinite(self.a) and math.isfinite(self.b)
                                              and math.isfinite(self.a * self.a + self.b * self.b)):
            raise ValueError(f"activation {self}: a and b must be finite, and a² + b² too "
                             "(σ_w² = 1/(a² + b²)), e.g. linear_abs:0.5,0.5 or leaky_relu:0.1")

    def __str__(self) -> str:
        return self.label or self.name

    @property
    def code(self) -> int:
        """The ``ACTIVATION`` constexpr of the Triton kernels (custom activations have none)."""
        if self.name == "linear_abs":
            return LINEAR_ABS
        if self.name in _SMOOTH_CODES:
            return _SMOOTH_CODES[self.name]
        raise ValueError(f"activation {self} has no Triton kernel; use NUP_BACKEND=reference")

    @property
    def is_linear_abs(self) -> bool:
        return self.name == "linear_abs"

    @property
    def grad_from_output(self) -> bool:
        """True when φ'(h) can be read from y = φ(h), so the backward needs no stored h.

        That holds for the monotone members of the linear_abs family (ReLU, leaky ReLU,
        identity: ``y > 0`` iff ``h > 0``) and for tanh (``φ' = 1 − y²``).
        """
        if self.name == "linear_abs":
            return self.a + self.b > 0 and self.a - self.b >= 0
        return self.name == "tanh"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.name == "linear_abs":
            if (self.a, self.b) == (0.5, 0.5):
                return torch.relu(h)
            if (self.a, self.b) == (1.0, 0.0):
                return h
            return self.a * h + self.b * h.abs()
        if self.name == "tanh":
            return torch.tanh(h)
        if self.name == "gelu":
            return torch.nn.functional.gelu(h)
        if self.name == "silu":
            return torch.nn.functional.silu(h)
        assert self.fn is not None
        return self.fn(h)

    def apply_(self, h: torch.Tensor) -> torch.Tensor:
        """φ(h) written into ``h`` where autograd allows it, else a new tensor as :meth:`__call__`.

        In place for ReLU and tanh (their backward reads φ' from the output; nothing saved ``h``
        before, e.g. ``h = (x Wᵀ)·α``) and identity (``h`` itself): no new ``(…, n)`` tensor per layer.
        """
        if self.name == "linear_abs":
            if (self.a, self.b) == (0.5, 0.5):
                return torch.relu_(h)
            if (self.a, self.b) == (1.0, 0.0):
                return h
        elif self.name == "tanh":
            return torch.tanh_(h)
        return self(h)

    def derivative(self, h: torch.Tensor) -> torch.Tensor:
        """φ'(h), elementwise, in h's dtype."""
        if self.name == "linear_abs":
            return torch.where(h > 0, self.a + self.b, self.a - self.b).to(h.dtype)
        if self.name == "tanh":
            return 1.0 - torch.tanh(h) ** 2
        if self.name == "gelu":
            cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
            return cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        if self.name == "silu":
            sig = torch.sigmoid(h)
            return sig * (1.0 + h * (1.0 - sig))
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(hh).sum(), hh)
        return g

    def derivative_from_output(self, y: torch.Tensor) -> torch.Tensor:
        """φ'(h) read from y = φ(h); only where :attr:`grad_from_output` holds."""
        if not self.grad_from_output:
            raise ValueError(f"φ' of {self} cannot be read from its output")
        if self.name == "tanh":
            return 1.0 - y * y
        return torch.where(y > 0, self.a + self.b, self.a - self.b).to(y.dtype)


def linear_abs(a: float, b: float) -> Activation:
    """``φ(s) = a·s + b·|s|``."""
    return Activation("linear_abs", float(a), float(b), label=f"linear_abs({a:g},{b:g})")


def leaky_relu(negative_slope: float = 0.01) -> Activation:
    """Leaky ReLU as ``a·s + b·|s|`` with ``a = (1+slope)/2``, ``b = (1−slope)/2``."""
    s = float(negative_slope)
    return Activation("linear_abs", (1 + s) / 2, (1 - s) / 2, label=f"leaky_relu({s:g})")


NAMED: dict[str, Activation] = {
    "relu": Activation("linear_abs", 0.5, 0.5, label="relu"),
    "abs": Activation("linear_abs", 0.0, 1.0, label="abs"),
    "identity": Activation("linear_abs", 1.0, 0.0, label="identity"),
    "leaky_relu": leaky_relu(0.01),
    "tanh": Activation("tanh", label="tanh"),
    "gelu": Activation("gelu", label="gelu"),
    "silu": Activation("silu", label="silu"),
}


def get_activation(spec: str | Activation | Callable[[torch.Tensor], torch.Tensor]) -> Activation:
    """Resolve an activation from a name, an :class:`Activation` or a callable.

    Strings: ``relu``, ``abs``, ``identity``, ``tanh``, ``gelu``, ``silu``, ``leaky_relu``,
    ``leaky_relu:SLOPE`` and ``linear_abs:A,B`` (the forms the CLI accepts).
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name, _, arg = spec.partition(":")
        if name == "leaky_relu" and arg or name == "linear_abs":
            try:
                values = [float(v) for v in arg.split(",")]
                if len(values) != (1 if name == "leaky_relu" else 2):
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"cannot parse activation {spec!r}: write leaky_relu:0.1 or linear_abs:0.5,0.5"
                ) from None
            return leaky_relu(*values) if name == "leaky_relu" else linear_abs(*values)
        if name in NAMED and not arg:
            return NAMED[name]
        raise ValueError(
            f"unknown activation {spec!r}; choose one of {sorted(NAMED)}, "
            "leaky_relu:SLOPE, linear_abs:A,B, or pass a callable"
        )
    if callable(spec):
        return Activation("custom", label=getattr(spec, "__name__", "custom"), fn=spec)
    raise TypeError(f"activation must be a name, an Activation or a callable, got {type(spec)}")
