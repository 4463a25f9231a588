"""Fused linear layer with activation: ``y = φ(α·x Wᵀ + bias_scale·b)``, and its backward.

Shapes: ``x`` is ``(B, n_in)``, ``weight`` ``(n_out, n_in)``, ``bias`` ``(n_out,)``, ``y``, ``h``,
``dy`` and ``δ`` ``(B, n_out)``. The forward keeps ``saved``: the output ``y`` itself where
``φ'`` can be read from it (``act.grad_from_output``: ReLU, leaky ReLU, identity, tanh), else the
pre-activation ``h``; no other tensor is stored. The backward kernels recompute
``δ = dy ⊙ φ'`` in their prologue. Matmuls accumulate in fp32; activations run in fp32.
Reductions (``‖G‖²``, ``db``) write per-program fp32 partials summed in a second stage, so
every result is deterministic.

CUDA tensors run the Triton kernels, CPU tensors the reference ops of
:mod:`nup_kernels.reference` (see :func:`nup_kernels.backend.use_triton`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nup_kernels.activations import GELU, LINEAR_ABS, TANH, Activation, get_activation
from nup_kernels.backend import check_inputs, interpreter_active, tl, triton, use_triton

_INTERPRET = interpreter_active()
# Globals read inside kernels must be constexpr.
_LINEAR_ABS, _TANH, _GELU = (tl.constexpr(c) for c in (LINEAR_ABS, TANH, GELU))
_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


def _matmul_configs(rows: str, cols: str, red: str) -> list[triton.Config]:
    """Tile configs for a ``rows × cols`` output reduced over ``red``; one small one in the interpreter."""
    if _INTERPRET:
        return [triton.Config({rows: 32, cols: 32, red: 32, "GROUP": 4}, num_warps=4)]
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
              (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (32, 64, 32, 2, 5)]
    return [
        triton.Config({rows: r, cols: c, red: k, "GROUP": 8}, num_warps=w, num_stages=s)
        for r, c, k, w, s in shapes
    ]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles: ``(pid, pid_m, pid_n)``, all int64."""
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid, pid_m, pid_n


@triton.jit
def _tanh(h):
    e = tl.exp(-2.0 * tl.abs(h))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(h < 0, -t, t)


@triton.jit
def _act(h, act_a, act_b, ACTIVATION: tl.constexpr):
    """``φ(h)`` in fp32."""
    if ACTIVATION == _LINEAR_ABS:
        y = act_a * h + act_b * tl.abs(h)
    elif ACTIVATION == _TANH:
        y = _tanh(h)
    elif ACTIVATION == _GELU:
        y = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    else:  # SILU
        y = h * tl.sigmoid(h)
    return y


@triton.jit
def _act_grad(s, act_a, act_b, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """``φ'(h)`` in fp32, from ``s = h``, or from ``s = y`` when ``FROM_OUTPUT``."""
    if ACTIVATION == _LINEAR_ABS:
        d = tl.where(s > 0, act_a + act_b, act_a - act_b)
    elif ACTIVATION == _TANH:
        if FROM_OUTPUT:
            d = 1.0 - s * s
        else:
            t = _tanh(s)
            d = 1.0 - t * t
    elif ACTIVATION == _GELU:
        d = 0.5 * (1.0 + tl.math.erf(s * _INV_SQRT2)) + s * tl.exp(-0.5 * s * s) * _INV_SQRT2PI
    else:  # SILU
        sig = tl.sigmoid(s)
        d = sig * (1.0 + s * (1.0 - sig))
    return d


@triton.jit
def _delta_tile(dy_ptr, s_ptr, offs_m, offs_n, mask, stride_dym, stride_dyn, stride_sm, stride_sn,
                act_a, act_b, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """``δ = dy ⊙ φ'`` on one ``(BLOCK_M, BLOCK_N)`` tile, fp32, zero outside ``mask``."""
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    return dy.to(tl.float32) * _act_grad(s.to(tl.float32), act_a, act_b, ACTIVATION, FROM_OUTPUT)


@triton.autotune(configs=_matmul_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["M", "N", "K"])
@triton.jit
def _linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_hm, stride_hn,
    alpha, bias_scale, act_a, act_b,
    HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = φ(h)``, ``h = α·x Wᵀ + bias_scale·b``."""
    _, pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    h = acc * tl.cast(alpha, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0).to(tl.float32)
        h += tl.cast(bias_scale, tl.float32) * b[None, :]
    y = _act(h, tl.cast(act_a, tl.float32), tl.cast(act_b, tl.float32), ACTIVATION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn,
                 h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_matmul_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"), key=["M", "N", "K"])
@triton.jit
def _linear_act_bwd_dx_kernel(
    dy_ptr, s_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    alpha, act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_K)`` tile of ``dx = α·(dy ⊙ φ') W``; the ``φ'`` mask is the prologue."""
    _, pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :] * stride_wk
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + rn
        nmask = offs_n < N
        delta = _delta_tile(dy_ptr, s_ptr, offs_m, offs_n, (offs_m[:, None] < M) & nmask[None, :],
                            stride_dym, stride_dyn, stride_sm, stride_sn, a, b, ACTIVATION, FROM_OUTPUT)
        w = tl.load(w_ptrs, mask=nmask[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        acc = tl.dot(delta.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK_N * stride_wn
    dx = acc * tl.cast(alpha, tl.float32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_matmul_configs("BLOCK_N", "BLOCK_K", "BLOCK_M"), key=["M", "N", "K"])
@triton.jit
def _linear_act_bwd_dw_kernel(
    dy_ptr, s_ptr, x_ptr, g_ptr, partial_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_xm, stride_xk, stride_gn, stride_gk,
    alpha, act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_K)`` tile of ``G = α·δᵀ x`` (fp32) and its ``‖tile‖²`` partial."""
    pid, pid_n, pid_k = _tile_ids(N, K, BLOCK_N, BLOCK_K, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + rm
        mmask = offs_m < M
        delta = _delta_tile(dy_ptr, s_ptr, offs_m, offs_n, mmask[:, None] & (offs_n[None, :] < N),
                            stride_dym, stride_dyn, stride_sm, stride_sn, a, b, ACTIVATION, FROM_OUTPUT)
        x = tl.load(x_ptrs, mask=mmask[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(delta.to(x.dtype)), x, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_M * stride_xm
    g = acc * tl.cast(alpha, tl.float32)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(g_ptr + offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gk, g, mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(tl.where(mask, g * g, 0.0), axis=1), axis=0))


@triton.jit
def _linear_act_bias_grad_kernel(
    dy_ptr, s_ptr, partial_ptr,
    M, N,
    stride_dym, stride_dyn, stride_sm, stride_sn,
    act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """Partial ``Σ δ`` over rows ``[pid_m·ROWS, (pid_m+1)·ROWS)``, into ``partial[pid_m, :]``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_M):
        offs_m = pid_m * ROWS + r0 + tl.arange(0, BLOCK_M)
        delta = _delta_tile(dy_ptr, s_ptr, offs_m, offs_n, (offs_m[:, None] < M) & nmask[None, :],
                            stride_dym, stride_dyn, stride_sm, stride_sn, a, b, ACTIVATION, FROM_OUTPUT)
        acc += tl.sum(delta, axis=0)
    tl.store(partial_ptr + pid_m * N + offs_n, acc, mask=nmask)


@triton.jit
def _activation_delta_kernel(
    dy_ptr, s_ptr, out_ptr,
    M, N,
    stride_dym, stride_dyn, stride_sm, stride_sn,
    act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile of ``δ = dy ⊙ φ'`` (fp32, contiguous ``(M, N)``)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    delta = _delta_tile(dy_ptr, s_ptr, offs_m, offs_n, mask, stride_dym, stride_dyn, stride_sm, stride_sn,
                        tl.cast(act_a, tl.float32), tl.cast(act_b, tl.float32), ACTIVATION, FROM_OUTPUT)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], delta, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for fp32 tiles: IEEE unless torch allows TF32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _params(act: Activation | str) -> tuple[Activation, int, float, float]:
    """The activation, its kernel code (a clear error for custom ones) and its (a, b)."""
    act = get_activation(act)
    return act, act.code, act.a, act.b


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_kernel_dtypes(op: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"{op}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}; "
                "cast the tensors, or use linear_act / NUP_BACKEND=reference for other dtypes"
            )


def _check_saved(op: str, dy: torch.Tensor, saved: torch.Tensor) -> None:
    check_inputs(op, dy, saved, ndims=(2, 2))
    _check_kernel_dtypes(op, dy, saved)
    if dy.shape != saved.shape:
        raise ValueError(
            f"{op}: dy has shape {tuple(dy.shape)} but the saved activation has {tuple(saved.shape)}; "
            "pass the `saved` tensor returned by linear_act_forward for this batch"
        )


def _check_linear(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_inputs(op, x, weight, bias, ndims=(2, 2, 1))
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x has {x.shape[1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]} "
            "(weight is (n_out, n_in)); reshape x or transpose the weight"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"{op}: x is {x.dtype} but weight is {weight.dtype}; cast x to the weight's dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; it must be (n_out,) = ({len(weight)},)")


def linear_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    bias_scale: float,
    act: Activation | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = φ(α·x Wᵀ + bias_scale·b)`` in x's dtype, and ``saved`` for the backward.

    ``saved`` is ``y`` itself (the same tensor) when ``act.grad_from_output``, else ``h``.
    """
    _check_linear("linear_act_forward", x, weight, bias)
    _check_kernel_dtypes("linear_act_forward", x, weight, bias)
    act, code, a, b = _params(act)
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    h = y if act.grad_from_output else torch.empty_like(y)
    if y.numel() == 0:
        return y, h
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_act_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, y, h,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        float(alpha), float(bias_scale), a, b,
        HAS_BIAS=bias is not None, STORE_H=not act.grad_from_output, ACTIVATION=code,
        UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(x.dtype),
    )
    return y, h


def linear_act_backward_dx(
    dy: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    act: Activation | str,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dx = α·(dy ⊙ φ') W``, shape ``(B, n_in)``, in ``out_dtype`` (fp32 by default, as the reference)."""
    _check_saved("linear_act_backward_dx", dy, saved)
    check_inputs("linear_act_backward_dx", dy, weight, ndims=(2, 2))
    _check_kernel_dtypes("linear_act_backward_dx", weight)
    if dy.shape[1] != weight.shape[0]:
        raise ValueError(
            f"linear_act_backward_dx: dy has {dy.shape[1]} columns but weight {tuple(weight.shape)} has "
            f"{weight.shape[0]} rows; pass the weight used in the forward"
        )
    act, code, a, b = _params(act)
    (M, N), K = dy.shape, weight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    if dx.numel() == 0:
        return dx
    if N == 0:
        return dx.zero_()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _linear_act_bwd_dx_kernel[grid](
        dy, saved, weight, dx,
        M, N, K,
        dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1), weight.stride(0), weight.stride(1),
        dx.stride(0), dx.stride(1),
        float(alpha), a, b,
        ACTIVATION=code, FROM_OUTPUT=act.grad_from_output,
        UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(weight.dtype),
    )
    return dx


def _max_programs(rows: int, cols: int) -> int:
    """Most programs any dw config launches (the partial buffer's size)."""
    blocks = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in _linear_act_bwd_dw_kernel.configs]
    return max(triton.cdiv(rows, bn) * triton.cdiv(cols, bk) for bn, bk in blocks)


def linear_act_backward_dw(
    dy: torch.Tensor,
    saved: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    act: Activation | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = α·δᵀ x`` (fp32, ``(n_out, n_in)``) and ``‖G‖²`` (fp32, 0-dim), deterministic."""
    _check_saved("linear_act_backward_dw", dy, saved)
    check_inputs("linear_act_backward_dw", dy, x, ndims=(2, 2))
    _check_kernel_dtypes("linear_act_backward_dw", x)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"linear_act_backward_dw: dy has {dy.shape[0]} rows but x has {x.shape[0]}; "
            "pass the layer input x of the same batch"
        )
    act, code, a, b = _params(act)
    (M, N), K = dy.shape, x.shape[1]
    g = torch.empty((N, K), device=dy.device, dtype=torch.float32)
    if g.numel() == 0:
        return g, torch.zeros((), device=dy.device, dtype=torch.float32)
    partials = torch.empty(_max_programs(N, K), device=dy.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _linear_act_bwd_dw_kernel[grid](
        dy, saved, x, g, partials,
        M, N, K,
        dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1), x.stride(0), x.stride(1),
        g.stride(0), g.stride(1),
        float(alpha), a, b,
        ACTIVATION=code, FROM_OUTPUT=act.grad_from_output,
        UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(x.dtype),
    )
    best = _linear_act_bwd_dw_kernel.best_config.kwargs
    used = triton.cdiv(N, best["BLOCK_N"]) * triton.cdiv(K, best["BLOCK_K"])
    return g, partials[:used].sum()


_ELEM_BLOCK = (16, 32) if _INTERPRET else (32, 128)  # (BLOCK_M, BLOCK_N) of the elementwise kernels
_BIAS_ROWS = 32 if _INTERPRET else 1024  # rows summed by one program of the bias-grad kernel


def linear_act_bias_grad(
    dy: torch.Tensor, saved: torch.Tensor, bias_scale: float, act: Activation | str
) -> torch.Tensor:
    """``db = bias_scale·Σ_B (dy ⊙ φ')``, fp32, shape ``(n_out,)``, deterministic."""
    _check_saved("linear_act_bias_grad", dy, saved)
    act, code, a, b = _params(act)
    M, N = dy.shape
    block_m, block_n = _ELEM_BLOCK
    partials = torch.empty((triton.cdiv(M, _BIAS_ROWS), N), device=dy.device, dtype=torch.float32)
    if partials.numel() > 0:
        _linear_act_bias_grad_kernel[(triton.cdiv(N, block_n), partials.shape[0])](
            dy, saved, partials,
            M, N,
            dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1),
            a, b,
            ACTIVATION=code, FROM_OUTPUT=act.grad_from_output,
            BLOCK_M=block_m, BLOCK_N=block_n, ROWS=_BIAS_ROWS,
        )
    return partials.sum(0).mul_(float(bias_scale))


def activation_delta(
    dy: torch.Tensor, saved: torch.Tensor, act: Activation | str, saved_is_output: bool | None = None
) -> torch.Tensor:
    """``δ = dy ⊙ φ'``, fp32, contiguous ``(B, n_out)``.

    ``saved`` is read as y when ``saved_is_output`` (default: ``act.grad_from_output``, which is
    what :func:`linear_act_forward` saves), else as h.
    """
    _check_saved("activation_delta", dy, saved)
    act, code, a, b = _params(act)
    from_output = act.grad_from_output if saved_is_output is None else saved_is_output
    if from_output and not act.grad_from_output:
        raise ValueError(f"activation_delta: φ' of {act} cannot be read from its output; save h instead")
    M, N = dy.shape
    out = torch.empty((M, N), device=dy.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    block_m, block_n = _ELEM_BLOCK
    _activation_delta_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        dy, saved, out,
        M, N,
        dy.stride(0), dy.stride(1), saved.stride(0), saved.stride(1),
        a, b,
        ACTIVATION=code, FROM_OUTPUT=from_output, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return out


# ----------------------------------------------------------------------------- autograd


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
