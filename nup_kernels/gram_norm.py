"""``‖G‖²`` of the rank-B gradient ``G = α·δᵀx`` from two B×B Gram matrices; G is never formed.

``‖α·δᵀx‖²_F = α²·⟨x xᵀ, δ δᵀ⟩_F``, which costs ``B²·(n_in + n_out)`` multiply-adds instead of
``B·n_in·n_out``. Each program computes one ``BLOCK_B × BLOCK_B`` tile of both Gram matrices
(``tl.dot`` over the feature dimension) and writes the tile's ``⟨·,·⟩`` to a partials buffer;
only tiles on or above the diagonal are computed (both Grams are symmetric, so an off-diagonal
tile counts twice). The partials are then summed by ``torch.sum``, which is deterministic.
"""

from __future__ import annotations

import torch

from nup_kernels import reference
from nup_kernels.backend import check_inputs, interpreter_active, tl, triton, use_triton


def dot_precision() -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's matmul setting.

    ``"ieee"`` when ``torch.get_float32_matmul_precision()`` is ``"highest"`` (torch's default),
    else ``"tf32"``, so a kernel rounds exactly as the torch matmul it replaces. Kernels also take
    ``UPCAST=interpreter_active()``: Triton's interpreter holds 16-bit floats as raw bits and
    computes ``tl.dot`` on them wrongly, so there the operands are cast to fp32 first.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@triton.jit
def _gram_tile(
    a_ptr, stride_b, stride_k, rows_i, rows_j, B, K,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The ``(rows_i, rows_j)`` tile of ``A Aᵀ`` for ``A`` of shape ``(B, K)``, in fp32."""
    mask_i = rows_i < B
    mask_j = rows_j < B
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(
            a_ptr + rows_i[:, None] * stride_b + kk[None, :] * stride_k,
            mask=mask_i[:, None] & kmask[None, :],
            other=0.0,
        )
        b = tl.load(
            a_ptr + rows_j[:, None] * stride_b + kk[None, :] * stride_k,
            mask=mask_j[:, None] & kmask[None, :],
            other=0.0,
        )
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def _gram_norm_kernel(
    x_ptr,
    d_ptr,
    partials_ptr,
    B,
    n_in,
    n_out,
    stride_xb,
    stride_xk,
    stride_db,
    stride_dk,
    BLOCK_B: tl.constexpr,
    BLOCK_KX: tl.constexpr,
    BLOCK_KD: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pi = tl.program_id(0).to(tl.int64)
    pj = tl.program_id(1).to(tl.int64)
    slot = pi * tl.num_programs(1) + pj
    if pj < pi:
        # The (pj, pi) tile carries this one, counted twice.
        tl.store(partials_ptr + slot, 0.0)
    else:
        rows_i = pi * BLOCK_B + tl.arange(0, BLOCK_B)
        rows_j = pj * BLOCK_B + tl.arange(0, BLOCK_B)
        gx = _gram_tile(x_ptr, stride_xb, stride_xk, rows_i, rows_j, B, n_in, BLOCK_B, BLOCK_KX, PREC, UPCAST)
        gd = _gram_tile(
            d_ptr, stride_db, stride_dk, rows_i, rows_j, B, n_out, BLOCK_B, BLOCK_KD, PREC, UPCAST
        )
        weight = tl.where(pj > pi, 2.0, 1.0)
        tl.store(partials_ptr + slot, weight * tl.sum(gx * gd))


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def grad_norm_sq_gram(x: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``‖α·δᵀx‖²_F`` for ``x`` ``(B, n_in)`` and ``delta`` ``(B, n_out)``; fp32 0-dim tensor.

    Any strides are accepted. CUDA tensors (or ``NUP_BACKEND=triton``) run the Triton kernel,
    others ``reference.grad_norm_sq_gram``.
    """
    check_inputs("grad_norm_sq_gram", x, delta, ndims=(2, 2))
    if x.shape[0] != delta.shape[0]:
        raise ValueError(
            f"grad_norm_sq_gram: x has batch {x.shape[0]} but delta has batch {delta.shape[0]}"
        )
    if not use_triton(x):
        return reference.grad_norm_sq_gram(x, delta, alpha)
    batch, n_in = x.shape
    n_out = delta.shape[1]
    if batch == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    block_b = _block(batch, 16, 64)
    n_blocks = triton.cdiv(batch, block_b)
    partials = torch.empty(n_blocks * n_blocks, dtype=torch.float32, device=x.device)
    _gram_norm_kernel[(n_blocks, n_blocks)](
        x,
        delta,
        partials,
        batch,
        n_in,
        n_out,
        x.stride(0),
        x.stride(1),
        delta.stride(0),
        delta.stride(1),
        BLOCK_B=block_b,
        BLOCK_KX=_block(n_in, 16, 64),
        BLOCK_KD=_block(n_out, 16, 64),
        PREC=dot_precision(),
        UPCAST=interpreter_active(),
        num_warps=4,
    )
    return partials.sum() * (alpha * alpha)
