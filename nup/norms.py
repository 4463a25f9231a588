"""Frobenius norms of update directions that neither overflow nor underflow (issue #13).

A normalized step does not care about the direction's scale, so any finite, non-zero ``D`` must
get a finite, non-zero ``‖D‖``. A plain fp32 sum of squares overflows above about 1e19 and
underflows below about 1e-19 (fp64: 1e154 and 1e-154), so such norms are redone: 16/32-bit
tensors accumulate in float64 (whose range holds the square of any fp32 value), float64 tensors
are first divided by ``max|D|``. Where the host can read the first result without a sync (CPU),
only the tensors that need it are redone; elsewhere every tensor takes the safe form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# |‖D‖| inside these bounds: the fast accumulation was exact to rounding
_FAST_RANGE = {torch.float64: (1e-150, 1e150)}
_FAST_RANGE_DEFAULT = (1e-18, 1e18)


def _safe_norm(t: torch.Tensor) -> torch.Tensor:
    """``‖t‖`` (float64 0-dim) for any finite ``t``: float64 accumulation, scaled by ``max|t|`` for float64."""
    if t.dtype != torch.float64:
        return torch.linalg.vector_norm(t, dtype=torch.float64)
    m = t.abs().amax() if t.numel() else t.new_zeros(())
    scale = torch.where(torch.isfinite(m) & (m > 0), m, 1.0)
    return torch.linalg.vector_norm(t / scale) * scale


def unit_direction(t: torch.Tensor) -> torch.Tensor:
    """``t/‖t‖`` computed in float64 after dividing by ``max|t|`` (exact scale), in ``t``'s dtype."""
    x = t.double()
    x = x / x.abs().amax()
    return (x / torch.linalg.vector_norm(x)).to(t.dtype)


def direction_norms(tensors: Sequence[torch.Tensor], host_readable: bool) -> torch.Tensor:
    """``‖D_i‖`` for every tensor, float64 ``[k]``, finite and non-zero for every finite non-zero ``D_i``.

    ``host_readable`` (CPU tensors): a fast fp32 (float64 for float64 tensors) foreach pass, and only
    the tensors whose norm is out of that pass's exact range are redone. Otherwise one float64
    foreach pass for the 16/32-bit tensors (no host sync), and the scaled form for float64 ones.
    """
    narrow = [t for t in tensors if t.dtype != torch.float64]
    wide = [t for t in tensors if t.dtype == torch.float64]
    if host_readable:
        narrow_norms = torch._foreach_norm(narrow, 2, dtype=torch.float32) if narrow else []
        wide_norms = torch._foreach_norm(wide, 2) if wide else []
    else:
        narrow_norms = torch._foreach_norm(narrow, 2, dtype=torch.float64) if narrow else []
        wide_norms = [_safe_norm(t) for t in wide]
    narrow_it, wide_it = iter(narrow_norms), iter(wide_norms)  # back in the tensors' order; stack promotes
    out = torch.stack([next(wide_it) if t.dtype == torch.float64 else next(narrow_it) for t in tensors]).double()
    if host_readable:
        for i, (t, value) in enumerate(zip(tensors, out.tolist(), strict=True)):
            lo, hi = _FAST_RANGE.get(t.dtype, _FAST_RANGE_DEFAULT)
            if not lo < value < hi:  # 0, tiny, huge, inf or NaN: redo (0 and NaN stay what they are)
                out[i] = _safe_norm(t)
    return out


def representable(
    directions: list[torch.Tensor], ok: torch.Tensor, coef: torch.Tensor, u: torch.Tensor, host: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``coef·D`` computable in the apply's arithmetic (fp32, or float64 for float64 tensors).

    A coefficient outside that arithmetic's normal range (``‖D‖`` below about 1e-38·u or above
    about 1e38·u) is replaced, on CPU, by ``−u`` on the unit direction (written into
    ``directions``); elsewhere (no host read without a sync) that tensor is skipped instead.
    """
    kinds = [torch.float64 if d.dtype == torch.float64 else torch.float32 for d in directions]
    if len(set(kinds)) == 1:
        tiny, huge = torch.finfo(kinds[0]).tiny, torch.finfo(kinds[0]).max
    else:
        tiny, huge = (torch.tensor([getattr(torch.finfo(k), a) for k in kinds], dtype=torch.float64,
                                   device=coef.device) for a in ("tiny", "max"))
    fits = (coef == 0) | ((coef.abs() >= tiny) & (coef.abs() <= huge))
    if not host:
        ok = ok & fits
        return ok, torch.where(ok, coef, -0.0), torch.where(ok, u, 0.0)
    if bool(fits.all()):
        return ok, coef, u
    coef = coef.clone()
    for i in torch.nonzero(ok & ~fits).flatten().tolist():
        directions[i] = unit_direction(directions[i])
        coef[i] = -u[i]
    return ok, coef, u
