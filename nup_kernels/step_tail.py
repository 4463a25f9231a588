"""The per-step tail of a NuP step in one launch: cosines, ``‖C‖``, the records and the λ controller.

After the applies, a step has a few ``[n]``-sized things left to do (``n`` = parameter tensors),
SPEC §3–§4:

- ``cos = ⟨ΔP, C⟩ / (u·‖C‖)`` (0 where ``u·‖C‖`` is 0, clamped to ``[−1, 1]``);
- ``‖C_{t+1}‖ = √(‖C_t‖² + 2⟨ΔP, C_t⟩ + u²)`` (or the exact norm on a recompute step);
- the records, in place in the statistic vectors (``update_norm``, ``cos``, ``c_norm``, ``lr``,
  ``path += u``, ``skipped += not ok``);
- the schedule's update of ``λ`` and of its state (:class:`Controller`), in place too.

As torch ops that is 20 to 50 launches of a few µs of host time each; :func:`finish_step` does it
in one launch of one program (``[n]`` is small: a loop over blocks of 256 tensors), with no
host sync and no allocation, so a captured CUDA graph replays it and every replay reads what the
last one wrote. :func:`finish_from_norms` is the fused path's form: it also forms the ok mask and
``u`` from ``‖D‖`` and the rates (``nup.step_core.coefficients``) and sums the ``⟨ΔP, C⟩``
partials, so ``opt.step()`` of a fused NuMLP is this one launch.

The formulas are those of ``nup.step_core.finish_step`` and ``nup.schedule`` (the torch path and
the oracle), in the same fp32 operations and order: IEEE-rounded division and square root (formed
without their slow-path calls, around which ptxas spills registers), NaN kept by every clamp as
torch keeps it, global sums over tensors in a fixed order (deterministic,
equal to torch's up to fp32 rounding), the clock and the warm-up/cosine value in float64. On a
GPU two things can still differ from torch by an ulp or so: ``tl.exp`` (the controller's factor)
and multiply-adds the compiler contracts into FMAs. The kernel does not know the ``nup`` classes:
a schedule describes itself as a :class:`Controller`.

``idx`` (int64 ``[k]``, ascending) names the tensors that took part in the step; the tensors
outside it record ``u = cos = 0`` and keep ``c_norm``, ``lr``, ``path`` and ``skipped``. The kernel
finds each tensor's position in ``idx`` by binary search (no inverse map to allocate).
CUDA tensors, or CPU tensors under ``NUP_BACKEND=triton TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nup_kernels.backend import tl, triton

BLOCK = 256  # tensors per block of the one program
BLOCK_S = 16  # ⟨ΔP, C⟩ partials per tile column (finish_from_norms)
NUM_WARPS = 4
STATISTICS = ("update_norm", "cos", "c_norm", "path", "lr", "skipped")
#: ``Controller.kind``: what the kernel does to λ after the records (``KINDS.index`` is the constexpr)
KINDS = ("none", "random_walk", "cosine_ema", "warmup_cosine", "replay")
_NONE, _RANDOM_WALK, _COSINE_EMA, _WARMUP_COSINE, _REPLAY = range(len(KINDS))
_FP32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Controller:
    """A schedule's update of ``λ`` as the kernel runs it, on the schedule's own tensors (in place).

    Every kind advances ``clock`` (float64 0-dim, when given) by 1 when some tensor moved (took its
    step: ``ok``), then:

    - ``none``: λ is left alone;
    - ``random_walk`` (``state = (c_prev, excess, noise)``) and ``cosine_ema`` (``state = (ema,)``):
      ``λ ← clip(λ·exp(clip(gain·s, ±max_change)), min_mult, max_mult)`` where active (per-layer:
      the tensor moved; global: some tensor did), then λ = 1 while ``clock < warmup``, with the
      signal ``s = EMA_β(2·u·‖C_t‖·cos) / EMA_β(u²)`` (``c_prev`` ← ``‖C_{t+1}‖``) or
      ``s = EMA_β(cos) − target`` (global: the u-weighted mean cosine, and the sums over tensors);
    - ``warmup_cosine``: λ = ``peak·((t+1)/max(warmup, 1))`` for ``t < warmup``, then the cosine
      decay from 1 to ``min_mult`` at ``total_steps`` (None: 1), at ``t = clock``;
    - ``replay``: λ = ``values[min(clock, len − 1)]``.

    ``beta`` and ``1 − beta`` are rounded to fp32 separately, as a torch expression
    ``b·x + (1 − b)·y`` rounds them.
    """

    kind: str
    lam: torch.Tensor  # fp32 [n]
    clock: torch.Tensor | None = None  # float64 0-dim
    per_layer: bool = False
    state: tuple[torch.Tensor, ...] = ()  # fp32 [n] each
    gain: float = 0.0
    max_change: float = 0.0
    min_mult: float = 0.0
    max_mult: float = 0.0
    warmup: int = 0
    beta: float = 0.0
    target: float = 0.0
    total_steps: int | None = None
    peak: float = 1.0
    values: torch.Tensor | None = None  # replay: fp32 [m]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"step_tail: unknown controller kind {self.kind!r}; one of {KINDS}")
        need = {"random_walk": 3, "cosine_ema": 1}.get(self.kind, 0)
        if len(self.state) != need:
            raise ValueError(f"step_tail: a {self.kind} controller has {need} state vectors, got {len(self.state)}")
        if self.kind != "none" and self.clock is None:
            raise ValueError(f"step_tail: a {self.kind} controller needs its clock")
        if self.kind == "replay" and (self.values is None or self.values.numel() == 0):
            raise ValueError("step_tail: a replay controller needs its values")


@triton.jit
def _range_scale(x):
    """A power of two that brings a finite non-zero ``|x|`` into fp32's comfortable range (exact)."""
    ax = tl.abs(x)
    tiny = ax < 7.888609052210118e-31  # 2^-100
    huge = ax > 1.2676506002282294e30  # 2^100
    return tl.where(tiny, 1.8446744073709552e19, tl.where(huge, 5.421010862427522e-20, 1.0))  # 2^64, 2^-64


@triton.jit
def _div(x, y):
    """fp32 ``x / y`` rounded as IEEE (``div.rn``), without the IEEE division's slow-path call.

    The reciprocal is the fast fp32 one refined twice by Newton in float64 (error about 2^-52); the
    float64 quotient rounded to fp32 is then the correctly rounded one, since a quotient of two fp32
    numbers is never within 2^-49 (relative) of a rounding midpoint. Zero, infinite and NaN
    divisors take the exact reciprocal (``inf``, ``0``, NaN), so ``x·(1/y)`` gives IEEE's specials.
    (ptxas spills registers around the slow-path call of ``div.rn.f32``/``f64`` in a loop.)
    """
    finite = (y == y) & (tl.abs(y) < float("inf")) & (y != 0.0)
    scale = tl.where(finite, _range_scale(y), 1.0)
    ys = (y * scale).to(tl.float64)
    seed = (1.0 / (y * scale)).to(tl.float64)  # the fast fp32 reciprocal: ±inf, ±0, NaN for the specials
    r = seed * (2.0 - ys * seed)
    r = r * (2.0 - ys * r)
    r = tl.where(finite, r * scale.to(tl.float64), seed)
    return (x.to(tl.float64) * r).to(tl.float32)


@triton.jit
def _sqrt(x):
    """fp32 IEEE ``sqrt`` (``sqrt.rn``) of ``x ≥ 0``, NaN or ``-0.0``, without a slow-path call: the fast
    reciprocal square root refined twice by Newton in float64, as in :func:`_div` (a square root of
    an fp32 number is never within 2^-49 of a midpoint either). 0, ``inf`` and NaN return themselves."""
    plain = (x != x) | (x == 0.0) | (x == float("inf"))
    small = x < 7.888609052210118e-31  # subnormal and tiny: scaled by 2^64, the root back by 2^-32
    xs = tl.where(plain, 1.0, tl.where(small, x * 1.8446744073709552e19, x))
    y = tl.rsqrt(xs).to(tl.float64)
    x64 = xs.to(tl.float64)
    y = y * (1.5 - 0.5 * x64 * y * y)
    y = y * (1.5 - 0.5 * x64 * y * y)
    root = x64 * y * tl.where(small, 2.3283064365386963e-10, 1.0).to(tl.float64)
    return tl.where(plain, x, root.to(tl.float32))


@triton.jit
def _clamp(x, lo, hi):
    """``torch.clamp``: NaN stays NaN (``tl.minimum``/``tl.maximum`` may drop it on a GPU)."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _position(idx, i, k, mask, STEPS: tl.constexpr):
    """Where tensor ``i`` sits in the ascending ``idx[:k]`` (lower bound, ``STEPS ≥ log2(k+1)`` halvings),
    and whether it is there."""
    lo = tl.zeros_like(i)
    hi = lo + k
    for _ in tl.static_range(STEPS):  # unrolled: a loop bound held across the block loop would be spilled
        go = mask & (lo < hi)
        mid = (lo + hi) // 2
        below = tl.load(idx + mid, mask=go, other=0) < i
        lo = tl.where(go & below, mid + 1, lo)
        hi = tl.where(go & ~below, mid, hi)
    inside = mask & (lo < k)
    return lo, inside & (tl.load(idx + lo, mask=inside, other=-1) == i)


@triton.jit
def _step(d_norm, eta, scales, normalize, i, mask, max_step):
    """``nup.step_core.coefficients``' ok mask and ``u`` for tensors ``i`` (dense ``[n]`` inputs)."""
    d = tl.load(d_norm + i, mask=mask, other=0.0)
    e = tl.load(eta + i, mask=mask, other=0.0)
    s = tl.load(scales + i, mask=mask, other=0.0)
    norm = tl.load(normalize + i, mask=mask, other=0) != 0
    size = tl.where(norm, e * s, e * d)
    ok = mask & (d > 0.0) & (d <= 3.4028234663852886e38) & (size >= 0.0) & (size <= max_step)
    return ok, tl.where(ok, size, 0.0), e


@triton.jit
def _row_sums(dot, i, mask, n_slots, dot_stride, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """``Σ_s dot[i, s]`` over ``n_slots`` partials, in a fixed order."""
    acc = tl.zeros((BLOCK, BLOCK_S), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_S)
    for s0 in range(0, n_slots, BLOCK_S):
        m = mask[:, None] & ((s0 + cols) < n_slots)[None, :]
        acc += tl.load(dot + i[:, None] * dot_stride + (s0 + cols)[None, :], mask=m, other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _clock(clock, any_moved, HAS_CLOCK: tl.constexpr):
    """The clock of the new λ (float64): read again where it is needed, so that nothing float64 stays live
    across the block loops (ptxas spills it around the IEEE division's slow-path call)."""
    if HAS_CLOCK:
        t = tl.load(clock) + any_moved.to(tl.float64)
    else:
        t = tl.cast(0.0, tl.float64)
    return t


@triton.jit
def _log_step(lam, i, mask, active, signal, gain, max_change, min_mult, max_mult):
    """``λ ← clip(λ·exp(clip(gain·s, ±max_change)), min, max)`` where active (the warm-up is the caller's)."""
    factor = tl.exp(_clamp(gain * signal, -max_change, max_change))
    old = tl.load(lam + i, mask=mask, other=1.0)
    return tl.where(active, _clamp(old * factor, min_mult, max_mult), old)


@triton.jit
def _step_tail_kernel(
    update_norm, cos, c_norm, path, lr, skipped,  # the [n] statistics, written in place
    idx, k,  # HAS_IDX: the ascending [k] tensors that took part
    eta, ok, u, dot, c_old,  # [k] (FROM_NORMS: eta [n]; ok, u, c_old unused)
    scales, normalize, d_norm, n_slots, dot_stride,  # FROM_NORMS: [n], and dot is [n, n_slots]
    exact,  # HAS_EXACT: ‖C_{t+1}‖ [k], read from C
    lam, clock, s0, s1, s2, values, n_values,  # the controller's tensors, written in place
    n, max_step, gain, max_change, min_mult, max_mult, warmup, beta, one_minus_beta, target, total_steps, peak,
    HAS_IDX: tl.constexpr, FROM_NORMS: tl.constexpr, HAS_EXACT: tl.constexpr, CONTROLLER: tl.constexpr,
    PER_LAYER: tl.constexpr, HAS_CLOCK: tl.constexpr, HAS_TOTAL: tl.constexpr, SECOND_PASS: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program, two passes over blocks of tensors: (1) per tensor the cosine, ``‖C‖``, the records
    and per-layer controllers, with whether any tensor moved and the sums global controllers pool;
    (2) global controllers, the clock-driven schedules and the warm-up's λ = 1. Values that would
    live across a pass are read again instead (ptxas spills them)."""
    arange = tl.arange(0, BLOCK).to(tl.int64)
    warm_cut = tl.cast(warmup, tl.float64)  # ints equal to 1 arrive as constexprs: tl.cast takes both
    # (1) per tensor
    moved_any = tl.zeros((BLOCK,), dtype=tl.int32)
    pool_a = tl.zeros((BLOCK,), dtype=tl.float32)  # random walk: Σ 2u‖C‖cos; cosine: Σ u
    pool_b = tl.zeros((BLOCK,), dtype=tl.float32)  # random walk: Σ u²; cosine: Σ u·cos
    for start in range(0, n, BLOCK):
        i = start + arange
        in_n = i < n
        if HAS_IDX:
            j, member = _position(idx, i, k, in_n, SEARCH_STEPS)
        else:
            j, member = i, in_n
        if FROM_NORMS:
            moved, step, e = _step(d_norm, eta, scales, normalize, i, member, max_step)
            dt = _row_sums(dot, i, member, n_slots, dot_stride, BLOCK, BLOCK_S)
            c0 = tl.load(c_norm + i, mask=in_n, other=0.0)
        else:
            moved = member & (tl.load(ok + j, mask=member, other=0) != 0)
            step = tl.load(u + j, mask=member, other=0.0)
            e = tl.load(eta + j, mask=member, other=0.0)
            dt = tl.load(dot + j, mask=member, other=0.0)
            c0 = tl.load(c_old + j, mask=member, other=0.0)
        moved_any = tl.maximum(moved_any, moved.to(tl.int32))
        denom = step * c0
        pos = denom > 0
        cs = _clamp(tl.where(pos, _div(dt, tl.where(pos, denom, 1.0)), 0.0), -1.0, 1.0)
        if HAS_EXACT:
            c1 = tl.load(exact + j, mask=member, other=0.0)
        else:
            sq = 2.0 * dt + c0 * c0 + step * step
            c1 = _sqrt(tl.where(sq < 0.0, 0.0, sq))  # clamp_min(0): NaN stays NaN
        if HAS_IDX:  # the tensors outside idx did not move: u = cos = 0, the rest kept
            if FROM_NORMS:
                c_keep = c0
            else:
                c_keep = tl.load(c_norm + i, mask=in_n & ~member, other=0.0)
            c_now = tl.where(member, c1, c_keep)
            u_now = tl.where(member, step, 0.0)
            cos_now = tl.where(member, cs, 0.0)
        else:
            c_now, u_now, cos_now = c1, step, cs
        tl.store(update_norm + i, u_now, mask=in_n)
        tl.store(cos + i, cos_now, mask=in_n)
        tl.store(c_norm + i, c_now, mask=member)
        tl.store(lr + i, e, mask=member)
        tl.store(path + i, tl.load(path + i, mask=member, other=0.0) + step, mask=member)
        skips = tl.load(skipped + i, mask=member, other=0)
        tl.store(skipped + i, skips + (~moved).to(tl.int64), mask=member)
        if CONTROLLER == 1:  # random walk
            c_prev = tl.load(s0 + i, mask=in_n, other=0.0)
            excess = 2.0 * u_now * c_prev * cos_now
            noise = u_now * u_now
            tl.store(s0 + i, c_now, mask=in_n)
            if PER_LAYER:
                ema_x = tl.load(s1 + i, mask=in_n, other=0.0)
                ema_n = tl.load(s2 + i, mask=in_n, other=0.0)
                ema_x = tl.where(moved, beta * ema_x + one_minus_beta * excess, ema_x)
                ema_n = tl.where(moved, beta * ema_n + one_minus_beta * noise, ema_n)
                tl.store(s1 + i, ema_x, mask=in_n)
                tl.store(s2 + i, ema_n, mask=in_n)
                signal = tl.where(ema_n > 0, _div(ema_x, tl.maximum(ema_n, 1e-30)), 0.0)
                new = _log_step(lam, i, in_n, moved, signal, gain, max_change, min_mult, max_mult)
                tl.store(lam + i, new, mask=in_n)
            else:
                pool_a += tl.where(in_n, excess, 0.0)
                pool_b += tl.where(in_n, noise, 0.0)
        if CONTROLLER == 2:  # cosine EMA
            if PER_LAYER:
                ema = tl.load(s0 + i, mask=in_n, other=0.0)
                ema = tl.where(moved, beta * ema + one_minus_beta * cos_now, ema)
                tl.store(s0 + i, ema, mask=in_n)
                new = _log_step(lam, i, in_n, moved, ema - target, gain, max_change, min_mult, max_mult)
                tl.store(lam + i, new, mask=in_n)
            else:
                pool_a += tl.where(in_n, u_now, 0.0)
                pool_b += tl.where(in_n, u_now * cos_now, 0.0)
    # (2) global controllers, the schedules that follow the clock, the warm-up
    if SECOND_PASS:
        sum_a = tl.sum(pool_a, axis=0)
        sum_b = tl.sum(pool_b, axis=0)
        if CONTROLLER == 2:
            mean_cos = tl.where(sum_a > 0, _div(sum_b, tl.maximum(sum_a, 1e-30)), 0.0)
        tl.debug_barrier()  # per layer: pass 1's λ is written before the warm-up's
        for start in range(0, n, BLOCK):
            i = start + arange
            in_n = i < n
            any_moved = tl.max(moved_any, axis=0) > 0
            t = _clock(clock, any_moved, HAS_CLOCK)  # the clock of the new λ (read again: see above)
            warm = t < warm_cut
            if CONTROLLER == 1 or CONTROLLER == 2:
                if PER_LAYER:
                    held = tl.where(warm, 1.0, tl.load(lam + i, mask=in_n, other=1.0))
                    tl.store(lam + i, held, mask=in_n)
            if CONTROLLER == 1 and not PER_LAYER:
                ema_x = tl.load(s1 + i, mask=in_n, other=0.0)
                ema_n = tl.load(s2 + i, mask=in_n, other=0.0)
                ema_x = tl.where(any_moved, beta * ema_x + one_minus_beta * sum_a, ema_x)
                ema_n = tl.where(any_moved, beta * ema_n + one_minus_beta * sum_b, ema_n)
                tl.store(s1 + i, ema_x, mask=in_n)
                tl.store(s2 + i, ema_n, mask=in_n)
                signal = tl.where(ema_n > 0, _div(ema_x, tl.maximum(ema_n, 1e-30)), 0.0)
                new = _log_step(lam, i, in_n, any_moved, signal, gain, max_change, min_mult, max_mult)
                tl.store(lam + i, tl.where(warm, 1.0, new), mask=in_n)
            if CONTROLLER == 2 and not PER_LAYER:
                ema = tl.load(s0 + i, mask=in_n, other=0.0)
                ema = tl.where(any_moved, beta * ema + one_minus_beta * mean_cos, ema)
                tl.store(s0 + i, ema, mask=in_n)
                new = _log_step(lam, i, in_n, any_moved, ema - target, gain, max_change, min_mult, max_mult)
                tl.store(lam + i, tl.where(warm, 1.0, new), mask=in_n)
            if CONTROLLER == 3:  # warm-up, then cosine decay, in float64
                if HAS_TOTAL:
                    span = tl.cast(total_steps, tl.float64) - warm_cut
                    frac = _clamp((t - warm_cut) / span, 0.0, 1.0)
                else:
                    frac = tl.cast(0.0, tl.float64)
                pi = tl.full((), 3.141592653589793, tl.float64)
                low = tl.cast(min_mult, tl.float64)
                decay = low + (1.0 - low) * 0.5 * (1.0 + tl.cos(pi * frac))
                ramp = (t + 1.0) / tl.maximum(warm_cut, 1.0)
                value = (tl.cast(peak, tl.float64) * tl.where(warm, ramp, decay)).to(tl.float32)
                tl.store(lam + i, tl.zeros((BLOCK,), dtype=tl.float32) + value, mask=in_n)
            if CONTROLLER == 4:  # replay
                pick = tl.minimum(t, tl.cast(n_values, tl.float64) - 1.0).to(tl.int64)
                tl.store(lam + i, tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(values + pick), mask=in_n)
    if HAS_CLOCK:
        t = _clock(clock, tl.max(moved_any, axis=0) > 0, HAS_CLOCK)
        tl.debug_barrier()  # every thread has read the old clock (one program: a block-wide barrier)
        tl.store(clock, t)


def _check_stats(stats: Mapping[str, torch.Tensor]) -> tuple[int, torch.device]:
    missing = [key for key in STATISTICS if key not in stats]
    if missing:
        raise KeyError(f"step_tail: the statistics lack {missing}")
    n, device = stats["cos"].numel(), stats["cos"].device
    for key in STATISTICS:
        v = stats[key]
        dtype = torch.int64 if key == "skipped" else torch.float32
        if v.dtype != dtype or v.numel() != n or v.device != device or not v.is_contiguous():
            raise ValueError(f"step_tail: statistic {key!r} must be a contiguous {dtype} [{n}] on {device}")
    return n, device


def _vector(name: str, v: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device,
            written: bool = False) -> torch.Tensor:  # fmt: skip
    """``v`` as a flat vector the kernel can address: checked, never copied when the kernel writes it."""
    if v.numel() != length or v.dtype != dtype or v.device != device or (written and not v.is_contiguous()):
        raise ValueError(f"step_tail: {name} must be {'a contiguous ' if written else ''}{dtype} [{length}] on "
                         f"{device}, got {v.dtype} {tuple(v.shape)} on {v.device}")  # fmt: skip
    return v.reshape(-1).contiguous()  # a view of the usual contiguous vector: no copy, no launch


def _controller_args(controller: Controller | None, n: int, device: torch.device) -> tuple[list, list, dict]:
    """(tensor arguments, scalar arguments, constexprs) of the controller part of the kernel."""
    if controller is None:
        flags = dict(CONTROLLER=_NONE, PER_LAYER=False, HAS_CLOCK=False, HAS_TOTAL=False, SECOND_PASS=False)
        return [None] * 6 + [0], [0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0, 1.0], flags
    lam = _vector("λ", controller.lam, n, torch.float32, device, written=True)
    states = [_vector(f"controller state {i}", s, n, torch.float32, device, written=True)
              for i, s in enumerate(controller.state)]  # fmt: skip
    clock = controller.clock
    if clock is not None and (clock.numel() != 1 or clock.dtype != torch.float64 or clock.device != device):
        raise ValueError(f"step_tail: the clock must be one float64 on {device}")
    values = controller.values
    if values is not None:
        values = _vector("replay values", values, values.numel(), torch.float32, device)
    b = float(controller.beta)
    tensors = [lam, clock, *(states + [None] * (3 - len(states))), values, 0 if values is None else values.numel()]
    scalars = [float(controller.gain), float(controller.max_change), float(controller.min_mult),
               float(controller.max_mult), int(controller.warmup), b, 1.0 - b, float(controller.target),
               int(controller.total_steps or 0), float(controller.peak)]  # fmt: skip
    kind = KINDS.index(controller.kind)
    log = kind in (_RANDOM_WALK, _COSINE_EMA)
    second = (log and (not controller.per_layer or controller.warmup > 0)) or kind in (_WARMUP_COSINE, _REPLAY)
    flags = dict(CONTROLLER=kind, PER_LAYER=bool(controller.per_layer), HAS_CLOCK=clock is not None,
                 HAS_TOTAL=controller.total_steps is not None, SECOND_PASS=second)  # fmt: skip
    return tensors, scalars, flags


def _launch(stats, idx, k_inputs, dense, exact, controller, max_step, from_norms: bool) -> None:
    n, device = _check_stats(stats)
    k = n if idx is None else idx.numel()
    if idx is not None:
        idx = _vector("idx", idx, k, torch.int64, device)
    if exact is not None:
        exact = _vector("c_norm_exact", exact, k, torch.float32, device)
    ctl, scalars, flags = _controller_args(controller, n, device)
    _step_tail_kernel[(1,)](
        *(stats[key] for key in STATISTICS),
        idx, k,
        *k_inputs, *dense, exact, *ctl,
        n, float(max_step), *scalars,
        HAS_IDX=idx is not None, FROM_NORMS=from_norms, HAS_EXACT=exact is not None, **flags,
        SEARCH_STEPS=k.bit_length() if idx is not None else 0,
        BLOCK=BLOCK, BLOCK_S=BLOCK_S, num_warps=NUM_WARPS,
    )  # fmt: skip


def finish_step(
    stats: Mapping[str, torch.Tensor],
    idx: torch.Tensor | None,
    eta: torch.Tensor,
    ok: torch.Tensor,
    u: torch.Tensor,
    dot: torch.Tensor,
    c_norm_old: torch.Tensor,
    c_norm_exact: torch.Tensor | None = None,
    controller: Controller | None = None,
) -> None:
    """One launch: cosines, ``‖C‖``, the records into ``stats`` and the controller's update, in place.

    ``stats``: the ``[n]`` vectors of :data:`STATISTICS` (fp32, ``skipped`` int64), contiguous.
    ``idx``: int64 ``[k]``, ascending, the tensors that took part (None: all ``n``). ``eta``, ``u``,
    ``dot`` (``⟨ΔP_t, C_t⟩``), ``c_norm_old`` (``‖C_t‖``): fp32 ``[k]``; ``ok``: bool ``[k]``;
    ``c_norm_exact``: fp32 ``[k]``, ``‖C_{t+1}‖`` read from ``C`` (None: by the identity).
    ``controller``: the schedule's update (None: λ untouched, no clock). ``c_norm_old`` may be
    ``stats["c_norm"]`` itself when ``idx`` is None.
    """
    n, device = _check_stats(stats)
    if n == 0:
        return
    k = n if idx is None else idx.numel()
    inputs = [_vector(name, v, k, dtype, device) for name, v, dtype in (
        ("eta", eta, torch.float32), ("ok", ok, torch.bool), ("u", u, torch.float32), ("dot", dot, torch.float32),
        ("c_norm_old", c_norm_old, torch.float32))]  # fmt: skip
    _launch(stats, idx, inputs, (None, None, None, 1, 1), c_norm_exact, controller, _FP32_MAX, False)


def finish_from_norms(
    stats: Mapping[str, torch.Tensor],
    idx: torch.Tensor | None,
    eta: torch.Tensor,
    scales: torch.Tensor,
    normalize: torch.Tensor,
    d_norm: torch.Tensor,
    dot: torch.Tensor,
    max_step: float,
    c_norm_exact: torch.Tensor | None = None,
    controller: Controller | None = None,
) -> None:
    """:func:`finish_step` from what the fused backward filed, in the same one launch.

    ``eta`` (``group lr·λ``), ``scales`` (``s_P``), ``normalize`` (bool) and ``d_norm`` (``‖D‖``) are
    the dense fp32 ``[n]`` vectors (entries outside ``idx`` are not read); ``dot`` is fp32 ``[n]``
    or ``[n, S]`` per-program partials of ``⟨ΔP, C_t⟩``, summed here; ``‖C_t‖`` is ``stats["c_norm"]``.
    A tensor is ok (takes its step of ``u = η·s``, or ``η·‖D‖`` where not normalized) when
    ``0 < ‖D‖ < inf`` and ``0 ≤ u ≤ max_step``, as in ``nup.step_core.coefficients``.
    """
    n, device = _check_stats(stats)
    if n == 0:
        return
    dense = [_vector(name, v, n, dtype, device) for name, v, dtype in (
        ("eta", eta, torch.float32), ("scales", scales, torch.float32), ("normalize", normalize, torch.bool),
        ("d_norm", d_norm, torch.float32))]  # fmt: skip
    dot2 = dot.reshape(n, -1)
    if dot2.dtype != torch.float32 or dot2.device != device or dot2.stride(1) != 1:
        raise ValueError(f"step_tail: dot must be fp32 [n] or [n, S] with unit column stride on {device}")
    eta_n, scales_n, normalize_n, d_norm_n = dense
    inputs = [eta_n, None, None, dot2, None]
    _launch(stats, idx, inputs, (scales_n, normalize_n, d_norm_n, dot2.shape[1], dot2.stride(0)), c_norm_exact,
            controller, max_step, True)  # fmt: skip
