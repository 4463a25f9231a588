"""NuMLP: an MLP at the Edge of Chaos in the NTK parameterization (SPEC §1–2).

``h_1 = (σ_w/√n_0)·W_1 x (+ σ_b·b_1)``, ``h_k = (σ_w/√n_{k−1})·W_k φ(h_{k−1}) (+ σ_b·b_k)``,
``f = (c_out/n_{L−1})·W_L φ(h_{L−1})``. Every weight entry starts as N(0, 1); each parameter
carries a :class:`ParamMeta` (layer, role, update scale ``s_P``) that :class:`nup.NuP` reads.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from nup.eoc import EOCPoint, edge_of_chaos
from nup.parameterization import (
    DEFAULT_WIDTH_LIMIT,
    Role,
    WidthSchedule,
    bias_scale_of,
    layer_layout,
    resolve_parameterization,
)
from nup_kernels.activations import NAMED, Activation, get_activation
from nup_kernels.backend import use_triton
from nup_kernels.cpu import ScaledLinearAct, folds_into_blas
from nup_kernels.linear_act_autograd import linear_act

READOUTS = ("mup", "ntk")


@dataclass(frozen=True)
class ParamMeta:
    """What NuP needs to know about a parameter: its layer (1-based), role and scale ``s_P``."""

    layer: int
    role: Role
    scale: float


NATIVE_MAX_INPUT = 1 << 15
"""CPU: a layer input of at most this many entries (128 KB in fp32) takes autograd's own ops, α scaling
``x Wᵀ`` in place and the activation in place where it can be (one small pass over ``h`` forward and over
its gradient backward); a larger one takes :class:`ScaledLinearAct` (α inside the GEMMs, no extra pass,
but a Python autograd Function's host cost per layer). Measured at depth 16, batch 32, one thread,
interleaved: NuMLP + SGD 1.06× plain torch this way, 1.09× with the Function; 1.04–1.05× once the
activation ran in place and the backend check read the environment with one dict lookup; 1.03× with α
kept as a tensor (:meth:`NuLinear.alpha_like`)."""


class NuLinear(nn.Module):
    """One layer ``y = φ(α·x Wᵀ + bias_scale·b)``; x is ``(..., fan_in)``, y is ``(..., fan_out)``."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        alpha: float,
        activation: Activation,
        weight_meta: ParamMeta,
        bias_meta: ParamMeta | None = None,
        bias_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.alpha, self.bias_scale, self.activation = float(alpha), float(bias_scale), activation
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.randn(fan_out)) if bias_meta is not None else None
        self.weight_meta, self.bias_meta = weight_meta, bias_meta
        self.fused_update = None  # set by NuP(fused=True): applies this layer's update in backward
        self._alpha_tensor = torch.tensor(self.alpha)
        self._attach_meta()

    def _attach_meta(self) -> None:
        self.weight._nup_meta = self.weight_meta
        self.weight._nup_layer = weakref.ref(self)
        if self.bias is not None:
            self.bias._nup_meta = self.bias_meta
            self.bias._nup_layer = weakref.ref(self)

    def __setstate__(self, state: dict) -> None:
        # deepcopy rebuilds Parameters without their attributes: put the metadata back.
        super().__setstate__(state)
        if "_alpha_tensor" not in self.__dict__:  # pickled before α was kept as a tensor
            self._alpha_tensor = torch.tensor(self.alpha)
        self._attach_meta()

    def alpha_like(self, h: torch.Tensor) -> torch.Tensor:
        """α as a 0-dim tensor on ``h``'s device, in float64 for a float64 ``h`` and float32 otherwise.

        ``h.mul_(α)`` with a Python float turns α into a tensor and copies it to ``h``'s dtype on every
        call, forward and backward (about 2% of a depth-16, batch-32 CPU step); this tensor is made once.
        The product is the same: a float ``h`` is scaled by α rounded to fp32 either way."""
        a, dtype = self._alpha_tensor, torch.float64 if h.dtype is torch.float64 else torch.float32
        if a.dtype is not dtype or a.device != h.device:
            a = self._alpha_tensor = torch.tensor(self.alpha, dtype=dtype, device=h.device)
        return a

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """``h = α·x Wᵀ + bias_scale·b``, shape ``(..., fan_out)``, in autograd's own ops: α and the bias
        are applied in place on ``x Wᵀ`` (a pass over ``h``, none over ``W`` or ``dW``; nothing more saved)."""
        h = nn.functional.linear(x, self.weight)
        h = h.mul_(self.alpha_like(h))
        return h if self.bias is None else h.add_(self.bias, alpha=self.bias_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_update is not None and torch.is_grad_enabled():
            return self.fused_update(self, x)
        if x.dim() == 2 and x.shape[1] == self.fan_in and folds_into_blas(self.activation) and not use_triton(x):
            if x.numel() <= NATIVE_MAX_INPUT:  # small batch: autograd's C++ nodes beat a Python Function's host cost
                return self.activation.apply_(self.preactivation(x))
            # CPU: α folded into the GEMMs (forward and backward), no pass of its own
            return ScaledLinearAct.apply(x, self.weight, self.bias, self.alpha, self.bias_scale, self.activation)
        return linear_act(x, self.weight, self.bias, self.alpha, self.bias_scale, self.activation)

    def extra_repr(self) -> str:
        role = self.weight_meta.role
        return f"{self.fan_in} -> {self.fan_out}, alpha={self.alpha:.4g}, act={self.activation}, role={role}"


class NuMLP(nn.Module):
    """A depth-``L`` MLP at the EOC with depth-growing hidden widths (νP by default).

    Args:
        in_features, out_features: ``n_0`` and ``n_L``.
        depth: number of weight layers ``L ≥ 2``.
        m: base width; hidden widths follow the width schedule (``m·k²`` under νP).
        width_schedule: ``"quadratic"``, ``"linear"``, ``"constant"`` or ``k ↦ n_k``; None takes
            the parameterization's own.
        activation: a name (``relu``, ``abs``, ``tanh``, ``gelu``, ...), an Activation or a callable.
        parameterization: ``"nup"``, ``"sp"``, ``"sp_inv_depth"`` or a ``(width schedule, scale rule)`` pair.
        bias: add biases ``σ_b·b_k`` to hidden layers (needs ``sigma_b2 > 0``).
        max_width: cap on hidden widths; a capped model says so in :attr:`capped`.
        readout: ``"mup"`` (``c_out/n_{L−1}``, default) or ``"ntk"`` (``c_out/√n_{L−1}``).
        sigma_b2: ``σ_b²`` of the EOC point (0 for the ``a·s + b·|s|`` family).
        c_out: readout multiplier.
        width_offset: ``k0 ≥ 0``; hidden widths are the schedule at ``k + k0`` (``m·(k + k0)²``).
        depth_normalizer: ``"none"``, ``"harmonic"`` (every hidden ``s_P`` divided by
            ``T_hidden(L) = Σ_{k=2}^{L−1} ρ_k``, so the hidden block moves like one layer at any depth) or a
            positive number to divide them by (:func:`nup.theory.effective_divisor` makes the hidden
            block's minibatch move that of one layer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        m: int,
        width_schedule: str | WidthSchedule | None = None,
        activation: str | Activation = "relu",
        parameterization: str | tuple = "nup",
        bias: bool = False,
        max_width: int | None = None,
        readout: str = "mup",
        sigma_b2: float = 0.0,
        c_out: float = 1.0,
        width_offset: int = 0,
        depth_normalizer: str | float = "none",
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_features", in_features, 1),
            ("out_features", out_features, 1),
            ("depth", depth, 2),
            ("m", m, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
        if max_width is not None and max_width < 1:
            raise ValueError(f"max_width must be a positive integer or None, got {max_width!r}")
        if bias and sigma_b2 <= 0:
            raise ValueError("bias=True needs sigma_b2 > 0 (biases enter as σ_b·b_k); set sigma_b2, or use bias=False")
        act = get_activation(activation)
        self.activation = act
        self.eoc: EOCPoint = edge_of_chaos(act, sigma_b2)
        self.param = resolve_parameterization(parameterization, m, width_schedule)
        sigma_w, sigma_b = self.eoc.sigma_w, math.sqrt(sigma_b2)
        self.layout = layer_layout(self.param, in_features, out_features, depth, m, sigma_w, readout,
                                   width_offset, depth_normalizer, max_width)
        self.capped = self.layout.capped
        if max_width is None and max(self.layout.widths[1:-1], default=0) > DEFAULT_WIDTH_LIMIT:
            raise ValueError(
                f"hidden width {max(self.layout.widths[1:-1])} exceeds {DEFAULT_WIDTH_LIMIT}; pass max_width=N to "
                "cap the widths explicitly (the model then reports capped=True), or lower m, width_offset or depth"
            )
        self.depth, self.m, self.readout, self.c_out = depth, m, readout, float(c_out)
        self.width_offset, self.depth_normalizer = width_offset, depth_normalizer
        self.widths = list(self.layout.widths)
        identity = NAMED["identity"]
        layers = []
        for k, (info, s_w) in enumerate(zip(self.layout.infos, self.layout.scales), start=1):
            fan_in, fan_out, role = info.fan_in, info.fan_out, info.role
            w_meta = ParamMeta(k, role, s_w)
            if role == "readout":
                alpha = self.c_out / (fan_in if readout == "mup" else math.sqrt(fan_in))
                layers.append(NuLinear(fan_in, fan_out, alpha, identity, w_meta))
                continue
            b_meta = ParamMeta(k, "bias", bias_scale_of(info, s_w, sigma_b, self.eoc.q_star)) if bias else None
            layers.append(NuLinear(fan_in, fan_out, sigma_w / math.sqrt(fan_in), act, w_meta, b_meta, sigma_b))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in_features)`` → ``(..., out_features)``."""
        if x.shape[-1] != self.widths[0]:
            raise ValueError(
                f"NuMLP expects inputs of shape (..., {self.widths[0]}), got {tuple(x.shape)}; flatten or reshape them"
            )
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[h_1, …, h_{L−1}, f]``: every layer's pre-activation, then the output."""
        out = []
        for layer in self.layers:
            h = layer.preactivation(x)
            out.append(h)
            x = layer.activation(h)
        return out

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, parameterization={self.param.name}, width_offset={self.width_offset}, "
                f"depth_normalizer={self.depth_normalizer}, capped={self.capped}")
