"""The fused νP-SGD path: every NuMLP layer's update is applied inside the backward pass.

SPEC §4's schedule sets step ``t+1``'s rate from step ``t``'s statistics, so the rate of a
layer's update is known when its backward runs. The layer's backward then computes
``δ = dy ⊙ φ'``, ``dx = α·δW`` (with the old W), ``‖G‖`` (from two B×B Gram matrices on the
small-batch path, or from the materialized ``G``), and applies ``W += coef·G``, ``C += coef·G``
with ``⟨ΔW, C⟩`` in the same pass. ``.grad`` is never written. ``opt.step()`` then only turns
the per-layer partial sums into statistics and advances the schedule.

Refused, with a clear error: a base optimizer, parameters outside NuMLP layers, and two
backward passes without a step in between (gradient accumulation). Gradient clipping across
layers cannot work either (there are no ``.grad`` tensors): use ``fused=False`` for it.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch

from nup_kernels import reference
from nup_kernels.apply_update import apply_update, choose_update_path
from nup_kernels.backend import use_triton
from nup_kernels.gram_norm import grad_norm_sq_gram
from nup_kernels.linear_act import (
    activation_delta,
    linear_act_backward_dw,
    linear_act_backward_dx,
    linear_act_forward,
)

if TYPE_CHECKING:
    from nup.model import NuLinear
    from nup.optim import NuP


class _LayerUpdate:
    """Installed as ``NuLinear.fused_update``: runs the layer with its update in the backward."""

    def __init__(self, opt: NuP, index_w: int, index_b: int | None) -> None:
        self.opt_ref = weakref.ref(opt)
        self.index_w, self.index_b = index_w, index_b

    def __call__(self, layer: NuLinear, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != layer.fan_in:
            raise ValueError(f"layer expects inputs (..., {layer.fan_in}), got {tuple(x.shape)}")
        x2d = x.reshape(-1, layer.fan_in)
        y = _LinearActUpdate.apply(x2d, layer.weight, layer.bias, layer, self)
        return y.reshape(*x.shape[:-1], layer.fan_out)

    def update(
        self, layer: NuLinear, x: torch.Tensor, dy: torch.Tensor, saved: torch.Tensor, delta: torch.Tensor
    ) -> None:
        """Apply this layer's normalized update in place and file its partial sums with the optimizer."""
        opt = self.opt_ref()
        if opt is None:
            raise RuntimeError("the NuP optimizer of this fused NuMLP was garbage-collected")
        pending = _pending(opt, layer.weight.device)
        if self.index_w in pending["seen"]:
            raise RuntimeError(
                "fused NuP applies each layer's update inside backward: call opt.step() after every "
                "backward pass; for gradient accumulation use NuP(..., fused=False)"
            )
        w, alpha, init = layer.weight, layer.alpha, opt.cumulative == "init"
        path = choose_update_path(x.shape[0], w.shape[0], w.shape[1], w.dtype)
        if path == "small_batch":
            grad, g_sq = None, grad_norm_sq_gram(x, delta, alpha)
        elif use_triton(x):
            grad, g_sq = linear_act_backward_dw(dy, saved, x, alpha, layer.activation)
        else:
            grad, g_sq = reference.linear_act_backward_dw(delta, x, alpha)
        self._apply(opt, pending, self.index_w, w, g_sq.sqrt(), grad=grad, x=x, delta=delta, alpha=alpha, init=init)
        if self.index_b is not None:
            db = reference.bias_grad(delta, layer.bias_scale)
            self._apply(opt, pending, self.index_b, layer.bias, db.norm(), grad=db, init=init)

    @staticmethod
    def _apply(
        opt: NuP,
        pending: dict[str, Any],
        i: int,
        p: torch.Tensor,
        d_norm: torch.Tensor,
        *,
        grad: torch.Tensor | None,
        init: bool,
        x=None,
        delta=None,
        alpha: float = 1.0,
    ) -> None:
        _, _, coef, _ = opt._coefficients(d_norm.reshape(1), _index_tensor(i, p.device), p.device, pending["rates"])
        cumulative = opt._cumulative_buffer(p)
        if p.dim() == 2:
            dot = apply_update(p, cumulative, coef, grad=grad, x=x, delta=delta, alpha=alpha, cumulative_is_init=init)
        else:
            dot = reference.apply_update(p, cumulative, coef.reshape(()), grad=grad, cumulative_is_init=init)
        pending["d_norm"][i] = d_norm
        pending["dot"][i] = dot
        pending["seen"].append(i)


class _LinearActUpdate(torch.autograd.Function):
    """``y = φ(α·x Wᵀ + bias_scale·b)`` whose backward returns ``dx`` and updates W, b in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, hook):
        act = layer.activation
        if use_triton(x) and act.name != "custom":
            y, saved = linear_act_forward(x, weight, bias, layer.alpha, layer.bias_scale, act)
        else:
            y, h = reference.linear_act_forward(x, weight, bias, layer.alpha, layer.bias_scale, act)
            saved = y if act.grad_from_output else h
        ctx.save_for_backward(x, weight, saved)
        ctx.layer, ctx.hook = layer, hook
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, saved = ctx.saved_tensors
        layer = ctx.layer
        act = layer.activation
        if use_triton(x) and act.name != "custom":
            delta = activation_delta(dy, saved, act)
        else:
            delta = reference.activation_delta(dy, saved, act, act.grad_from_output)
        dx = None
        if ctx.needs_input_grad[0]:  # uses the old W: computed before the update
            if use_triton(x) and act.name != "custom":
                dx = linear_act_backward_dx(dy, saved, weight, layer.alpha, act, out_dtype=x.dtype)
            else:
                dx = reference.linear_act_backward_dx(delta, weight, layer.alpha).to(x.dtype)
        with torch.no_grad():
            ctx.hook.update(layer, x, dy, saved, delta)
        return dx, None, None, None, None


@functools.lru_cache(maxsize=4096)
def _index_tensor(i: int, device: torch.device) -> torch.Tensor:
    """``tensor([i])`` on ``device``, made once (no host-to-device copy per step)."""
    return torch.tensor([i], device=device)


def _pending(opt: NuP, device: torch.device) -> dict[str, Any]:
    """This step's per-tensor ``‖D‖`` and ``⟨ΔP, C⟩`` (fp32 ``[n]``), which tensors were updated, and the rates."""
    state = getattr(opt, "_fused_pending", None)
    if state is None:
        n = len(opt._params())
        state = {
            "d_norm": torch.zeros(n, dtype=torch.float32, device=device),
            "dot": torch.zeros(n, dtype=torch.float32, device=device),
            "seen": [],
            "rates": opt._rates(device),  # once per step, shared by every layer and by opt.step()
        }
        opt._fused_pending = state
    return state


def attach_fused(opt: NuP) -> None:
    """Install the fused update on every NuMLP layer whose parameters ``opt`` holds."""
    if opt.base is not None:
        raise ValueError("fused=True is νP-SGD mode only; it cannot wrap a base optimizer (use fused=False)")
    index = {id(p): i for i, p in enumerate(opt._params())}
    layers = {}
    for p in opt._params():
        ref = getattr(p, "_nup_layer", None)
        layer = ref() if ref is not None else None
        if layer is None:
            raise ValueError(
                "fused=True needs every parameter to belong to a NuMLP layer; use fused=False for other models"
            )
        layers[id(layer)] = layer
    for layer in layers.values():
        if id(layer.weight) not in index or (layer.bias is not None and id(layer.bias) not in index):
            raise ValueError("fused=True needs each layer's weight and bias in the same optimizer")
        layer.fused_update = _LayerUpdate(
            opt, index[id(layer.weight)], None if layer.bias is None else index[id(layer.bias)]
        )


def finish_fused_step(opt: NuP, device: torch.device) -> None:
    """Turn the partial sums the backward filed into this step's statistics; advance the schedule."""
    pending = getattr(opt, "_fused_pending", None)
    if pending is None or not pending["seen"]:
        return
    opt._fused_pending = None
    params = opt._params()
    g = opt._global(device)
    active = sorted(pending["seen"])
    idx = opt._index(active, len(params), device)
    pick = (lambda v: v) if idx is None else (lambda v: v.index_select(0, idx))
    eta, ok, _, u = opt._coefficients(pick(pending["d_norm"]), idx, device, pending["rates"])
    c_norm_old = pick(g["c_norm"])
    exact = None
    if (g["step"] + 1) % opt.recompute_every == 0:
        ps = [params[i] for i in active]
        cs = [opt._cumulative_buffer(p) for p in ps]
        if opt.cumulative == "init":
            cs = [p.float() - c.float() for p, c in zip(ps, cs)]
        exact = torch.stack(torch._foreach_norm(cs, 2, dtype=torch.float32))
    opt._finish_step(g, idx, eta, ok, u, pick(pending["dot"]), c_norm_old, exact)
