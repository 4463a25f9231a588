"""The in-place update ``W += coef·G``, ``C += coef·G`` in one pass, returning ``⟨ΔW, C_old⟩``.

Shapes: ``weight``, ``cumulative`` and ``grad`` are ``(n_out, n_in)``; ``x`` is ``(B, n_in)``
and ``delta`` ``(B, n_out)``. Any strides are accepted, in-place tensors included.

Two kernels, one pass over the W and C tiles each:

- materialized: reads the ``G`` tile;
- small batch: recomputes the rank-B tile ``α·δᵀx`` in registers with ``tl.dot`` (``K = B``,
  padded to ≥ 16 with masks), so ``G`` is never stored: 2 fewer parameter-sized passes for
  about ``2·B·P`` more FLOPs.

The coefficient ``coef = −η·s/‖G‖`` is formed inside the kernel from the ``‖G‖²`` partials and
the per-step rate table (:func:`apply_normalized_update`), so a layer's update is one launch and
no host sync. Extreme but finite gradients take their step (issue #13): the partials are summed in
fp64 (the Gram and dW kernels write fp64 partials), ``coef`` is formed in fp64 (it may lie outside
fp32's range: ``‖G‖`` runs from about 1e-45 to 1e42) and applied as an exact power of two times an
fp32 factor (:mod:`nup_kernels.scaled_step`), so the step ``coef·G`` keeps fp32 accuracy without
per-element fp64 arithmetic. float64 weights take the torch branch (float64 arithmetic).

Each program writes its tile's ``⟨ΔW, C_old⟩`` to a partials row that the optimizer sums once per
step (deterministic). A zero ``coef`` selects the old values with ``tl.where``, so W
and C stay bit-identical even when G or δ hold NaN or Inf. The kernels update in place and run
with pinned configs (never autotuned). :func:`apply_bias_update` does a bias's whole update
(its gradient from δ included) in one single-program launch. :func:`apply_update` takes a given
``coef`` (the tests' entry point and the oracle's twin).
"""

from __future__ import annotations

import math

import torch

from nup_kernels import reference
from nup_kernels.backend import (
    check_inputs,
    env_value,
    interpreter_active,
    requested_backend,
    tl,
    triton,
    use_triton,
)
from nup_kernels.gram_norm import dot_precision
from nup_kernels.scaled_step import FP32_MAX, LEAST_SUBNORMAL, normalized_coefficient, split_coefficient

UPDATE_PATHS = ("small_batch", "materialized")
#: Largest batch for which ``choose_update_path`` picks the small-batch kernel, by element size.
#: The recompute adds ``2·B·P`` FLOPs and saves two passes of ``P`` elements, so it pays while
#: ``B`` stays under about the chip's FLOP/byte ratio times the element size (several hundred
#: in bf16 on an H200); fp32 without TF32 runs tl.dot far slower, hence the lower bound.
SMALL_BATCH_MAX = {2: 256, 4: 64}

_MATERIALIZED = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8}
_SMALL_BATCH = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}
_MAX_STEP = 1.844674352395373e19  # √(fp32 max), nup.step_core.MAX_STEP: a larger step overflows ‖ΔP‖²
_PART_BLOCK = 16  # ‖G‖² partials summed per loop step inside the apply kernels


@triton.jit
def _coefficient(g_sq_ptr, n_part, g_sq_scale, rates_ptr, index, PART_BLOCK: tl.constexpr):
    """``(coef, ‖G‖)``: ``‖G‖² = g_sq_scale·Σ partials`` in fp64 (clamped at 0), ``coef = −(rates[i,0]/‖G‖ +
    rates[i,1])`` in fp64, or 0 to skip (see ``normalized_coefficient``); ``‖G‖`` as recorded (fp32)."""
    acc = tl.zeros((PART_BLOCK,), dtype=tl.float64)
    for p0 in range(0, n_part, PART_BLOCK):
        offs = p0 + tl.arange(0, PART_BLOCK)
        acc += tl.load(g_sq_ptr + offs, mask=offs < n_part, other=0.0).to(tl.float64)  # fp64 or fp32 partials
    g_sq = tl.maximum(tl.sum(acc) * tl.cast(g_sq_scale, tl.float64), 0.0)
    a = tl.load(rates_ptr + 2 * index)
    b = tl.load(rates_ptr + 2 * index + 1)
    return normalized_coefficient(tl.sqrt(g_sq), a, b)


@triton.jit
def _record_norm(d_norm_ptr, index, norm):
    """Program ``(0, 0)`` writes the recorded ``‖G‖`` (early: the register is free for the tile)."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(d_norm_ptr + index, norm)


@triton.jit
def _apply_tile(
    g,
    keep,
    lo,
    w_ptr,
    c_ptr,
    dot_ptr,
    row0,
    col0,
    n_out,
    n_in,
    stride_wm,
    stride_wn,
    stride_cm,
    stride_cn,
    CUMULATIVE_IS_INIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Update the tile at ``(row0, col0)`` of W and C by ``g·lo``, where ``g`` is the tile of ``hi·G`` and
    ``coef = hi·lo`` (``keep``: ``coef`` is 0, W and C keep every bit); store its ``⟨ΔW, C_old⟩`` partial.

    Base pointers are int64 (``row0``, ``col0``), offsets inside the tile int32.
    """
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    mask = ((row0 + r)[:, None] < n_out) & ((col0 + c)[None, :] < n_in)
    step = g * lo  # hi·G was exact (hi a power of two): coef·G with one rounding, for any fp64 coef
    w_ptrs = (w_ptr + row0 * stride_wm + col0 * stride_wn) + (r[:, None] * stride_wm + c[None, :] * stride_wn)
    c_ptrs = (c_ptr + row0 * stride_cm + col0 * stride_cn) + (r[:, None] * stride_cm + c[None, :] * stride_cn)
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    cu = tl.load(c_ptrs, mask=mask, other=0.0)
    w32 = w.to(tl.float32)
    if CUMULATIVE_IS_INIT:
        c_old = w32 - cu.to(tl.float32)
    else:
        c_old = cu.to(tl.float32)
    dot = tl.where(keep, 0.0, tl.where(mask, step * c_old, 0.0))
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(dot_ptr + slot, tl.sum(dot))
    tl.store(w_ptrs, tl.where(keep, w, (w32 + step).to(w.dtype)), mask=mask)
    if not CUMULATIVE_IS_INIT:
        tl.store(c_ptrs, tl.where(keep, cu, (c_old + step).to(cu.dtype)), mask=mask)


@triton.jit
def _apply_materialized_kernel(
    w_ptr, c_ptr, g_ptr, g_sq_ptr, rates_ptr, d_norm_ptr, dot_ptr,
    n_part, g_sq_scale, index, n_out, n_in,
    stride_wm, stride_wn, stride_cm, stride_cn, stride_gm, stride_gn,
    CUMULATIVE_IS_INIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART_BLOCK: tl.constexpr,
):  # fmt: skip
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    mask = ((row0 + r)[:, None] < n_out) & ((col0 + c)[None, :] < n_in)
    coef, norm = _coefficient(g_sq_ptr, n_part, g_sq_scale, rates_ptr, index, PART_BLOCK)
    _record_norm(d_norm_ptr, index, norm)
    hi, lo = split_coefficient(coef)
    g_ptrs = (g_ptr + row0 * stride_gm + col0 * stride_gn) + (r[:, None] * stride_gm + c[None, :] * stride_gn)
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    _apply_tile(
        g.to(tl.float32) * hi, coef == 0.0, lo, w_ptr, c_ptr, dot_ptr, row0, col0, n_out, n_in,
        stride_wm, stride_wn, stride_cm, stride_cn, CUMULATIVE_IS_INIT, BLOCK_M, BLOCK_N,
    )


@triton.jit
def _apply_small_batch_kernel(
    w_ptr, c_ptr, x_ptr, d_ptr, g_sq_ptr, rates_ptr, d_norm_ptr, dot_ptr,
    n_part, g_sq_scale, index, alpha, batch, n_out, n_in,
    stride_wm, stride_wn, stride_cm, stride_cn, stride_xb, stride_xn, stride_db, stride_dm,
    CUMULATIVE_IS_INIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PART_BLOCK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    row_mask = row0 + r < n_out
    col_mask = col0 + c < n_in
    ks = tl.arange(0, BLOCK_K)
    d_base = d_ptr + row0 * stride_dm
    x_base = x_ptr + col0 * stride_xn
    coef, norm = _coefficient(g_sq_ptr, n_part, g_sq_scale, rates_ptr, index, PART_BLOCK)
    _record_norm(d_norm_ptr, index, norm)
    hi, lo = split_coefficient(coef)
    # a 16-bit x: δ is cast to its dtype for the dot, so hi is folded into δ first (exact): the recomputed tile
    # is hi·δᵀx, at the step's scale rather than the gradient's, and δ does not overflow or underflow there
    DELTA_HI: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, batch, BLOCK_K):
        kmask = k0 + ks < batch
        d = tl.load(
            d_base + ((k0 + ks)[:, None] * stride_db + r[None, :] * stride_dm),
            mask=kmask[:, None] & row_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            x_base + ((k0 + ks)[:, None] * stride_xb + c[None, :] * stride_xn),
            mask=kmask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if DELTA_HI:
            d = d.to(tl.float32) * hi
        if UPCAST:
            d, x = d.to(tl.float32), x.to(tl.float32)
        else:
            d = d.to(x.dtype)  # δ in the weight's dtype: a 16-bit dot runs on tensor cores, x is never upcast
        acc += tl.dot(tl.trans(d), x, input_precision=PREC)
    g = (acc * alpha).to(tl.float32)  # alpha arrives as fp64 under torch.compile
    if not DELTA_HI:
        g = g * hi
    _apply_tile(
        g, coef == 0.0, lo, w_ptr, c_ptr, dot_ptr, row0, col0, n_out, n_in,
        stride_wm, stride_wn, stride_cm, stride_cn, CUMULATIVE_IS_INIT, BLOCK_M, BLOCK_N,
    )


@triton.jit
def _apply_bias_kernel(
    b_ptr, c_ptr, d_ptr, db_ptr, rates_ptr, d_norm_ptr, dot_ptr,
    bias_scale, index, batch, n_out, stride_db, stride_dm,
    CUMULATIVE_IS_INIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: ``db = bias_scale·Σ_B δ`` into ``db_ptr``, ``‖db‖`` (fp64), then ``b, C += coef·db``,
    ``⟨Δb, C_old⟩``."""
    bs = tl.arange(0, BLOCK_B)
    ns = tl.arange(0, BLOCK_N)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for n0 in range(0, n_out, BLOCK_N):
        nmask = n0 + ns < n_out
        col = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for b0 in range(0, batch, BLOCK_B):
            bmask = b0 + bs < batch
            offs = (b0 + bs).to(tl.int64)[:, None] * stride_db + (n0 + ns).to(tl.int64)[None, :] * stride_dm
            col += tl.sum(tl.load(d_ptr + offs, mask=bmask[:, None] & nmask[None, :], other=0.0).to(tl.float32), 0)
        col = (col * bias_scale).to(tl.float32)
        tl.store(db_ptr + n0 + ns, col, mask=nmask)
        col64 = col.to(tl.float64)
        sq += col64 * col64
    coef, norm = normalized_coefficient(
        tl.sqrt(tl.sum(sq)), tl.load(rates_ptr + 2 * index), tl.load(rates_ptr + 2 * index + 1)
    )
    keep = coef == 0.0
    hi, lo = split_coefficient(coef)
    dots = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, n_out, BLOCK_N):
        nmask = n0 + ns < n_out
        g = tl.load(db_ptr + n0 + ns, mask=nmask, other=0.0)
        b = tl.load(b_ptr + n0 + ns, mask=nmask, other=0.0)
        cu = tl.load(c_ptr + n0 + ns, mask=nmask, other=0.0)
        b32 = b.to(tl.float32)
        if CUMULATIVE_IS_INIT:
            c_old = b32 - cu.to(tl.float32)
        else:
            c_old = cu.to(tl.float32)
        step = (g * hi) * lo  # coef·g with one rounding, as in _apply_tile
        dots += tl.where(nmask, tl.where(keep, 0.0, step * c_old), 0.0)
        tl.store(b_ptr + n0 + ns, tl.where(keep, b, (b32 + step).to(b.dtype)), mask=nmask)
        if not CUMULATIVE_IS_INIT:
            tl.store(c_ptr + n0 + ns, tl.where(keep, cu, (c_old + step).to(cu.dtype)), mask=nmask)
    tl.store(dot_ptr, tl.sum(dots))
    tl.store(d_norm_ptr + index, norm)


def choose_update_path(
    batch: int, n_out: int, n_in: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> str:
    """``"small_batch"`` or ``"materialized"`` for a layer ``(n_out, n_in)`` at batch ``batch``.

    ``NUP_UPDATE_PATH=small_batch|materialized`` forces the answer. On CPU (``device``) it is
    ``"materialized"``: BLAS makes ``G`` at the cost of one pass, while the rank-B recompute is
    FLOP-bound there from batch ≈ 32. Otherwise the small-batch path is chosen while
    ``batch ≤ SMALL_BATCH_MAX`` for the weight's element size: 256 for 16-bit dtypes, 64 for
    fp32. ``n_out`` and ``n_in`` are validated and kept for a shape-aware crossover.
    """
    forced = env_value("NUP_UPDATE_PATH").strip().lower()
    if forced:
        if forced not in UPDATE_PATHS:
            raise ValueError(f"NUP_UPDATE_PATH={forced!r} is not one of {UPDATE_PATHS}; unset it or pick one")
        return forced
    if min(batch, n_out, n_in) < 0:
        raise ValueError(f"choose_update_path: negative size in batch={batch}, n_out={n_out}, n_in={n_in}")
    if device is not None and torch.device(device).type == "cpu" and requested_backend() != "triton":
        return "materialized"
    limit = SMALL_BATCH_MAX[2 if dtype.itemsize <= 2 else 4]
    return "small_batch" if batch <= limit else "materialized"


def _grid(n_out: int, n_in: int, config: dict) -> tuple[int, int]:
    return triton.cdiv(n_out, config["BLOCK_M"]), triton.cdiv(n_in, config["BLOCK_N"])


def max_programs(n_out: int, n_in: int) -> int:
    """Programs (and ``⟨ΔW, C⟩`` partials) the apply kernels launch for a ``(n_out, n_in)`` weight."""
    return max(math.prod(_grid(n_out, n_in, cfg)) for cfg in (_MATERIALIZED, _SMALL_BATCH))


def _check(
    weight: torch.Tensor,
    cumulative: torch.Tensor,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    x: torch.Tensor | None,
    delta: torch.Tensor | None,
    cumulative_is_init: bool,
) -> None:
    check_inputs("apply_update", weight, cumulative, grad, ndims=(2, 2, 2))
    check_inputs("apply_update", weight, x, delta, ndims=(2, 2, 2))
    if cumulative.shape != weight.shape:
        raise ValueError(
            f"apply_update: cumulative {tuple(cumulative.shape)} != weight {tuple(weight.shape)}"
        )
    if coef is not None:
        if not isinstance(coef, torch.Tensor) or coef.numel() != 1 or coef.dtype != torch.float32:
            raise TypeError("apply_update: coef must be a 1-element fp32 tensor on the weight's device")
        if coef.device != weight.device:
            raise ValueError(f"apply_update: coef is on {coef.device} but weight is on {weight.device}")
    if cumulative_is_init and weight.dtype != torch.float32:
        raise ValueError(
            f"apply_update: cumulative_is_init needs fp32 weights, got {weight.dtype}: in 16-bit, "
            "W − P_0 cancels catastrophically; store the cumulative update instead"
        )
    if grad is not None:
        if grad.shape != weight.shape:
            raise ValueError(f"apply_update: grad {tuple(grad.shape)} != weight {tuple(weight.shape)}")
        return
    if x is None or delta is None:
        raise ValueError("apply_update: pass grad (materialized) or both x and delta (small batch)")
    n_out, n_in = weight.shape
    if x.shape[1] != n_in or delta.shape[1] != n_out or x.shape[0] != delta.shape[0]:
        raise ValueError(
            f"apply_update: x {tuple(x.shape)} and delta {tuple(delta.shape)} do not match weight "
            f"{tuple(weight.shape)}; need x (B, n_in) and delta (B, n_out)"
        )


def _coefficient_of(norm: torch.Tensor, rates: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' ``normalized_coefficient`` in torch (the reference branch), from a float64 ``‖G‖``:
    ``coef = −(rates[i,0]/‖G‖ + rates[i,1])`` (float64, 0 to skip) and the ``‖G‖`` to record (fp32)."""
    norm = norm.double()
    a, b = rates[index, 0].double(), rates[index, 1].double()
    u = a + b * norm
    ok = torch.isfinite(norm) & (norm >= LEAST_SUBNORMAL) & (u >= 0) & (u < _MAX_STEP)
    coef = torch.where(ok, -(a / torch.where(ok, norm, 1.0) + b), 0.0)
    recorded = torch.where(ok, norm.clamp_max(FP32_MAX), torch.where(norm < LEAST_SUBNORMAL, 0.0, norm))
    return coef, recorded.float()


def apply_normalized_update(
    weight: torch.Tensor,
    cumulative: torch.Tensor,
    g_sq: torch.Tensor,
    index: int,
    *,
    rates: torch.Tensor,
    d_norm_out: torch.Tensor,
    dot_out: torch.Tensor,
    grad: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    alpha: float = 1.0,
    g_sq_scale: float = 1.0,
    cumulative_is_init: bool = False,
) -> None:
    """One launch: the coefficient, then ``W += coef·G``, ``C += coef·G`` and ``⟨ΔW, C_old⟩`` partials.

    ``‖G‖² = g_sq_scale·Σ g_sq`` (fp64 or fp32 partials, any length ≥ 1, summed in fp64 and clamped at
    0); ``coef = −(rates[index, 0]/‖G‖ + rates[index, 1])`` (``rates`` fp32 ``[n, 2]``) in fp64, or 0
    (W and C kept bit-identical) when ``‖G‖`` is below fp32's least subnormal (0 included) or not
    finite, or the step's norm is NaN, negative or at least ``MAX_STEP``. Any finite ``G`` with
    ``‖G‖ > 0`` takes its step, at fp32 accuracy, however large or small its scale. Writes ``‖G‖``
    (clamped to fp32's finite range when the step is taken) to ``d_norm_out[index]`` and the
    per-program partials of ``⟨ΔW, C_old⟩`` to ``dot_out[:programs]`` (fp32; the rest untouched).
    ``G`` is ``grad`` or ``α·δᵀx`` as in :func:`apply_update`. float64 weights run the torch branch
    (float64 arithmetic; pass a float64 ``grad`` for a float64 ``G``).
    """
    _check(weight, cumulative, None, grad, x, delta, cumulative_is_init)
    n_out, n_in = weight.shape
    if not use_triton(weight) or weight.dtype == torch.float64:
        norm = (g_sq.double().sum() * g_sq_scale).clamp_min(0.0).sqrt()
        coef, recorded = _coefficient_of(norm, rates, index)
        dot = reference.apply_update(
            weight, cumulative, coef, grad=grad, x=x, delta=delta, alpha=alpha, cumulative_is_init=cumulative_is_init
        )
        d_norm_out[index] = recorded
        dot_out[0] = dot
        return
    config = _MATERIALIZED if grad is not None else _SMALL_BATCH
    grid = _grid(n_out, n_in, config)
    if grid[0] * grid[1] > dot_out.numel():
        raise ValueError(f"apply_normalized_update: dot_out has {dot_out.numel()} slots, need {grid[0] * grid[1]}")
    common = (
        rates, d_norm_out, dot_out, g_sq.numel(), float(g_sq_scale), index,
    )  # fmt: skip
    strides = (weight.stride(0), weight.stride(1), cumulative.stride(0), cumulative.stride(1))
    if grad is not None:
        _apply_materialized_kernel[grid](
            weight, cumulative, grad, g_sq, *common, n_out, n_in, *strides, grad.stride(0), grad.stride(1),
            CUMULATIVE_IS_INIT=cumulative_is_init, PART_BLOCK=_PART_BLOCK, **config,
        )  # fmt: skip
        return
    batch = x.shape[0]
    _apply_small_batch_kernel[grid](
        weight, cumulative, x, delta, g_sq, *common, float(alpha), batch, n_out, n_in, *strides,
        x.stride(0), x.stride(1), delta.stride(0), delta.stride(1),
        CUMULATIVE_IS_INIT=cumulative_is_init, BLOCK_K=max(16, min(64, triton.next_power_of_2(batch))),
        PART_BLOCK=_PART_BLOCK, PREC=dot_precision(), UPCAST=interpreter_active(), **config,
    )  # fmt: skip


def apply_bias_update(
    bias: torch.Tensor,
    cumulative: torch.Tensor,
    delta: torch.Tensor,
    bias_scale: float,
    index: int,
    *,
    rates: torch.Tensor,
    d_norm_out: torch.Tensor,
    dot_out: torch.Tensor,
    cumulative_is_init: bool = False,
) -> None:
    """The bias's whole update in one launch: ``db = bias_scale·Σ_B δ``, ``‖db‖`` (accumulated in fp64), the
    coefficient as in :func:`apply_normalized_update`, ``b, C += coef·db``; ``‖db‖`` to ``d_norm_out[index]``,
    ``⟨Δb, C_old⟩`` to ``dot_out[0]``. ``delta`` is ``(B, n_out)``, ``bias`` and ``cumulative`` ``(n_out,)``.
    A float64 bias runs the torch branch (float64 arithmetic)."""
    if not use_triton(bias) or bias.dtype == torch.float64:
        db = reference.bias_grad(delta, bias_scale)
        coef, recorded = _coefficient_of(torch.linalg.vector_norm(db, dtype=torch.float64), rates, index)
        dot_out[0] = reference.apply_update(bias, cumulative, coef, grad=db, cumulative_is_init=cumulative_is_init)
        d_norm_out[index] = recorded
        return
    batch, n_out = delta.shape
    db = torch.empty(n_out, dtype=torch.float32, device=bias.device)
    _apply_bias_kernel[(1,)](
        bias, cumulative, delta, db, rates, d_norm_out, dot_out, float(bias_scale), index, batch, n_out,
        delta.stride(0), delta.stride(1), CUMULATIVE_IS_INIT=cumulative_is_init, BLOCK_B=16, BLOCK_N=128,
    )  # fmt: skip


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
    """``W += coef·G`` and ``C += coef·G`` in place for a given ``coef``; return ``⟨ΔW, C_old⟩`` (fp32, 0-dim).

    ``G`` is ``grad`` (materialized kernel) or ``α·δᵀx`` (small-batch kernel, used when
    ``grad`` is None). ``coef`` is a 1-element fp32 tensor, ``−η·s/‖G‖`` (≤ 0) or 0 to skip; a positive
    ``coef`` is a negative rate, which the kernels skip like a NaN one. With
    ``cumulative_is_init`` (fp32 weights only) ``cumulative`` holds ``P_0``, ``C_old = W − P_0``
    and the buffer is left untouched. Semantics are those of ``reference.apply_update``; the
    kernels are those of :func:`apply_normalized_update`, fed ``‖G‖ = 1`` and ``rates = (0, −coef)``.
    """
    _check(weight, cumulative, coef, grad, x, delta, cumulative_is_init)
    if not use_triton(weight):
        return reference.apply_update(
            weight, cumulative, coef.reshape(()), grad=grad, x=x, delta=delta, alpha=alpha,
            cumulative_is_init=cumulative_is_init,
        )
    if weight.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=weight.device)
    one = torch.ones(1, dtype=torch.float32, device=weight.device)
    rates = torch.cat([torch.zeros_like(one), -coef.reshape(1)]).reshape(1, 2)
    dots = torch.empty(max_programs(*weight.shape), dtype=torch.float32, device=weight.device)
    grid = _grid(*weight.shape, _MATERIALIZED if grad is not None else _SMALL_BATCH)
    apply_normalized_update(
        weight, cumulative, one, 0, rates=rates, d_norm_out=torch.empty(1, device=weight.device), dot_out=dots,
        grad=grad, x=x, delta=delta, alpha=alpha, cumulative_is_init=cumulative_is_init,
    )  # fmt: skip
    return dots[: grid[0] * grid[1]].sum()
