"""Wrapper mode's fast CPU path for a torch ``Adam`` or ``AdamW`` base: its step and NuP's in two loops.

Generic wrapper mode lets the base step ``P`` and then reads what it moved (a snapshot, ``‖old − P‖``
and the rebase: 10 passes over ``P`` beyond the base's own). For a torch ``Adam``/``AdamW`` with the
options taken here (no amsgrad, not capturable, not differentiable, no step hooks, a state the base
has already made, fp32 contiguous CPU tensors) the base's direction
``D = step_size·m/(√v/√(1 − β2^t) + ε) + lr·wd·P`` (the last term for AdamW), exactly what torch's step
subtracts from ``P``, is formed where it is used:

1. per tensor, one loop updates the moments in the base's own state as torch does and sums ``‖D‖²``;
2. one loop recomputes ``D`` and applies ``P += coef·D``, ``C += coef·D``, summing ``⟨D, C⟩``.

The base's state after the step (``step``, ``exp_avg``, ``exp_avg_sq``) is the one its own step
leaves, so checkpoints move freely between this path and the generic one. Anything else (another
optimizer, a subclass, other options) takes the generic path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from nup_kernels import cpu

BASES = (torch.optim.Adam, torch.optim.AdamW)
"""The base types this path takes (exactly these: a subclass may change the step)."""


def groups_of(base: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """``id(param) → base param group``."""
    return {id(p): g for g in base.param_groups for p in g["params"]}


def takes(bases: list[torch.optim.Optimizer], params: list[torch.Tensor], grads: list[torch.Tensor | None],
          cumulatives: list[torch.Tensor]) -> bool:
    """Whether this step of ``params`` (their ``grads`` and NuP's ``cumulatives``) can take the fast path."""
    if len(bases) != 1 or type(bases[0]) not in BASES or _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        return False
    base = bases[0]
    if base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks or torch.compiler.is_compiling():
        return False
    where = groups_of(base)
    for p, g, c in zip(params, grads, cumulatives, strict=True):
        group, state = where.get(id(p)), base.state.get(p)
        if group is None or not state or "exp_avg" not in state or g is None or g.is_sparse:
            return False  # the first step makes the state: torch's own step does that
        if group["amsgrad"] or group["capturable"] or group["differentiable"]:
            return False
        if not cpu.loop_ready(p, g, c, state["exp_avg"], state["exp_avg_sq"]):
            return False
    return True


def hyper(group: dict[str, Any], step: float, decoupled: bool) -> tuple[float, ...]:
    """The loops' scalars for one tensor at Adam step ``step`` (already counted), as torch forms them:
    ``(sign, l2, 1−β1, β2, 1−β2, step_size = lr/(1 − β1^t), √(1 − β2^t), eps, lr·wd if decoupled)``."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    beta1, beta2 = (float(b) for b in group["betas"])
    step_size = lr / (1 - beta1**step)
    return (-1.0 if group["maximize"] else 1.0, 0.0 if decoupled else wd, 1 - beta1, beta2, 1 - beta2,
            step_size, (1 - beta2**step) ** 0.5, float(group["eps"]), lr * wd if decoupled else 0.0)


def moments(base: torch.optim.Optimizer, params: list[torch.Tensor],
            grads: list[torch.Tensor]) -> tuple[list[tuple[float, ...]], list[float]]:
    """The base's step without its move: count the step, update the moments, and return each
    tensor's loop scalars and ``‖D‖²``. The gradients are finite (the caller checked)."""
    where = groups_of(base)
    states = [base.state[p] for p in params]
    torch._foreach_add_([s["step"] for s in states], 1)
    if hasattr(base.step, "_wrapped_by_lr_sched"):
        base._opt_called = True  # what the scheduler's wrapper of base.step records
    plans, d_sq = [], []
    for p, g, s in zip(params, grads, states):
        group = where[id(p)]
        h = hyper(group, float(s["step"]), group.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW)))
        plans.append(h)
        d_sq.append(cpu.adam_moments(p.detach(), g, s["exp_avg"], s["exp_avg_sq"], h))
    return plans, d_sq


def directions(base: torch.optim.Optimizer, params: list[torch.Tensor],
               plans: list[tuple[float, ...]]) -> list[torch.Tensor]:
    """Each ``D`` materialized (eager torch), for the general normalized step."""
    out = []
    for p, h in zip(params, plans):
        s = base.state[p]
        step_size, bc2s, eps, dwd = h[5:]
        out.append(s["exp_avg"] / (s["exp_avg_sq"].sqrt() / bc2s + eps) * step_size + dwd * p.detach())
    return out


def apply(base: torch.optim.Optimizer, params: list[torch.Tensor], cumulatives: list[torch.Tensor],
          plans: list[tuple[float, ...]], coefs: list[float]) -> list[float]:
    """``P += coef·D`` and ``C += coef·D`` per tensor (a coef of 0 leaves it alone); ``⟨D, C_old⟩`` each."""
    dots = []
    for p, c, h, cf in zip(params, cumulatives, plans, coefs):
        s = base.state[p]
        dots.append(0.0 if cf == 0.0 else cpu.adam_apply(p.detach(), s["exp_avg"], s["exp_avg_sq"], c, h, cf))
    return dots
