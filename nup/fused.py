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

from nup import step_core as core
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


class FusedStep:
    """The fused path of one NuP optimizer: this step's per-tensor ``‖D‖`` and ``⟨ΔP, C⟩`` (fp32 ``[n]``),
    filed by the layers' backward, and :meth:`finish`, which ``opt.step()`` calls.

    Reads the optimizer only through its public attributes (``param_groups``, ``state``,
    ``schedule``, ``cumulative``, ``recompute_every``, ``rates``).
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt_ref = weakref.ref(opt)
        self.pending: dict[str, Any] | None = None

    def optimizer(self) -> Any:
        opt = self.opt_ref()
        if opt is None:
            raise RuntimeError("the NuP optimizer of this fused NuMLP was garbage-collected")
        return opt

    def begin(self, device: torch.device) -> dict[str, Any]:
        """This step's buffers and rates, made by the first layer whose backward runs."""
        if self.pending is None:
            opt = self.optimizer()
            n = len(core.all_params(opt.param_groups))
            self.pending = {
                "d_norm": torch.zeros(n, dtype=torch.float32, device=device),
                "dot": torch.zeros(n, dtype=torch.float32, device=device),
                "seen": [],
                "rates": opt.rates(device),  # once per step, shared by every layer and by finish()
            }
        return self.pending

    def finish(self, device: torch.device) -> None:
        """Turn the partial sums the backward filed into this step's statistics; advance the schedule."""
        pending = self.pending
        if pending is None or not pending["seen"]:
            return
        self.pending = None
        opt = self.optimizer()
        params = core.all_params(opt.param_groups)
        g = core.global_state(opt.state, len(params), device)
        active = sorted(pending["seen"])
        idx = core.active_index(active, len(params), device)
        eta, scales, normalize = (core.pick(v, idx) for v in pending["rates"])
        ok, _, u = core.coefficients(core.pick(pending["d_norm"], idx), eta, scales, normalize)
        exact = None
        if core.recompute_due(g, opt.recompute_every):
            init = opt.cumulative == "init"
            ps = [params[i] for i in active]
            exact = core.exact_c_norm(ps, [core.cumulative_buffer(opt.state[p], p, init) for p in ps], init)
        dot = core.pick(pending["dot"], idx)
        core.finish_step(g, idx, eta, ok, u, dot, core.pick(g["c_norm"], idx), exact, opt.schedule)


class _LayerUpdate:
    """Installed as ``NuLinear.fused_update``: runs the layer with its update in the backward."""

    def __init__(self, fused: FusedStep, index_w: int, index_b: int | None) -> None:
        self.fused = fused
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
        """Apply this layer's normalized update in place and file its partial sums."""
        opt = self.fused.optimizer()
        pending = self.fused.begin(layer.weight.device)
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
        _apply(opt, pending, self.index_w, w, g_sq.sqrt(), grad=grad, x=x, delta=delta, alpha=alpha, init=init)
        if self.index_b is not None:
            db = reference.bias_grad(delta, layer.bias_scale)
            _apply(opt, pending, self.index_b, layer.bias, db.norm(), grad=db, init=init)


def _apply(
    opt: Any,
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
    index = _index_tensor(i, p.device)
    eta, scales, normalize = (v.index_select(0, index) for v in pending["rates"])
    _, coef, _ = core.coefficients(d_norm.reshape(1), eta, scales, normalize)
    cumulative = core.cumulative_buffer(opt.state[p], p, init)
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


def attach_fused(opt: torch.optim.Optimizer) -> FusedStep:
    """Install the fused update on every NuMLP layer whose parameters ``opt`` (a NuP) holds."""
    if opt.base is not None:
        raise ValueError("fused=True is νP-SGD mode only; it cannot wrap a base optimizer (use fused=False)")
    params = core.all_params(opt.param_groups)
    index = {id(p): i for i, p in enumerate(params)}
    fused = FusedStep(opt)
    layers = {}
    for p in params:
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
            fused, index[id(layer.weight)], None if layer.bias is None else index[id(layer.bias)]
        )
    return fused
