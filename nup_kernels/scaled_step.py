"""The step ``coef·D`` of the apply kernels for any fp64 coefficient, in fp32 arithmetic (issue #13).

A normalized step's coefficient ``coef = −u/‖D‖`` leaves fp32's range when the direction's scale
does: ``‖D‖`` of a finite fp32 tensor lies between about 1e-45 (one subnormal entry) and 1e42
(many entries near fp32's max), so ``coef`` spans about 1e-45·u to 1e45·u. The kernels form
``coef`` in fp64 and apply it as an exact power of two ``hi`` (a normal fp32 number) times an fp32
factor ``lo``: ``step = (D·hi)·lo``. ``D·hi`` is exact (it cannot overflow: ``|D·hi| ≤ |coef·D|``,
an entry of a step whose norm is below ``MAX_STEP``), so the step is rounded once, as a plain fp32
``coef·D`` would be when ``coef`` is representable. No per-element fp64 arithmetic is needed.

The same exact power-of-two scaling keeps the fp32 (tensor-core) Gram tiles of
:mod:`nup_kernels.gram_norm` in range (:func:`unit_exponent`, :func:`pow2`).
"""

from __future__ import annotations

from nup_kernels.backend import tl, triton

#: fp32's least subnormal (2^-149) and largest finite value: a recorded ``‖D‖`` stays in between
LEAST_SUBNORMAL = 2.0**-149
FP32_MAX = 3.4028234663852886e38
#: largest step norm ``u`` taken (√ of fp32's max, about 1.8e19): ``u²`` must stay finite in the fp32
#: ‖C‖ identity; ``nup.step_core`` and the kernels compare against this one value
MAX_STEP = 1.844674352395373e19
# Globals read inside kernels must be constexpr.
_LEAST, _MAX, _MAX_STEP = (tl.constexpr(v) for v in (LEAST_SUBNORMAL, FP32_MAX, MAX_STEP))


@triton.jit
def pow2(k):
    """``2^k`` in fp32 for an integer ``k`` in ``[-126, 127]``, built from its bits (exact)."""
    return ((k + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def pow2_64(k):
    """``2^k`` in fp64 for an integer ``k`` in ``[-1022, 1023]``, built from its bits (exact)."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def unit_exponent(m):
    """The integer ``k`` in ``[-126, 126]`` with ``m·2^k < 1`` and, unless clamped, ``≥ 1/2``, for an fp32 ``m ≥ 0``
    (a max of absolute values): scaling by ``2^k`` brings values at most ``m`` into ``[0, 1)``, exactly."""
    e = ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # m's binary exponent (-127 for 0 and subnormals)
    return tl.minimum(tl.maximum(-(e + 1), -126), 126)


@triton.jit
def split_coefficient(coef):
    """``(hi, lo)`` in fp32 for an fp64 ``coef``: ``hi = 2^k`` with ``k`` clamped to ``[-126, 127]`` and
    ``lo = coef/2^k`` rounded to fp32, so ``(x·hi)·lo`` is ``coef·x`` with one rounding. ``coef = 0`` gives
    ``lo = 0``."""
    bits = coef.to(tl.int64, bitcast=True)
    k = tl.minimum(tl.maximum(((bits >> 52) & 0x7FF) - 1023, -126), 127)  # coef's binary exponent, clamped
    return pow2(k), (coef * pow2_64(-k)).to(tl.float32)


@triton.jit
def normalized_coefficient(norm, a, b):
    """``(coef, recorded)`` from ``‖D‖`` (fp64) and the rates ``a``, ``b``: ``coef = −(a/‖D‖ + b)`` in fp64,
    or 0 to skip, and the ``‖D‖`` to record (fp32).

    The step's norm is ``u = a + b·‖D‖``; the step is skipped when ``‖D‖`` is below fp32's least
    subnormal (0 included) or not finite, or ``u`` is NaN, negative or at least ``MAX_STEP`` (a bad lr
    or λ), as on every path. A taken step records ``‖D‖`` clamped to fp32's finite range, so the
    optimizer's fp32 test of the recorded value agrees with the kernel's; a skipped one records 0,
    NaN or Inf.
    """
    norm = tl.cast(norm, tl.float64)
    a = tl.cast(a, tl.float64)
    b = tl.cast(b, tl.float64)
    u = a + b * norm
    ok = (norm >= _LEAST) & (norm < float("inf")) & (u >= 0.0) & (u < _MAX_STEP)  # False for NaN
    coef = tl.where(ok, -(a / tl.where(ok, norm, 1.0) + b), 0.0)
    recorded = tl.where(ok, tl.minimum(norm, _MAX), tl.where(norm < _LEAST, 0.0, norm))
    return coef, recorded.to(tl.float32)
