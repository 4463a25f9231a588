"""The in-place update ``W += coef·G``, ``C += coef·G`` in one pass, returning ``⟨ΔW, C_old⟩``.

Shapes: ``weight``, ``cumulative`` and ``grad`` are ``(n_out, n_in)``; ``x`` is ``(B, n_in)``
and ``delta`` ``(B, n_out)``. Any strides are accepted, in-place tensors included.

Two kernels, one pass over the W and C tiles each:

- materialized: reads the ``G`` tile;
- small batch: recomputes the rank-B tile ``α·δᵀx`` in registers with ``tl.dot`` (``K = B``,
  padded to ≥ 16 with masks), so ``G`` is never stored: 2 fewer parameter-sized passes for
  about ``2·B·P`` more FLOPs.

Each program writes its tile's ``⟨ΔW, C_old⟩`` to a partials buffer, summed by ``torch.sum``
(deterministic). ``coef`` is a 0-dim fp32 device tensor read in-kernel: no host sync. A zero
``coef`` selects the old values with ``tl.where``, so W and C stay bit-identical even when G or δ
hold NaN or Inf. Both kernels update in place and run with pinned configs (never autotuned).
"""

from __future__ import annotations

import os

import torch

from nup_kernels import reference
from nup_kernels.backend import check_inputs, interpreter_active, tl, triton, use_triton
from nup_kernels.gram_norm import dot_precision

UPDATE_PATHS = ("small_batch", "materialized")
#: Largest batch for which ``choose_update_path`` picks the small-batch kernel, by element size.
#: The recompute adds ``2·B·P`` FLOPs and saves two passes of ``P`` elements, so it pays while
#: ``B`` stays under about the chip's FLOP/byte ratio times the element size (several hundred
#: in bf16 on an H200); fp32 without TF32 runs tl.dot far slower, hence the lower bound.
SMALL_BATCH_MAX = {2: 256, 4: 64}

_MATERIALIZED = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}
_SMALL_BATCH = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}


@triton.jit
def _apply_tile(
    g,
    w_ptr,
    c_ptr,
    coef_ptr,
    partials_ptr,
    rows,
    cols,
    n_out,
    n_in,
    stride_wm,
    stride_wn,
    stride_cm,
    stride_cn,
    CUMULATIVE_IS_INIT: tl.constexpr,
):
    """Update one ``(rows, cols)`` tile of W and C by ``coef·g``; store the tile's ``⟨ΔW, C_old⟩``."""
    mask = (rows[:, None] < n_out) & (cols[None, :] < n_in)
    coef = tl.load(coef_ptr).to(tl.float32)
    keep = coef == 0.0
    step = coef * g
    w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    c = tl.load(c_ptrs, mask=mask, other=0.0)
    w32 = w.to(tl.float32)
    if CUMULATIVE_IS_INIT:
        c_old = w32 - c.to(tl.float32)
    else:
        c_old = c.to(tl.float32)
    dot = tl.where(keep, 0.0, tl.where(mask, step * c_old, 0.0))
    slot = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partials_ptr + slot, tl.sum(dot))
    tl.store(w_ptrs, tl.where(keep, w, (w32 + step).to(w.dtype)), mask=mask)
    if not CUMULATIVE_IS_INIT:
        tl.store(c_ptrs, tl.where(keep, c, (c_old + step).to(c.dtype)), mask=mask)


@triton.jit
def _apply_materialized_kernel(
    w_ptr,
    c_ptr,
    g_ptr,
    coef_ptr,
    partials_ptr,
    n_out,
    n_in,
    stride_wm,
    stride_wn,
    stride_cm,
    stride_cn,
    stride_gm,
    stride_gn,
    CUMULATIVE_IS_INIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_out) & (cols[None, :] < n_in)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    _apply_tile(
        g.to(tl.float32), w_ptr, c_ptr, coef_ptr, partials_ptr, rows, cols, n_out, n_in,
        stride_wm, stride_wn, stride_cm, stride_cn, CUMULATIVE_IS_INIT,
    )


@triton.jit
def _apply_small_batch_kernel(
    w_ptr,
    c_ptr,
    x_ptr,
    d_ptr,
    coef_ptr,
    partials_ptr,
    alpha,
    batch,
    n_out,
    n_in,
    stride_wm,
    stride_wn,
    stride_cm,
    stride_cn,
    stride_xb,
    stride_xn,
    stride_db,
    stride_dm,
    CUMULATIVE_IS_INIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_out
    col_mask = cols < n_in
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, batch, BLOCK_K):
        kk = k0 + ks
        kmask = kk < batch
        d = tl.load(
            d_ptr + kk[:, None] * stride_db + rows[None, :] * stride_dm,
            mask=kmask[:, None] & row_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + kk[:, None] * stride_xb + cols[None, :] * stride_xn,
            mask=kmask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            d, x = d.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(tl.trans(d), x, input_precision=PREC)
    g = (alpha * acc).to(tl.float32)  # alpha arrives as fp64 under torch.compile
    _apply_tile(
        g, w_ptr, c_ptr, coef_ptr, partials_ptr, rows, cols, n_out, n_in,
        stride_wm, stride_wn, stride_cm, stride_cn, CUMULATIVE_IS_INIT,
    )


def choose_update_path(batch: int, n_out: int, n_in: int, dtype: torch.dtype) -> str:
    """``"small_batch"`` or ``"materialized"`` for a layer ``(n_out, n_in)`` at batch ``batch``.

    ``NUP_UPDATE_PATH=small_batch|materialized`` forces the answer. Otherwise the small-batch
    path is chosen while ``batch ≤ SMALL_BATCH_MAX`` for the weight's element size: 256 for
    16-bit dtypes, 64 for fp32. The rule depends on ``batch`` and ``dtype`` only; ``n_out`` and
    ``n_in`` are validated and kept in the signature for a shape-aware crossover.
    """
    forced = os.environ.get("NUP_UPDATE_PATH", "").strip().lower()
    if forced:
        if forced not in UPDATE_PATHS:
            raise ValueError(f"NUP_UPDATE_PATH={forced!r} is not one of {UPDATE_PATHS}; unset it or pick one")
        return forced
    if min(batch, n_out, n_in) < 0:
        raise ValueError(f"choose_update_path: negative size in batch={batch}, n_out={n_out}, n_in={n_in}")
    limit = SMALL_BATCH_MAX[2 if dtype.itemsize <= 2 else 4]
    return "small_batch" if batch <= limit else "materialized"


def _check(
    weight: torch.Tensor,
    cumulative: torch.Tensor,
    coef: torch.Tensor,
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
    """``W += coef·G`` and ``C += coef·G`` in place; return ``⟨ΔW, C_old⟩`` (fp32, 0-dim).

    ``G`` is ``grad`` (materialized kernel) or ``α·δᵀx`` (small-batch kernel, used when
    ``grad`` is None). ``coef`` is a 1-element fp32 tensor, ``−η·s/‖G‖`` or 0 to skip. With
    ``cumulative_is_init`` (fp32 weights only) ``cumulative`` holds ``P_0``, ``C_old = W − P_0``
    and the buffer is left untouched. Semantics are those of ``reference.apply_update``.
    """
    _check(weight, cumulative, coef, grad, x, delta, cumulative_is_init)
    if not use_triton(weight):
        return reference.apply_update(
            weight, cumulative, coef.reshape(()), grad=grad, x=x, delta=delta, alpha=alpha,
            cumulative_is_init=cumulative_is_init,
        )
    n_out, n_in = weight.shape
    if weight.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=weight.device)
    common = (weight.stride(0), weight.stride(1), cumulative.stride(0), cumulative.stride(1))
    config = _MATERIALIZED if grad is not None else _SMALL_BATCH
    grid = (triton.cdiv(n_out, config["BLOCK_M"]), triton.cdiv(n_in, config["BLOCK_N"]))
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=weight.device)
    if grad is not None:
        _apply_materialized_kernel[grid](
            weight, cumulative, grad, coef, partials, n_out, n_in, *common, grad.stride(0), grad.stride(1),
            CUMULATIVE_IS_INIT=cumulative_is_init, **config,
        )
    else:
        if x.dtype != delta.dtype:  # tl.dot needs one operand dtype; these are only (B, n) each
            x, delta = x.float(), delta.float()
        batch = x.shape[0]
        _apply_small_batch_kernel[grid](
            weight, cumulative, x, delta, coef, partials, float(alpha), batch, n_out, n_in, *common,
            x.stride(0), x.stride(1), delta.stride(0), delta.stride(1),
            CUMULATIVE_IS_INIT=cumulative_is_init, BLOCK_K=max(16, min(64, triton.next_power_of_2(batch))),
            PREC=dot_precision(), UPCAST=interpreter_active(), **config,
        )
    return partials.sum()
