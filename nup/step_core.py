"""The formulas of one NuP step, shared by its two front ends: the drop-in step (:mod:`nup.optim`)
and the fused in-backward step (:mod:`nup.fused`).

All vectors are fp32 (``skipped``: int64) of length ``n`` = number of parameter tensors, or ``k``
= the tensors that take part in this step (``idx`` maps ``k`` into ``n``; None when all do).
Nothing here syncs with the host. The optimizer-wide state ``g`` lives in ``opt.state[GLOBAL_KEY]``.

The step's tail (cosines, ``‖C‖``, the records and the schedule's update) is torch ops on CPU, which
are also the oracle; on the Triton code path (CUDA) it is one launch of :mod:`nup_kernels.step_tail`
(from :func:`finish_step`, and from :func:`finish_from_norms` for the fused path), which computes the
same numbers in the same fp32 order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nup_kernels import step_tail
from nup_kernels.backend import use_triton
from nup_kernels.scaled_step import MAX_STEP as MAX_STEP  # the kernels' bound, defined once there

GLOBAL_KEY = "nup"  # key of the optimizer-wide entry in opt.state
STAT_VECTORS = ("update_norm", "cos", "c_norm", "path", "lr", "skipped")


def all_params(param_groups: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    """Every parameter tensor, in group order (the order of the ``[n]`` vectors)."""
    return [p for g in param_groups for p in g["params"]]


def global_state(state: dict[Any, Any], n: int, device: torch.device) -> dict[str, Any]:
    """Optimizer-wide state: the host step count and the ``[n]`` statistic vectors, made or resized."""
    g = state.setdefault(GLOBAL_KEY, {"step": 0})
    for key in STAT_VECTORS:
        v = g.get(key)
        if v is None or v.numel() != n or v.device != device:
            _refuse_while_compiling()
            dtype = torch.int64 if key == "skipped" else torch.float32
            new = torch.zeros(n, dtype=dtype, device=device)
            if v is not None:
                k = min(n, v.numel())
                new[:k] = v[:k].to(device)
            g[key] = new
    return g


def cumulative_buffer(param_state: dict[str, Any], p: torch.Tensor, init_mode: bool) -> torch.Tensor:
    """The tensor's cumulative buffer: ``C`` (zeros at first), or ``P_0`` when ``init_mode``."""
    if "cumulative" not in param_state:
        _refuse_while_compiling()
        param_state["cumulative"] = (
            p.detach().clone() if init_mode else torch.zeros_like(p, memory_format=torch.preserve_format)
        )
    return param_state["cumulative"]


def _refuse_while_compiling() -> None:
    # State made inside a compiled graph can come back aliased (two zero vectors that get the same
    # first value share one buffer), so it is made by an eager step.
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "NuP makes its state in the first step: run one eager opt.step() before calling "
            "torch.compile(opt.step) (and after add_param_group)"
        )


def active_index(active: Sequence[int], n: int, device: torch.device) -> torch.Tensor | None:
    """Index (int64 ``[k]``) of the tensors that take part in this step, or None when all ``n`` do.

    ``active`` is ascending (the step-tail kernel relies on it).
    """
    return None if len(active) == n else torch.tensor(list(active), device=device)


def pick(v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``v[idx]`` (``[n]`` → ``[k]``), or ``v`` itself when ``idx`` is None."""
    return v if idx is None else v.index_select(0, idx)


def coefficients(
    d_norm: torch.Tensor, eta: torch.Tensor, scales: torch.Tensor, normalize: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``‖D‖`` and the rates (all ``[k]``): the ok mask, ``coef`` with ``ΔP = coef·D``, and ``u = ‖ΔP‖``.

    Computed in ``d_norm``'s dtype (float64 on the reference path). Normalized tensors step by
    ``u = η·s``, the others (``normalize`` False) by ``u = η·‖D‖``. A tensor is skipped
    (``coef = −0.0``, so ``P + coef·0`` keeps every bit of P, and ``u = 0``) when its ``‖D‖`` is 0
    or not finite, or its ``u`` is NaN, negative or at least :data:`MAX_STEP` (a group lr or λ
    that is NaN, negative or overflowing): checked on device, with no host sync.
    """
    eta, scales = eta.to(d_norm.dtype), scales.to(d_norm.dtype)
    step_size = torch.where(normalize, eta * scales, eta * d_norm)  # u when ok
    # x.clamp(lo, hi) == x is False for NaN and outside [lo, hi]: two ops a test (each is a launch on CUDA)
    info = torch.finfo(d_norm.dtype)
    positive = d_norm.clamp(info.tiny * info.eps, info.max) == d_norm  # from the least subnormal: 0 < ‖D‖ < inf
    ok = positive & (step_size.clamp(0.0, MAX_STEP) == step_size)
    u = torch.where(ok, step_size, 0.0)
    return ok, (u / torch.where(ok, d_norm, 1.0)).neg_(), u  # coef = −0.0 where skipped


def host_coefficient(d_norm: float, eta: float, scale: float, normalize: bool) -> float:
    """:func:`coefficients`' ``coef`` for one tensor in host floats (CPU, where reading a value is free).

    0.0 when ``‖D‖`` is 0 or not finite, or ``u`` is NaN, negative or at least :data:`MAX_STEP`, as
    there: the caller then leaves the tensor alone.
    """
    if not (math.isfinite(d_norm) and d_norm > 0):
        return 0.0
    step_size = eta * scale if normalize else eta * d_norm
    if not 0.0 <= step_size < MAX_STEP:  # False for NaN too
        return 0.0
    return -step_size / d_norm


def recompute_due(g: dict[str, Any], every: int) -> bool:
    """True on the steps whose ``‖C‖`` is recomputed exactly rather than by the identity."""
    return (g["step"] + 1) % every == 0


def exact_c_norm(
    params: Sequence[torch.Tensor], cumulatives: Sequence[torch.Tensor], init_mode: bool
) -> torch.Tensor:
    """``‖C‖`` per tensor (fp32 ``[k]``) read from the buffers, with ``C = P − P_0`` in init mode."""
    cs = [p.float() - c.float() for p, c in zip(params, cumulatives)] if init_mode else list(cumulatives)
    # C is a sum of bounded steps (u < MAX_STEP each): a plain accumulation in its own precision cannot overflow
    return torch.stack([n.float() for n in torch._foreach_norm(cs, 2)])


def finish_step(
    g: dict[str, Any],
    idx: torch.Tensor | None,
    eta: torch.Tensor,
    ok: torch.Tensor,
    u: torch.Tensor,
    dot: torch.Tensor,
    c_norm_old: torch.Tensor,
    c_norm_exact: torch.Tensor | None,
    schedule: Any,
) -> None:
    """Cosines, ``‖C‖`` by the identity (or ``c_norm_exact``), the records and the schedule update.

    ``dot`` is ``⟨ΔP_t, C_t⟩`` and ``c_norm_old`` is ``‖C_t‖``, both fp32 ``[k]``; ``schedule`` is
    the optimizer's :class:`nup.schedule.MultiplierSchedule`. On the Triton code path this is one
    launch (:func:`nup_kernels.step_tail.finish_step`) with the schedule's update in it, or, for a
    schedule the kernel does not know, the launch and then ``schedule.update`` in torch.
    """
    if use_triton(u):
        controller = schedule.kernel_update(g["cos"].numel(), u.device)
        step_tail.finish_step(g, idx, eta, ok, u, dot, c_norm_old, c_norm_exact, controller)
        g["step"] += 1
        if controller is None:
            _update_schedule(g, idx, ok, schedule)
        return
    denom = u * c_norm_old
    pos = denom > 0
    cos = torch.where(pos, dot / torch.where(pos, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    if c_norm_exact is None:  # ‖C_t‖² + 2⟨ΔP, C_t⟩ + u², in few ops (each is a launch on CUDA)
        c_norm_exact = torch.addcmul(torch.addcmul(2.0 * dot, c_norm_old, c_norm_old), u, u).clamp_min(0.0).sqrt()
    record(g, idx, u, cos, c_norm_exact, eta, ok)
    g["step"] += 1
    _update_schedule(g, idx, ok, schedule)


def finish_from_norms(
    g: dict[str, Any],
    idx: torch.Tensor | None,
    rates: Sequence[torch.Tensor],
    d_norm: torch.Tensor,
    dot: torch.Tensor,
    c_norm_exact: torch.Tensor | None,
    schedule: Any,
) -> None:
    """:func:`coefficients`' ok and ``u``, then :func:`finish_step`, from the fused path's ``[n]`` buffers.

    ``rates``: this step's ``(η, s_P, normalize)``, each ``[n]``; ``d_norm``: ``‖D‖`` fp32 ``[n]``;
    ``dot``: fp32 ``[n, S]`` partials of ``⟨ΔP, C_t⟩`` (entries outside ``idx`` are not read);
    ``c_norm_exact``: ``[k]`` or None. On the Triton code path with a schedule the kernel knows,
    all of it is one launch (:func:`nup_kernels.step_tail.finish_from_norms`); otherwise torch ops.
    """
    controller = schedule.kernel_update(g["cos"].numel(), d_norm.device) if use_triton(d_norm) else None
    if controller is None:
        eta, scales, normalize = (pick(v, idx) for v in rates)
        ok, _, u = coefficients(pick(d_norm, idx), eta, scales, normalize)
        dots = pick(dot.sum(1) if dot.dim() == 2 else dot, idx)
        finish_step(g, idx, eta, ok, u, dots, pick(g["c_norm"], idx), c_norm_exact, schedule)
        return
    step_tail.finish_from_norms(g, idx, *rates, d_norm, dot, MAX_STEP, c_norm_exact, controller)
    g["step"] += 1


def _update_schedule(g: dict[str, Any], idx: torch.Tensor | None, ok: torch.Tensor, schedule: Any) -> None:
    """``schedule.update`` in torch from the recorded vectors; λ stays in its storage."""
    lam = schedule.lam
    moved = ok if idx is None else torch.zeros_like(g["update_norm"], dtype=torch.bool).index_copy(0, idx, ok)
    schedule.update(g["cos"], g["update_norm"], c_norm=g["c_norm"], ok=moved)
    if lam is not None and schedule.lam is not lam and schedule.lam.shape == lam.shape:
        schedule.lam = lam.copy_(schedule.lam)  # in place: a captured step reads what the last one wrote


def record(g, idx, u, cos, c_norm, eta, ok) -> None:
    """Write this step's statistics into the ``[n]`` vectors, in place (``idx``: the tensors that had grads).

    In place, so the vectors keep their storage from step to step (CUDA-graph capture reads them).
    """
    if idx is None:
        for key, value in (("update_norm", u), ("cos", cos), ("c_norm", c_norm), ("lr", eta)):
            g[key].copy_(value)
        g["path"].add_(u)
        g["skipped"].add_(~ok)
        return
    for key in ("update_norm", "cos"):  # tensors without a gradient did not move
        g[key].zero_()
    for key, value in (("update_norm", u), ("cos", cos), ("c_norm", c_norm), ("lr", eta)):
        g[key].index_copy_(0, idx, value)
    g["path"].index_add_(0, idx, u)
    g["skipped"].index_add_(0, idx, (~ok).long())
