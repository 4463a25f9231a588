"""The drop-in path over a list of tensors: one launch for all the reductions, one for all the applies.

Design: each launch gets a table of the tensors' addresses instead of the tensors themselves.
On the host we build, once per distinct list, an int64 *tensor table* (rows: one address row
per operand list from ``t.data_ptr()``, then ``numel``, then the tensor's index in the call)
and a *chunk table* (rows: tensor index, element offset), one chunk of ``CHUNK`` elements per
program. In-kernel, ``tl.load(table + …).to(tl.pointer_type(DTYPE))`` turns an address back
into a typed pointer; this works in Triton's interpreter (checked with triton 3.9) and compiles
on GPU, so the same kernel runs in the CPU tests and on CUDA. The tables are cached, keyed by
every tensor's address, shape and dtype, so steady-state steps rebuild nothing.

A launch has one dtype per operand list (the pointer type is a constexpr), so the launcher
groups the tensors by their dtype tuple: one launch per group, a single launch in the usual
case where all tensors share a dtype.

Reductions are deterministic: every chunk writes fp64 partials to its own slot (the chunks of a
tensor occupy consecutive slots), and a second small kernel sums each tensor's slots in a fixed
order. No atomics are used.

Extreme but finite directions (issue #13): the sums of squares and products are accumulated in
fp64, where the square of any finite fp32/bf16/fp16 value neither overflows nor underflows, so
``‖D‖²`` is right for any finite ``D`` (a plain fp32 sum overflows from ``‖D‖`` ≈ 1.8e19 and
underflows below about 1e-19). The apply takes fp64 coefficients, which can lie outside fp32's
range (``u/‖D‖`` with ``‖D‖`` from 1e-45 to 1e42), and forms ``coef·D`` as an exact power of two
times an fp32 factor (:mod:`nup_kernels.scaled_step`), so the step keeps fp32 accuracy.

In-place operands (``params``, ``cumulatives`` of ``multi_tensor_apply``) must be contiguous,
since they are addressed as flat buffers; read-only operands are made contiguous when needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from nup_kernels import reference
from nup_kernels.backend import check_inputs, tl, triton, use_triton
from nup_kernels.scaled_step import split_coefficient

BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS  # elements per program
_SEGMENT_BLOCK = 128
_CACHE_SIZE = 32


@triton.jit
def _tensor_ptr(table, row, n_local, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer stored at ``table[row, t]`` (int64 table of shape ``(rows, n_local)``)."""
    ptr = tl.load(table + row * n_local + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, n, FULL: tl.constexpr):
    if FULL:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0)
    return x


@triton.jit
def _reduce_span(d_ptr, c_ptr, start, n, FULL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    dd = tl.zeros((BLOCK,), dtype=tl.float64)  # fp64: the square of any finite 16/32-bit value fits
    dc = tl.zeros((BLOCK,), dtype=tl.float64)
    cc = tl.zeros((BLOCK,), dtype=tl.float64)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        d = _load(d_ptr, offs, n, FULL).to(tl.float64)
        c = _load(c_ptr, offs, n, FULL).to(tl.float64)
        dd += d * d
        dc += d * c
        cc += c * c
    return tl.sum(dd), tl.sum(dc), tl.sum(cc)


@triton.jit
def _reduce_kernel(
    tensors,
    chunks,
    partials,
    n_local,
    n_slots,
    chunk_base,
    D_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + pid)
    start = tl.multiple_of(tl.load(chunks + tl.num_programs(0) + pid), BLOCK * ITERS)
    n = tl.load(tensors + 2 * n_local + t)
    d_ptr = _tensor_ptr(tensors, 0, n_local, t, D_DTYPE, ALIGNED)
    c_ptr = _tensor_ptr(tensors, 1, n_local, t, C_DTYPE, ALIGNED)
    if start + BLOCK * ITERS <= n:
        dd, dc, cc = _reduce_span(d_ptr, c_ptr, start, n, True, BLOCK, ITERS)
    else:
        dd, dc, cc = _reduce_span(d_ptr, c_ptr, start, n, False, BLOCK, ITERS)
    slot = chunk_base + pid
    tl.store(partials + slot, dd)
    tl.store(partials + n_slots + slot, dc)
    tl.store(partials + 2 * n_slots + slot, cc)


@triton.jit
def _segment_sum_kernel(partials, segments, out, n_tensors, n_slots, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[r, t] = Σ partials[r, lo_t:hi_t]`` (fp64), summed in a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(segments + t)
    hi = tl.load(segments + n_tensors + t)
    for r in tl.static_range(ROWS):
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
        for s in range(lo, hi, BLOCK):
            idx = s + tl.arange(0, BLOCK)
            acc += tl.load(partials + r * n_slots + idx, mask=idx < hi, other=0.0)
        tl.store(out + r * n_tensors + t, tl.sum(acc))


@triton.jit
def _apply_span(
    p_ptr, d_ptr, c_ptr, coef, start, n, FULL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr
):
    keep = coef == 0.0
    hi, lo = split_coefficient(coef)  # coef = hi·lo: fp64, possibly beyond fp32's range
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        p = _load(p_ptr, offs, n, FULL)
        c = _load(c_ptr, offs, n, FULL)
        step = (_load(d_ptr, offs, n, FULL).to(tl.float32) * hi) * lo  # D·hi is exact: one rounding
        new_p = tl.where(keep, p, (p.to(tl.float32) + step).to(p.dtype))
        new_c = tl.where(keep, c, (c.to(tl.float32) + step).to(c.dtype))
        if FULL:
            tl.store(p_ptr + offs, new_p)
            tl.store(c_ptr + offs, new_c)
        else:
            tl.store(p_ptr + offs, new_p, mask=offs < n)
            tl.store(c_ptr + offs, new_c, mask=offs < n)


@triton.jit
def _apply_kernel(
    tensors,
    chunks,
    coefs,
    n_local,
    P_DTYPE: tl.constexpr,
    D_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + pid)
    start = tl.multiple_of(tl.load(chunks + tl.num_programs(0) + pid), BLOCK * ITERS)
    n = tl.load(tensors + 3 * n_local + t)
    coef = tl.load(coefs + tl.load(tensors + 4 * n_local + t)).to(tl.float64)  # fp32 or fp64 coefficients
    p_ptr = _tensor_ptr(tensors, 0, n_local, t, P_DTYPE, ALIGNED)
    d_ptr = _tensor_ptr(tensors, 1, n_local, t, D_DTYPE, ALIGNED)
    c_ptr = _tensor_ptr(tensors, 2, n_local, t, C_DTYPE, ALIGNED)
    if start + BLOCK * ITERS <= n:
        _apply_span(p_ptr, d_ptr, c_ptr, coef, start, n, True, BLOCK, ITERS)
    else:
        _apply_span(p_ptr, d_ptr, c_ptr, coef, start, n, False, BLOCK, ITERS)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class _Launch:
    """One launch over the tensors that share a dtype tuple."""

    dtypes: tuple[torch.dtype, ...]
    tensors: torch.Tensor  # int64 (K + 2, n_local): K address rows, numel, index in the call
    chunks: torch.Tensor  # int64 (2, n_chunks): local tensor index, element offset
    chunk_base: int  # the group's first slot in the partials buffer
    aligned: bool  # every address is a multiple of 16 bytes


@dataclass(frozen=True)
class _Plan:
    launches: tuple[_Launch, ...]
    segments: torch.Tensor  # int64 (2, n_tensors): each tensor's [lo, hi) partial slots
    n_slots: int
    staged: torch.Tensor  # the host copy of the tables, kept alive while the upload may be in flight


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def _plan(lists: tuple[list[torch.Tensor], ...]) -> _Plan:
    """The launch tables for operand lists of equal length (cached by addresses, shapes, dtypes)."""
    device = lists[0][0].device
    rows = tuple(zip(*lists, strict=True))
    key = (device, tuple((tuple(t.data_ptr() for t in ts), ts[0].shape, tuple(t.dtype for t in ts))
                         for ts in rows))  # fmt: skip
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    n_tensors = len(lists[0])
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i, ts in enumerate(rows):
        groups.setdefault(tuple(t.dtype for t in ts), []).append(i)
    host, layout, lo, hi = [], [], [0] * n_tensors, [0] * n_tensors
    n_slots = 0
    for dtypes, members in groups.items():
        addresses = [[ts[i].data_ptr() for i in members] for ts in lists]
        numels = [lists[0][i].numel() for i in members]
        chunk_tensor, chunk_offset = [], []
        for local, (i, n) in enumerate(zip(members, numels, strict=True)):
            lo[i] = n_slots + len(chunk_tensor)
            chunk_tensor += [local] * triton.cdiv(n, CHUNK)
            chunk_offset += range(0, n, CHUNK)
            hi[i] = n_slots + len(chunk_tensor)
        table = addresses + [numels, members]
        aligned = all(a % 16 == 0 for row in addresses for a in row)
        layout.append((dtypes, len(members), len(chunk_tensor), n_slots, aligned))
        host += [v for row in table for v in row] + chunk_tensor + chunk_offset
        n_slots += len(chunk_tensor)
    staged = torch.tensor(host + lo + hi, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: the upload does not wait for the GPU queue
        staged = staged.pin_memory()
    packed = staged.to(device, non_blocking=True)
    launches, at = [], 0
    for dtypes, n_local, n_chunks, base, aligned in layout:
        tensors = packed[at : at + (len(lists) + 2) * n_local].view(len(lists) + 2, n_local)
        at += tensors.numel()
        chunks = packed[at : at + 2 * n_chunks].view(2, n_chunks)
        at += chunks.numel()
        launches.append(_Launch(dtypes, tensors, chunks, base, aligned))
    plan = _Plan(tuple(launches), packed[at:].view(2, n_tensors), n_slots, staged)
    _plans[key] = plan
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


def _check(op: str, names: tuple[str, ...], lists: tuple[list[torch.Tensor], ...]) -> None:
    if len({len(ts) for ts in lists}) > 1:
        lengths = ", ".join(f"{n}={len(ts)}" for n, ts in zip(names, lists, strict=True))
        raise ValueError(f"{op}: the tensor lists differ in length ({lengths})")
    check_inputs(op, *(t for ts in lists for t in ts))
    for i, ts in enumerate(zip(*lists, strict=True)):
        if len({t.shape for t in ts}) > 1:
            shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in zip(names, ts, strict=True))
            raise ValueError(f"{op}: tensor {i} differs in shape across lists: {shapes}")


def _any_float64(*lists: list[torch.Tensor]) -> bool:
    """float64 tensors take the torch path (float64 arithmetic); the kernels are 16/32-bit."""
    return any(t.dtype == torch.float64 for ts in lists for t in ts)


def _require_contiguous(op: str, name: str, ts: list[torch.Tensor]) -> None:
    for i, t in enumerate(ts):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] is updated in place, so it must be contiguous")


def multi_tensor_reduce(
    directions: list[torch.Tensor], cumulatives: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor ``‖D‖²``, ``⟨D, C⟩`` and ``‖C‖²``: three float64 vectors of length ``len(directions)``.

    ``directions[i]`` and ``cumulatives[i]`` share a shape; dtypes may be fp32, bf16 or fp16 (float64
    tensors take the torch path). Accumulated in fp64, so every finite ``D`` gets a finite, non-zero
    ``‖D‖²`` (or 0 for ``D = 0``). One reduction launch per dtype pair plus one deterministic
    segment-sum launch.
    """
    op = "multi_tensor_reduce"
    _check(op, ("directions", "cumulatives"), (directions, cumulatives))
    if not directions:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone(), empty.clone()
    if not use_triton(directions[0]) or _any_float64(directions, cumulatives):
        return reference.multi_tensor_reduce(directions, cumulatives)
    directions = [d.contiguous() for d in directions]
    cumulatives = [c.contiguous() for c in cumulatives]
    plan = _plan((directions, cumulatives))
    device = directions[0].device
    partials = torch.empty(3, plan.n_slots, dtype=torch.float64, device=device)
    for launch in plan.launches:
        n_chunks = launch.chunks.shape[1]
        if n_chunks == 0:
            continue
        _reduce_kernel[(n_chunks,)](
            launch.tensors, launch.chunks, partials, launch.tensors.shape[1], plan.n_slots, launch.chunk_base,
            D_DTYPE=_TL_DTYPES[launch.dtypes[0]], C_DTYPE=_TL_DTYPES[launch.dtypes[1]],
            ALIGNED=launch.aligned, BLOCK=BLOCK, ITERS=ITERS, num_warps=4,
        )  # fmt: skip
    n_tensors = len(directions)
    out = torch.empty(3, n_tensors, dtype=torch.float64, device=device)
    _segment_sum_kernel[(n_tensors,)](
        partials, plan.segments, out, n_tensors, plan.n_slots, ROWS=3, BLOCK=_SEGMENT_BLOCK, num_warps=1
    )
    return out[0], out[1], out[2]


def multi_tensor_apply(
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
    cumulatives: list[torch.Tensor],
    coefs: torch.Tensor,
) -> None:
    """``P_i += coefs[i]·D_i`` and ``C_i += coefs[i]·D_i`` in place, for every tensor i.

    ``coefs`` is an fp32 or float64 vector of length ``len(params)`` on the tensors' device (float64:
    coefficients beyond fp32's range, ``u/‖D‖`` of an extreme ``D``, still give the step to fp32
    accuracy); a zero coefficient leaves that P and C bit-identical, even where D holds NaN or Inf.
    ``params`` and ``cumulatives`` must be contiguous. One launch per dtype triple.
    """
    op = "multi_tensor_apply"
    _check(op, ("params", "directions", "cumulatives"), (params, directions, cumulatives))
    if coefs.dim() != 1 or coefs.numel() != len(params) or coefs.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{op}: coefs must be an fp32 or float64 vector of length {len(params)}, "
            f"got {coefs.dtype} of shape {tuple(coefs.shape)}"
        )
    if params and coefs.device != params[0].device:
        raise ValueError(f"{op}: coefs is on {coefs.device} but the tensors are on {params[0].device}")
    if not params:
        return
    if not use_triton(params[0]) or _any_float64(params, directions, cumulatives):
        reference.multi_tensor_apply(params, directions, cumulatives, coefs)
        return
    _require_contiguous(op, "params", params)
    _require_contiguous(op, "cumulatives", cumulatives)
    directions = [d.contiguous() for d in directions]
    coefs = coefs.contiguous()
    plan = _plan((params, directions, cumulatives))
    for launch in plan.launches:
        n_chunks = launch.chunks.shape[1]
        if n_chunks == 0:
            continue
        p_dtype, d_dtype, c_dtype = (_TL_DTYPES[d] for d in launch.dtypes)
        _apply_kernel[(n_chunks,)](
            launch.tensors, launch.chunks, coefs, launch.tensors.shape[1],
            P_DTYPE=p_dtype, D_DTYPE=d_dtype, C_DTYPE=c_dtype,
            ALIGNED=launch.aligned, BLOCK=BLOCK, ITERS=ITERS, num_warps=4,
        )  # fmt: skip
