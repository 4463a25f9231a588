"""The formulas of one NuP step, shared by its two front ends: the drop-in step (:mod:`nup.optim`)
and the fused in-backward step (:mod:`nup.fused`).

All vectors are fp32 (``skipped``: int64) of length ``n`` = number of parameter tensors, or ``k``
= the tensors that take part in this step (``idx`` maps ``k`` into ``n``; None when all do).
Nothing here syncs with the host. The optimizer-wide state ``g`` lives in ``opt.state[GLOBAL_KEY]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nup.norms import direction_norms

MAX_STEP = math.sqrt(torch.finfo(torch.float32).max)
"""Largest step norm ``u`` taken: ``u²`` must stay finite in the fp32 ‖C‖ identity (about 1.8e19)."""
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
        param_state["cumulative"] = (
            p.detach().clone() if init_mode else torch.zeros_like(p, memory_format=torch.preserve_format)
        )
    return param_state["cumulative"]


def active_index(active: Sequence[int], n: int, device: torch.device) -> torch.Tensor | None:
    """Index (int64 ``[k]``) of the tensors that take part in this step, or None when all ``n`` do."""
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
    ok = torch.isfinite(d_norm) & (d_norm > 0) & (step_size >= 0) & (step_size < MAX_STEP)
    coef = torch.where(ok, -step_size / torch.where(ok, d_norm, 1.0), -0.0)
    return ok, coef, torch.where(ok, step_size, 0.0)


def recompute_due(g: dict[str, Any], every: int) -> bool:
    """True on the steps whose ``‖C‖`` is recomputed exactly rather than by the identity."""
    return (g["step"] + 1) % every == 0


def exact_c_norm(
    params: Sequence[torch.Tensor], cumulatives: Sequence[torch.Tensor], init_mode: bool
) -> torch.Tensor:
    """``‖C‖`` per tensor (fp32 ``[k]``) read from the buffers, with ``C = P − P_0`` in init mode."""
    cs = [p.float() - c.float() for p, c in zip(params, cumulatives)] if init_mode else list(cumulatives)
    return direction_norms(cs, host_readable=False).float()  # every 100 steps: no host read needed


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
    the optimizer's :class:`nup.schedule.MultiplierSchedule`.
    """
    denom = u * c_norm_old
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    if c_norm_exact is None:
        c_norm_exact = (c_norm_old.square() + 2.0 * dot + u.square()).clamp_min(0.0).sqrt()
    record(g, idx, u, cos, c_norm_exact, eta, ok)
    g["step"] += 1
    schedule.update(g["cos"], g["update_norm"])


def record(g, idx, u, cos, c_norm, eta, ok) -> None:
    """Write this step's statistics into the ``[n]`` vectors (``idx``: the tensors that had grads)."""
    if idx is None:
        g["update_norm"], g["cos"], g["c_norm"], g["lr"] = u, cos, c_norm, eta
        g["path"] = g["path"] + u
        g["skipped"] = g["skipped"] + (~ok).long()
        return
    for key, value in (("update_norm", u), ("cos", cos)):  # tensors without a gradient did not move
        g[key] = torch.zeros_like(g[key]).index_copy_(0, idx, value)
    for key, value in (("c_norm", c_norm), ("lr", eta)):
        g[key] = g[key].index_copy(0, idx, value)
    g["path"] = g["path"].index_add(0, idx, u)
    g["skipped"] = g["skipped"].index_add(0, idx, (~ok).long())
