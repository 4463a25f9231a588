"""Fused linear layer with activation: ``y = φ(α·x Wᵀ + bias_scale·b)``, and its backward.

Shapes: ``x`` is ``(B, n_in)``, ``weight`` ``(n_out, n_in)``, ``bias`` ``(n_out,)``, ``y``, ``h``,
``dy`` and ``δ`` ``(B, n_out)``. The forward keeps ``saved``: the output ``y`` itself where
``φ'`` can be read from it (``act.grad_from_output``: ReLU, leaky ReLU, identity, tanh), else the
pre-activation ``h``; no other tensor is stored. The backward kernels recompute
``δ = dy ⊙ φ'`` in their prologue. Matmuls accumulate in fp32; activations run in fp32.
Reductions (``‖G‖²``, ``db``) write per-program partials summed in a second stage, so
every result is deterministic; ``‖G‖²``'s partials are fp64, each the fp32 sum of squares of its
tile scaled by an exact power of two, unscaled in fp64 (so an extreme but finite gradient gets a
finite, non-zero norm: issue #13). The autograd.Function over these launchers,
:func:`nup_kernels.linear_act_autograd.linear_act`, is its own module.

CUDA tensors run the Triton kernels, CPU tensors the reference ops of
:mod:`nup_kernels.reference` (see :func:`nup_kernels.backend.use_triton`). The kernels are
16/32-bit: float64 operands make each launcher compute the same result with torch ops in
float64 (so a float64 NuMLP runs on the Triton code path, fused included).
"""

from __future__ import annotations

import math

import torch

from nup_kernels.activations import GELU, LINEAR_ABS, TANH, Activation, get_activation
from nup_kernels.backend import check_inputs, fp32_dot_precision, interpreter_active, tl, triton
from nup_kernels.scaled_step import pow2, pow2_64, unit_exponent

_INTERPRET = interpreter_active()
# Globals read inside kernels must be constexpr.
_LINEAR_ABS, _TANH, _GELU = (tl.constexpr(c) for c in (LINEAR_ABS, TANH, GELU))
_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


#: Tile configs ``(rows, cols, reduction, num_warps, num_stages)`` by element size, largest tiles first.
#: Each fits sm_90's 227 KB of shared memory (``stages·(rows + cols)·reduction·size`` bytes; checked
#: by ``benchmarks/compile_check.py``, as are 0 spills: 4 stages, or 4 warps on some tiles, spilled); the
#: 16-row configs serve small batches (more programs).
_TILES = {
    2: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3), (32, 64, 32, 4, 3), (16, 64, 64, 4, 3)],
    4: [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (32, 64, 32, 4, 3), (16, 64, 64, 4, 3)],
}
_INTERPRETER_TILE = (32, 32, 32, 4, 1)  # the interpreter runs one small config


def _matmul_configs(rows: str, cols: str, red: str) -> dict[int, list[triton.Config]]:
    """Configs for a ``rows × cols`` output reduced over ``red``, by element size of the operands."""

    def make(tiles):
        return [triton.Config({rows: r, cols: c, red: k, "GROUP": 8}, num_warps=w, num_stages=s)
                for r, c, k, w, s in tiles]  # fmt: skip

    if _INTERPRET:
        return dict.fromkeys(_TILES, make([_INTERPRETER_TILE]))
    return {size: make(tiles) for size, tiles in _TILES.items()}


def _autotune(rows: str, cols: str, red: str, dtype_arg: str):
    """``triton.autotune`` over the configs of ``dtype_arg``'s element size (and precision); keyed by size buckets."""
    by_size = _matmul_configs(rows, cols, red)

    def prune(configs, named_args, **kwargs):
        size = 2 if named_args[dtype_arg].dtype.itemsize <= 2 else 4
        if size == 4 and kwargs.get("INPUT_PRECISION") == "ieee" and not _INTERPRET:
            return by_size[4][2:]  # IEEE fp32 dots run on FMA: the 128- and 64×128 tiles spill
        return by_size[size]

    configs = list({id(c): c for group in by_size.values() for c in group}.values())
    return triton.autotune(configs=configs, key=["M_KEY", "N_KEY", "K_KEY"],
                           prune_configs_by={"early_config_prune": prune})  # fmt: skip


def _size_keys(*sizes: int) -> tuple[int, ...]:
    """The autotune key: sizes rounded up to a power of two, so a new batch size rarely re-tunes."""
    return tuple(triton.next_power_of_2(max(n, 1)) for n in sizes)


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
def _delta_tile(dy_ptr, s_ptr, dy_offs, s_offs, mask, act_a, act_b,
                ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, GIVEN: tl.constexpr):  # fmt: skip
    """``δ = dy ⊙ φ'`` on one tile, fp32, zero outside ``mask``; ``GIVEN``: ``dy_ptr`` holds δ itself."""
    d = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    if not GIVEN:
        s = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
        d = d * _act_grad(s.to(tl.float32), act_a, act_b, ACTIVATION, FROM_OUTPUT)
    return d


# Register pressure: every kernel keeps one int64 base pointer per operand, advanced along the
# reduction, and int32 in-tile offsets (the launchers check that strides fit); 2-D int64 pointer
# tiles would cost two registers per element.


@_autotune("BLOCK_M", "BLOCK_N", "BLOCK_K", "x_ptr")
@triton.jit(do_not_specialize=["M_KEY", "N_KEY", "K_KEY"])
def _linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, h_ptr,
    M, N, K, M_KEY, N_KEY, K_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_hm, stride_hn,
    alpha, bias_scale, act_a, act_b,
    HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, ACTIVATION: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = φ(h)``, ``h = α·x Wᵀ + bias_scale·b``."""
    _, pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - m0
    n_ok = rn < N - n0
    x_base = x_ptr + m0 * stride_xm
    w_base = w_ptr + n0 * stride_wn
    x_offs = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_offs = rn[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_base + x_offs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + w_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_base += BLOCK_K * stride_xk
        w_base += BLOCK_K * stride_wk
    h = acc * tl.cast(alpha, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + (n0 + rn) * stride_b, mask=n_ok, other=0.0).to(tl.float32)
        h += tl.cast(bias_scale, tl.float32) * b[None, :]
    y = _act(h, tl.cast(act_a, tl.float32), tl.cast(act_b, tl.float32), ACTIVATION)
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + m0 * stride_ym + n0 * stride_yn + (rm[:, None] * stride_ym + rn[None, :] * stride_yn),
             y.to(y_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    if STORE_H:
        tl.store(h_ptr + m0 * stride_hm + n0 * stride_hn + (rm[:, None] * stride_hm + rn[None, :] * stride_hn),
                 h.to(h_ptr.dtype.element_ty), mask=mask)  # fmt: skip


@_autotune("BLOCK_M", "BLOCK_K", "BLOCK_N", "w_ptr")
@triton.jit(do_not_specialize=["M_KEY", "N_KEY", "K_KEY"])
def _linear_act_bwd_dx_kernel(
    dy_ptr, s_ptr, w_ptr, dx_ptr, delta_ptr,
    M, N, K, M_KEY, N_KEY, K_KEY,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    stride_deltam, stride_deltan,
    alpha, act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, DELTA_GIVEN: tl.constexpr, STORE_DELTA: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_K)`` tile of ``dx = α·δ W``, ``δ = dy ⊙ φ'`` fused in the prologue.

    ``DELTA_GIVEN``: ``dy_ptr`` holds δ. ``STORE_DELTA``: the programs of the first column of dx
    tiles (``pid_k = 0``) also store their δ tiles to ``delta_ptr``, each exactly once.
    """
    _, pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP)
    m0 = pid_m * BLOCK_M
    k0 = pid_k * BLOCK_K
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M - m0
    k_ok = rk < K - k0
    dy_base = dy_ptr + m0 * stride_dym
    s_base = s_ptr + m0 * stride_sm
    w_base = w_ptr + k0 * stride_wk
    dy_offs = rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    s_offs = rm[:, None] * stride_sm + rn[None, :] * stride_sn
    w_offs = rn[:, None] * stride_wn + rk[None, :] * stride_wk
    if STORE_DELTA:
        delta_base = delta_ptr + m0 * stride_deltam
        delta_offs = rm[:, None] * stride_deltam + rn[None, :] * stride_deltan
        m_store = rm < tl.where(pid_k == 0, M - m0, 0)  # rows this program stores: all or none
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = rn < N - n0
        delta = _delta_tile(dy_base, s_base, dy_offs, s_offs, m_ok[:, None] & n_ok[None, :], a, b,
                            ACTIVATION, FROM_OUTPUT, DELTA_GIVEN)  # fmt: skip
        if STORE_DELTA:
            tl.store(delta_base + delta_offs, delta.to(delta_ptr.dtype.element_ty),
                     mask=m_store[:, None] & n_ok[None, :])  # fmt: skip
            delta_base += BLOCK_N * stride_deltan
        w = tl.load(w_base + w_offs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        acc = tl.dot(delta.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
        dy_base += BLOCK_N * stride_dyn
        s_base += BLOCK_N * stride_sn
        w_base += BLOCK_N * stride_wn
    dx = acc * tl.cast(alpha, tl.float32)
    tl.store(dx_ptr + m0 * stride_dxm + k0 * stride_dxk + (rm[:, None] * stride_dxm + rk[None, :] * stride_dxk),
             dx.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])  # fmt: skip


@_autotune("BLOCK_N", "BLOCK_K", "BLOCK_M", "x_ptr")
@triton.jit(do_not_specialize=["M_KEY", "N_KEY", "K_KEY"])
def _linear_act_bwd_dw_kernel(
    dy_ptr, s_ptr, x_ptr, g_ptr, partial_ptr,
    M, N, K, M_KEY, N_KEY, K_KEY,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_xm, stride_xk, stride_gn, stride_gk,
    alpha, act_a, act_b,
    ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, DELTA_GIVEN: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_K)`` tile of ``G = α·δᵀ x`` (fp32) and its ``‖tile‖²`` partial (fp64, exact scaling);
    δ cast to x's dtype."""
    pid, pid_n, pid_k = _tile_ids(N, K, BLOCK_N, BLOCK_K, GROUP)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N - n0
    k_ok = rk < K - k0
    dy_base = dy_ptr + n0 * stride_dyn
    s_base = s_ptr + n0 * stride_sn
    x_base = x_ptr + k0 * stride_xk
    dy_offs = rm[:, None] * stride_dym + rn[None, :] * stride_dyn
    s_offs = rm[:, None] * stride_sm + rn[None, :] * stride_sn
    x_offs = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = rm < M - m0
        delta = _delta_tile(dy_base, s_base, dy_offs, s_offs, m_ok[:, None] & n_ok[None, :], a, b,
                            ACTIVATION, FROM_OUTPUT, DELTA_GIVEN)  # fmt: skip
        x = tl.load(x_base + x_offs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(delta.to(x.dtype)), x, acc, input_precision=INPUT_PRECISION)
        dy_base += BLOCK_M * stride_dym
        s_base += BLOCK_M * stride_sm
        x_base += BLOCK_M * stride_xm
    g = acc * tl.cast(alpha, tl.float32)
    mask = n_ok[:, None] & k_ok[None, :]
    tl.store(g_ptr + n0 * stride_gn + k0 * stride_gk + (rn[:, None] * stride_gn + rk[None, :] * stride_gk), g,
             mask=mask)  # fmt: skip
    # ‖tile‖² of any finite fp32 tile: squares of the tile scaled by an exact power of two 2^k (its largest
    # magnitude below 1) sum in fp32 without overflow, and 2^-2k is applied in fp64
    g = tl.where(mask, g, 0.0)
    k = unit_exponent(tl.max(tl.max(tl.abs(g), axis=1), axis=0))
    s = g * pow2(k)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(s * s, axis=1), axis=0).to(tl.float64) * pow2_64(-2 * k))


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
    row0 = pid_m * ROWS
    for r0 in range(row0, tl.minimum(row0 + ROWS, M), BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        delta = _delta_tile(dy_ptr, s_ptr, offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                            offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                            (offs_m[:, None] < M) & nmask[None, :], a, b, ACTIVATION, FROM_OUTPUT, False)  # fmt: skip
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
    a = tl.cast(act_a, tl.float32)
    b = tl.cast(act_b, tl.float32)
    delta = _delta_tile(dy_ptr, s_ptr, offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                        offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask, a, b, ACTIVATION, FROM_OUTPUT,
                        False)  # fmt: skip
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], delta, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: torch's TF32 policy for fp32 tiles (16-bit tiles ignore it)."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


_MAX_TILE = 256  # the largest tile side of any config: in-tile offsets ``stride·(tile − 1)`` must fit int32


def _check_strides(op: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and max(t.stride(), default=0) * _MAX_TILE >= 2**31:
            raise ValueError(
                f"{op}: a tensor of shape {tuple(t.shape)} has stride {max(t.stride())}, too large for the kernels' "
                "int32 tile offsets; pass a contiguous tensor (.contiguous())"
            )


def _params(act: Activation | str) -> tuple[Activation, int, float, float]:
    """The activation, its kernel code (a clear error for custom ones) and its (a, b)."""
    act = get_activation(act)
    return act, act.code, act.a, act.b


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _wide(*tensors: torch.Tensor | None) -> bool:
    """The launcher's float64 route: a float64 operand (the kernels are 16/32-bit) makes it compute the
    same result with torch ops in float64."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _wide_delta(dy: torch.Tensor, saved: torch.Tensor, act: Activation, from_output: bool) -> torch.Tensor:
    """``δ = dy ⊙ φ'`` in float64 (the float64 route), φ' read from ``saved`` as y or as h."""
    s = saved.double()
    return dy.double() * (act.derivative_from_output(s) if from_output else act.derivative(s))


def _check_saved(op: str, dy: torch.Tensor, saved: torch.Tensor) -> None:
    check_inputs(op, dy, saved, ndims=(2, 2))
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

    ``saved`` is ``y`` itself (the same tensor) when ``act.grad_from_output``, else ``h``. float64
    operands: torch ops in float64.
    """
    _check_linear("linear_act_forward", x, weight, bias)
    act, code, a, b = _params(act)
    if _wide(x, weight, bias):
        h = float(alpha) * (x.double() @ weight.double().t())
        if bias is not None:
            h = h + float(bias_scale) * bias.double()
        y = act(h).to(x.dtype)
        return y, y if act.grad_from_output else h.to(x.dtype)
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    h = y if act.grad_from_output else torch.empty_like(y)
    if y.numel() == 0:
        return y, h
    _check_strides("linear_act_forward", x, weight, y, h)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_act_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, y, h,
        M, N, K, *_size_keys(M, N, K),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
        y.stride(0), y.stride(1), h.stride(0), h.stride(1),
        float(alpha), float(bias_scale), a, b,
        HAS_BIAS=bias is not None, STORE_H=not act.grad_from_output, ACTIVATION=code,
        UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(x.dtype),
    )
    return y, h


def _check_delta(op: str, delta: torch.Tensor | None, dy: torch.Tensor) -> None:
    if delta is None:
        return
    check_inputs(op, dy, delta, ndims=(2, 2))
    if delta.shape != dy.shape:
        raise ValueError(
            f"{op}: delta has shape {tuple(delta.shape)} but dy has {tuple(dy.shape)}; pass δ = dy ⊙ φ' of this batch"
        )


def _check_dx(op: str, dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor) -> None:
    _check_saved(op, dy, saved)
    check_inputs(op, dy, weight, ndims=(2, 2))
    if dy.shape[1] != weight.shape[0]:
        raise ValueError(
            f"{op}: dy has {dy.shape[1]} columns but weight {tuple(weight.shape)} has "
            f"{weight.shape[0]} rows; pass the weight used in the forward"
        )


def _launch_dx(dy, saved, weight, alpha, act, out_dtype, delta_in, delta_out) -> torch.Tensor:
    """The dx kernel: δ from ``delta_in`` when given (else from dy and saved), stored to ``delta_out`` when given."""
    act, code, a, b = _params(act)
    src = dy if delta_in is None else delta_in
    if _wide(src, saved, weight):
        delta = delta_in.double() if delta_in is not None else _wide_delta(dy, saved, act, act.grad_from_output)
        if delta_out is not None:
            delta_out.copy_(delta)
        return (float(alpha) * (delta @ weight.double())).to(out_dtype)
    (M, N), K = dy.shape, weight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=out_dtype)
    if dx.numel() == 0:
        return dx
    if N == 0:
        return dx.zero_()
    _check_strides("linear_act_backward_dx", src, saved, weight, dx, delta_out)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    store = delta_out if delta_out is not None else dx
    _linear_act_bwd_dx_kernel[grid](
        src, saved, weight, dx, store,
        M, N, K, *_size_keys(M, N, K),
        src.stride(0), src.stride(1), saved.stride(0), saved.stride(1), weight.stride(0), weight.stride(1),
        dx.stride(0), dx.stride(1), store.stride(0), store.stride(1),
        float(alpha), a, b,
        ACTIVATION=code, FROM_OUTPUT=act.grad_from_output, DELTA_GIVEN=delta_in is not None,
        STORE_DELTA=delta_out is not None, UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(weight.dtype),
    )
    return dx


def linear_act_backward_dx(
    dy: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    act: Activation | str,
    out_dtype: torch.dtype = torch.float32,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dx = α·(dy ⊙ φ') W``, shape ``(B, n_in)``, in ``out_dtype`` (fp32 by default, as the reference).

    ``delta``: ``δ = dy ⊙ φ'`` ``(B, n_out)`` already computed (any kernel dtype); the kernel then
    reads it (cast to the weight's dtype for the matmul) instead of recomputing it from dy and saved.
    """
    _check_dx("linear_act_backward_dx", dy, saved, weight)
    _check_delta("linear_act_backward_dx", delta, dy)
    return _launch_dx(dy, saved, weight, alpha, act, out_dtype, delta, None)


def linear_act_backward_delta_dx(
    dy: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    act: Activation | str,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(δ, dx)`` from one launch: ``δ = dy ⊙ φ'`` (fp32, contiguous ``(B, n_out)``) and ``dx = α·δ W``.

    The dx kernel computes δ in its prologue anyway; the programs of the first column of dx tiles
    store it, each δ tile exactly once (no races). Where ``n_in = 0`` there is no dx tile, and δ
    comes from :func:`activation_delta`. float64 operands: torch ops, δ in float64.
    """
    _check_dx("linear_act_backward_delta_dx", dy, saved, weight)
    if _wide(dy, saved, weight):
        act = get_activation(act)
        delta = _wide_delta(dy, saved, act, act.grad_from_output)
        return delta, (float(alpha) * (delta @ weight.double())).to(out_dtype)
    delta = torch.empty(dy.shape, device=dy.device, dtype=torch.float32)
    if weight.shape[1] == 0 or dy.shape[1] == 0:
        dx = torch.zeros((dy.shape[0], weight.shape[1]), device=dy.device, dtype=out_dtype)
        return activation_delta(dy, saved, act), dx
    return delta, _launch_dx(dy, saved, weight, alpha, act, out_dtype, None, delta)


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
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = α·δᵀ x`` (fp32, ``(n_out, n_in)``) and ``‖G‖²`` (float64, 0-dim: accumulated in fp64, so it
    is finite and non-zero for any non-zero G with finite fp32 entries), deterministic.

    ``delta``: ``δ = dy ⊙ φ'`` already computed; read instead of recomputed (cast to x's dtype).
    float64 operands: torch ops, ``G`` in float64.
    """
    _check_saved("linear_act_backward_dw", dy, saved)
    check_inputs("linear_act_backward_dw", dy, x, ndims=(2, 2))
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"linear_act_backward_dw: dy has {dy.shape[0]} rows but x has {x.shape[0]}; "
            "pass the layer input x of the same batch"
        )
    _check_delta("linear_act_backward_dw", delta, dy)
    act, code, a, b = _params(act)
    if _wide(dy if delta is None else delta, saved, x):
        d = delta.double() if delta is not None else _wide_delta(dy, saved, act, act.grad_from_output)
        g = float(alpha) * (d.t() @ x.double())
        return g, torch.linalg.vector_norm(g).square()
    (M, N), K = dy.shape, x.shape[1]
    g = torch.empty((N, K), device=dy.device, dtype=torch.float32)
    if g.numel() == 0:
        return g, torch.zeros((), device=dy.device, dtype=torch.float32)
    src = dy if delta is None else delta
    _check_strides("linear_act_backward_dw", src, saved, x, g)
    partials = torch.empty(_max_programs(N, K), device=dy.device, dtype=torch.float64)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _linear_act_bwd_dw_kernel[grid](
        src, saved, x, g, partials,
        M, N, K, *_size_keys(M, N, K),
        src.stride(0), src.stride(1), saved.stride(0), saved.stride(1), x.stride(0), x.stride(1),
        g.stride(0), g.stride(1),
        float(alpha), a, b,
        ACTIVATION=code, FROM_OUTPUT=act.grad_from_output, DELTA_GIVEN=delta is not None,
        UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(x.dtype),
    )
    best = _linear_act_bwd_dw_kernel.best_config.kwargs
    used = triton.cdiv(N, best["BLOCK_N"]) * triton.cdiv(K, best["BLOCK_K"])
    return g, partials[:used].sum()


_ELEM_BLOCK = (32, 128)  # (BLOCK_M, BLOCK_N) of the elementwise kernels
_BIAS_ROWS = 1024  # rows summed by one program of the bias-grad kernel (its loop stops at the last row)


def linear_act_bias_grad(
    dy: torch.Tensor, saved: torch.Tensor, bias_scale: float, act: Activation | str
) -> torch.Tensor:
    """``db = bias_scale·Σ_B (dy ⊙ φ')``, fp32 (float64 for float64 operands), shape ``(n_out,)``, deterministic."""
    _check_saved("linear_act_bias_grad", dy, saved)
    act, code, a, b = _params(act)
    if _wide(dy, saved):
        return float(bias_scale) * _wide_delta(dy, saved, act, act.grad_from_output).sum(0)
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
    """``δ = dy ⊙ φ'``, fp32 (float64 for float64 operands), contiguous ``(B, n_out)``.

    ``saved`` is read as y when ``saved_is_output`` (default: ``act.grad_from_output``, which is
    what :func:`linear_act_forward` saves), else as h.
    """
    _check_saved("activation_delta", dy, saved)
    act, code, a, b = _params(act)
    from_output = act.grad_from_output if saved_is_output is None else saved_is_output
    if from_output and not act.grad_from_output:
        raise ValueError(f"activation_delta: φ' of {act} cannot be read from its output; save h instead")
    if _wide(dy, saved):
        return _wide_delta(dy, saved, act, from_output)
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
