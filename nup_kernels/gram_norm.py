"""``‖G‖²`` of the rank-B gradient ``G = α·δᵀx`` from two B×B Gram matrices; G is never formed.

``‖α·δᵀx‖²_F = α²·⟨x xᵀ, δ δᵀ⟩_F``, which costs ``B²·(n_in + n_out)`` multiply-adds instead of
``B·n_in·n_out``. The work is split over the features too, so a small batch still fills the GPU:
with ``x xᵀ = Σ_c X_c`` over chunks ``c`` of the ``n_in`` features and ``δ δᵀ = Σ_e D_e`` over
chunks of ``n_out``, ``⟨x xᵀ, δ δᵀ⟩ = Σ_{c,e} ⟨X_c, D_e⟩``. One program computes one
``BLOCK_B × BLOCK_B`` tile of one ``X_c`` and one ``D_e`` (``tl.dot`` over its chunk) and writes
their ``⟨·,·⟩`` to its own slot of a partials buffer; tiles below the diagonal write 0 (both Grams
are symmetric, so an off-diagonal tile counts twice). One launch, no atomics: the partials'
``torch.sum`` is deterministic, and it is clamped at 0 (rounding of a nearly vanishing ``‖G‖²``
must not turn into NaN in ``sqrt``).

Extreme but finite gradients (issue #13): an fp32 ``δ δᵀ`` overflows as soon as ``δ`` holds entries
near 1e19 (and underflows below about 1e-19). Each Gram tile is therefore accumulated on scaled
operands: every ``BLOCK_B × BLOCK_K`` block of rows is multiplied by an exact power of two that
brings the largest magnitude seen so far in those rows below 1 (a running scale, as in online
softmax: when a later block is larger, the accumulator is rescaled by the exact ratio), so the
tile stays in fp32's range and keeps its ``tl.dot`` on tensor cores. The two tiles' ``⟨·,·⟩`` is
then unscaled in fp64 and the partials are fp64: ``‖G‖²`` is right for any ``G`` whose entries are
finite in fp32 (up to about 1e42 in norm, down to fp32's least subnormal). (An fp64 ``tl.dot`` would
do too, but Triton 3.6 fails to compile it from 16-bit operands on sm_90, and spills from fp32.)
"""

from __future__ import annotations

import torch

from nup_kernels import reference
from nup_kernels.backend import check_inputs, fp32_dot_precision, interpreter_active, tl, triton, use_triton
from nup_kernels.scaled_step import pow2, pow2_64, unit_exponent

#: ``tl.dot`` input precision for fp32 operands (kept under this name for the kernels that import it)
dot_precision = fp32_dot_precision
_MAX_CHUNKS = 12  # feature chunks per side: up to 144 programs per tile pair
_BLOCK_K = 64


@triton.jit
def _scaled(a, k, UPCAST: tl.constexpr):
    """``a·2^k`` (exact), in fp32 under the interpreter, else in ``a``'s dtype for the dot."""
    s = a.to(tl.float32) * pow2(k)
    return s if UPCAST else s.to(a.dtype)


@triton.jit
def _gram_tile(
    a_ptr, stride_b, stride_k, rows_i, rows_j, B, k_lo, k_hi,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    """``(tile, k)``: tile ``(rows_i, rows_j)`` of ``A[:, k_lo:k_hi] A[:, k_lo:k_hi]ᵀ`` times ``2^k``, in fp32.

    Rows ``i`` are scaled by ``2^k_i`` and rows ``j`` by ``2^k_j`` (``k = k_i + k_j``), exact powers of two
    that keep the largest magnitude seen in those rows below 1; a block with a larger one lowers them
    and rescales the accumulator (exactly; what underflows is below fp32's precision of the result).
    ``ONE_TILE`` (the batch fits one tile, so ``rows_i`` is ``rows_j``): the rows are loaded once.
    """
    mask_i = rows_i < B
    mask_j = rows_j < B
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    ki = tl.full((), 126, tl.int32)
    kj = tl.full((), 126, tl.int32)
    ks = tl.arange(0, BLOCK_K)
    off_i = rows_i[:, None] * stride_b + ks[None, :] * stride_k
    off_j = rows_j[:, None] * stride_b + ks[None, :] * stride_k
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = (k0 + ks) < k_hi
        base = a_ptr + k0 * stride_k
        a = tl.load(base + off_i, mask=mask_i[:, None] & kmask[None, :], other=0.0)
        ki_new = tl.minimum(ki, unit_exponent(tl.max(tl.max(tl.abs(a.to(tl.float32)), axis=1), axis=0)))
        if ONE_TILE:
            kj_new = ki_new
        else:
            b = tl.load(base + off_j, mask=mask_j[:, None] & kmask[None, :], other=0.0)
            kj_new = tl.minimum(kj, unit_exponent(tl.max(tl.max(tl.abs(b.to(tl.float32)), axis=1), axis=0)))
        # shifts are ≤ 0 and each factor is a normal fp32 number: two steps reach 2^-252 (then acc is negligible)
        acc = acc * pow2(tl.maximum(ki_new - ki, -126)) * pow2(tl.maximum(kj_new - kj, -126))
        ki, kj = ki_new, kj_new
        a = _scaled(a, ki, UPCAST)
        b = a if ONE_TILE else _scaled(b, kj, UPCAST)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc, ki + kj


@triton.jit
def _gram_norm_kernel(
    x_ptr, d_ptr, partials_ptr,
    B, n_in, n_out,
    stride_xb, stride_xk, stride_db, stride_dk,
    chunk_x, chunk_d, n_chunks_d, scale,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ONE_TILE: tl.constexpr,
):  # fmt: skip
    """Grid ``(n_b, n_b, n_chunks_x · n_chunks_d)``; ``scale·⟨X_c, D_e⟩`` of tile ``(pi, pj)`` per program (fp64)."""
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    pc = tl.program_id(2)
    slot = (pi.to(tl.int64) * tl.num_programs(1) + pj) * tl.num_programs(2) + pc
    if pj < pi:
        # The (pj, pi) tile carries this one, counted twice.
        tl.store(partials_ptr + slot, 0.0)
    else:
        c = pc // n_chunks_d
        e = pc % n_chunks_d
        rows_i = pi * BLOCK_B + tl.arange(0, BLOCK_B)
        rows_j = pj * BLOCK_B + tl.arange(0, BLOCK_B)
        x_lo = c * chunk_x
        gx, kx = _gram_tile(x_ptr, stride_xb, stride_xk, rows_i, rows_j, B, x_lo,
                            tl.minimum(x_lo + chunk_x, n_in), BLOCK_B, BLOCK_K, PREC, UPCAST, ONE_TILE)  # fmt: skip
        d_lo = e * chunk_d
        gd, kd = _gram_tile(d_ptr, stride_db, stride_dk, rows_i, rows_j, B, d_lo,
                            tl.minimum(d_lo + chunk_d, n_out), BLOCK_B, BLOCK_K, PREC, UPCAST, ONE_TILE)  # fmt: skip
        weight = tl.where(pj > pi, 2.0, 1.0) * tl.cast(scale, tl.float64)
        # entries of gx, gd are below chunk·(1)²: their ⟨·,·⟩ fits fp32; unscaled by 2^-(kx+kd) (|kx+kd| ≤ 504) in fp64
        tl.store(partials_ptr + slot, weight * tl.sum(gx * gd).to(tl.float64) * pow2_64(-(kx + kd)))


def _block_b(batch: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(batch, 1))))


def _launch_config(block_b: int) -> tuple[int, int]:
    """``(BLOCK_K, num_warps)``: 64-row tiles take 32-wide K blocks and 8 warps, as with their running scales two
    64×64 tiles of distinct rows spill at 64 and 4 (sm_90, Triton 3.6 and 3.9: ``benchmarks/compile_check.py``)."""
    return (32, 8) if block_b >= 64 else (_BLOCK_K, 4)


def _chunking(n: int) -> tuple[int, int]:
    """``(chunk, n_chunks)``: chunks are multiples of the K block, at most ``_MAX_CHUNKS`` of them."""
    chunk = max(_BLOCK_K, triton.cdiv(triton.cdiv(max(n, 1), _MAX_CHUNKS), _BLOCK_K) * _BLOCK_K)
    return chunk, triton.cdiv(max(n, 1), chunk)


def grad_norm_sq_partials_size(batch: int, n_in: int, n_out: int) -> int:
    """Length of the partials vector :func:`grad_norm_sq_partials` writes for these sizes."""
    n_b = triton.cdiv(max(batch, 1), _block_b(batch))
    return n_b * n_b * _chunking(n_in)[1] * _chunking(n_out)[1]


def _check(op: str, x: torch.Tensor, delta: torch.Tensor) -> None:
    check_inputs(op, x, delta, ndims=(2, 2))
    if x.shape[0] != delta.shape[0]:
        raise ValueError(f"{op}: x has batch {x.shape[0]} but delta has batch {delta.shape[0]}")


def grad_norm_sq_partials(
    x: torch.Tensor, delta: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-program float64 partials ``[P]`` of ``‖α·δᵀx‖²_F`` from one launch; their sum is ``‖G‖²``.

    ``x`` is ``(B, n_in)``, ``delta`` ``(B, n_out)``, any strides and dtypes (fp32, bf16, fp16, float64;
    the two may differ). ``P = grad_norm_sq_partials_size(B, n_in, n_out)``; ``out``, when given, is a
    float64 vector of that length, written in place (no allocation, for CUDA graphs). Partials may be
    negative; clamp their sum at 0. CUDA tensors (or ``NUP_BACKEND=triton``) only.
    """
    _check("grad_norm_sq_partials", x, delta)
    if not use_triton(x):
        raise ValueError("grad_norm_sq_partials runs the Triton kernel: pass CUDA tensors (or set NUP_BACKEND=triton "
                         "with TRITON_INTERPRET=1); on CPU use grad_norm_sq_gram")
    batch, n_in = x.shape
    n_out = delta.shape[1]
    size = grad_norm_sq_partials_size(batch, n_in, n_out)
    if out is None:
        out = torch.empty(size, dtype=torch.float64, device=x.device)
    elif out.dtype != torch.float64 or out.shape != (size,) or out.device != x.device:
        raise ValueError(
            f"grad_norm_sq_partials: out must be a float64 vector of length {size} on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}; use grad_norm_sq_partials_size()"
        )
    if batch == 0 or n_in == 0 or n_out == 0:
        return out.zero_()
    block_b = _block_b(batch)
    block_k, warps = _launch_config(block_b)
    n_b = triton.cdiv(batch, block_b)
    (chunk_x, n_cx), (chunk_d, n_cd) = _chunking(n_in), _chunking(n_out)
    _gram_norm_kernel[(n_b, n_b, n_cx * n_cd)](
        x, delta, out,
        batch, n_in, n_out,
        x.stride(0), x.stride(1), delta.stride(0), delta.stride(1),
        chunk_x, chunk_d, n_cd, float(alpha) ** 2,
        BLOCK_B=block_b, BLOCK_K=block_k, PREC=fp32_dot_precision(), UPCAST=interpreter_active(),
        ONE_TILE=n_b == 1, num_warps=warps,
    )  # fmt: skip
    return out


def grad_norm_sq_gram(x: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``‖α·δᵀx‖²_F`` for ``x`` ``(B, n_in)`` and ``delta`` ``(B, n_out)``; float64 0-dim tensor, ≥ 0.

    Any strides are accepted. CUDA tensors (or ``NUP_BACKEND=triton``) run the Triton kernel
    (the clamped sum of :func:`grad_norm_sq_partials`), others ``reference.grad_norm_sq_gram``.
    """
    _check("grad_norm_sq_gram", x, delta)
    if not use_triton(x):
        return reference.grad_norm_sq_gram(x, delta, alpha)
    return grad_norm_sq_partials(x, delta, alpha).sum().clamp_min_(0.0)
