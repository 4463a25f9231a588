"""The autograd face of :mod:`nup_kernels.linear_act`: ``linear_act(x, W, b, α, bias_scale, φ)``.

On the Triton path :class:`LinearActFunction` runs the forward kernel and, in the backward, the
dx, dW and bias-grad kernels (first derivatives only); elsewhere plain torch ops, so double
backward works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nup_kernels.activations import Activation, get_activation
from nup_kernels.backend import use_triton
from nup_kernels.linear_act import (
    _KERNEL_DTYPES,
    _check_linear,
    linear_act_backward_dw,
    linear_act_backward_dx,
    linear_act_bias_grad,
    linear_act_forward,
)


class LinearActFunction(torch.autograd.Function):
    """Autograd for ``φ(α·x Wᵀ + bias_scale·b)`` on 2-D ``x`` through the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, bias_scale, act):
        y, saved = linear_act_forward(x, weight, bias, alpha, bias_scale, act)
        ctx.save_for_backward(x, weight, saved)
        ctx.alpha, ctx.bias_scale, ctx.act = alpha, bias_scale, act
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, saved = ctx.saved_tensors
        act, alpha = ctx.act, ctx.alpha
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = linear_act_backward_dx(dy, saved, weight, alpha, act, out_dtype=x.dtype)
        if need_w:
            dw = linear_act_backward_dw(dy, saved, x, alpha, act)[0].to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = linear_act_bias_grad(dy, saved, ctx.bias_scale, act).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    bias_scale: float = 1.0,
    activation: Activation | str | Callable[[torch.Tensor], torch.Tensor] = "relu",
) -> torch.Tensor:
    """``φ(α·x Wᵀ + bias_scale·b)``, autograd-aware; ``x`` is ``(..., n_in)``, the result ``(..., n_out)``.

    On the Triton path the backward runs the kernels (first derivatives only). Elsewhere (CPU
    tensors, custom activations, float64) it is plain torch ops, so Hessian-vector products
    and double backward work. Gradients w.r.t. ``weight`` and ``bias`` come in their dtypes.
    """
    act = get_activation(activation)
    if x.dim() == 0:
        raise ValueError("linear_act: x must have at least one dimension (..., n_in)")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    _check_linear("linear_act", x2d, weight, bias)
    if use_triton(x2d) and act.name != "custom" and x2d.dtype in _KERNEL_DTYPES:
        y = LinearActFunction.apply(x2d, weight, bias, float(alpha), float(bias_scale), act)
    else:
        h = float(alpha) * torch.nn.functional.linear(x2d, weight)
        y = act(h if bias is None else h + float(bias_scale) * bias)
    return y.reshape(*lead, weight.shape[0])
