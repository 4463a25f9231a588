"""The pure-PyTorch oracle of every kernel, which is also the CPU path.

Shapes: ``x`` is ``(B, n_in)``, ``weight`` and ``grad`` are ``(n_out, n_in)``, ``h``, ``y``,
``dy`` and ``delta`` are ``(B, n_out)``. Nothing here syncs with the host.

Extreme but finite gradients (issue #13): norms and the multi-tensor sums are accumulated and
returned in float64, where the square of any finite fp32/bf16/fp16 value neither overflows nor
underflows, and updates form ``coef·G`` in float64 (``coef`` may lie outside fp32's range) and
round once to the parameter's dtype, as the kernels' fp64 statistics and exact power-of-two
scaled steps do.
"""

from __future__ import annotations

import torch

from nup_kernels.activations import Activation


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """The arithmetic of an update or reduction over ``t``: float64 for float64 tensors, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    bias_scale: float,
    act: Activation,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = α·x Wᵀ + bias_scale·b`` and ``y = φ(h)``, computed in fp32, returned in x's dtype."""
    h = alpha * (x.float() @ weight.float().t())
    if bias is not None:
        h = h + bias_scale * bias.float()
    y = act(h)
    return y.to(x.dtype), h.to(x.dtype)


def activation_delta(dy: torch.Tensor, saved: torch.Tensor, act: Activation, saved_is_output: bool) -> torch.Tensor:
    """``δ = dy ⊙ φ'(h)`` in fp32, where ``saved`` is h, or y when ``saved_is_output``."""
    s = saved.float()
    dphi = act.derivative_from_output(s) if saved_is_output else act.derivative(s)
    return dy.float() * dphi


def linear_act_backward_dx(delta: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``dx = α·δ W``, fp32, shape ``(B, n_in)``."""
    return alpha * (delta.float() @ weight.float())


def linear_act_backward_dw(delta: torch.Tensor, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = α·δᵀ x`` (fp32, ``(n_out, n_in)``) and ``‖G‖²`` (float64, 0-dim: finite for any finite ``G``)."""
    g = alpha * (delta.float().t() @ x.float())
    return g, torch.linalg.vector_norm(g, dtype=torch.float64).square()


def bias_grad(delta: torch.Tensor, bias_scale: float) -> torch.Tensor:
    """``db = bias_scale·Σ_B δ``, fp32 (float64 for a float64 δ), shape ``(n_out,)``."""
    return bias_scale * delta.to(accumulate_dtype(delta)).sum(0)


def grad_norm_sq_gram(x: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``‖α·δᵀx‖²_F = α²·⟨x xᵀ, δ δᵀ⟩_F`` from two B×B Gram matrices (float64, 0-dim); G is never formed."""
    xf, df = x.double(), delta.double()
    return (float(alpha) ** 2) * ((xf @ xf.t()) * (df @ df.t())).sum()


def apply_update(
    weight: torch.Tensor,
    cumulative: torch.Tensor,
    coef: torch.Tensor,
    *,
    grad: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    alpha: float = 1.0,
    cumulative_is_init: bool = False,
) -> torch.Tensor:
    """Apply ``ΔW = coef·G`` to W and to the cumulative update, in place; return ``⟨ΔW, C_old⟩``.

    ``G`` is ``grad`` (materialized) or the rank-B product ``α·δᵀx`` (small batch). ``coef`` is
    a 0-dim fp32 or float64 tensor, ``−η·s/‖G‖`` (float64 when it may leave fp32's range), or 0 to
    skip: a skipped update leaves W and C bit-identical, even when G holds NaN or Inf. The step
    ``coef·G`` and the new values are formed in float64 and rounded once to W's and C's dtypes. With
    ``cumulative_is_init`` the buffer holds ``P_0`` (fp32 weights only) and ``C_old = W − P_0``; it
    is then left untouched. Returns an fp32 0-dim tensor.
    """
    if grad is None:
        assert x is not None and delta is not None
        kind = accumulate_dtype(weight)  # G in fp32, or float64 for float64 weights
        grad = alpha * (delta.to(kind).t() @ x.to(kind))
    acc = torch.float64
    step = coef.to(acc) * grad.to(acc)
    keep = coef == 0
    c_old = weight.to(acc) - cumulative.to(acc) if cumulative_is_init else cumulative.to(acc)
    dot = torch.where(keep, 0.0, step * c_old).sum().float()
    weight.copy_(torch.where(keep, weight, (weight.to(acc) + step).to(weight.dtype)))  # kept: every bit
    if not cumulative_is_init:
        cumulative.copy_(torch.where(keep, cumulative, (c_old + step).to(cumulative.dtype)))
    return dot


def multi_tensor_reduce(
    directions: list[torch.Tensor], cumulatives: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor ``‖D‖²``, ``⟨D, C⟩`` and ``‖C‖²``, each a float64 vector of length ``len(D)``, accumulated
    in float64 (for 16/32-bit tensors: finite and non-zero for any finite non-zero ``D``)."""
    if not directions:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone(), empty.clone()
    d_sq = torch.stack([torch.linalg.vector_norm(d, dtype=torch.float64).square() for d in directions])
    dc = torch.stack([(d.double() * c.double()).sum() for d, c in zip(directions, cumulatives)])
    c_sq = torch.stack([torch.linalg.vector_norm(c, dtype=torch.float64).square() for c in cumulatives])
    return d_sq, dc, c_sq


def multi_tensor_apply(
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
    cumulatives: list[torch.Tensor],
    coefs: torch.Tensor,
) -> None:
    """``P += coef_i·D``, ``C += coef_i·D`` for every tensor i, in place.

    ``coefs`` is an fp32 or float64 vector; the step and the new values are formed in float64 and rounded
    once to each tensor's dtype. A zero coefficient leaves that P and C bit-identical.
    """
    for i, (p, d, c) in enumerate(zip(params, directions, cumulatives)):
        coef, acc = coefs[i], torch.float64
        keep = coef == 0
        step = coef.to(acc) * d.to(acc)
        p.copy_(torch.where(keep, p, (p.to(acc) + step).to(p.dtype)))  # kept: every bit
        c.copy_(torch.where(keep, c, (c.to(acc) + step).to(c.dtype)))
