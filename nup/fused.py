"""The fused νP-SGD path: every NuMLP layer's update is applied inside the backward pass.

SPEC §4's schedule sets step ``t+1``'s rate from step ``t``'s statistics, so the rate of a
layer's update is known when its backward runs. The layer's backward then computes
``δ = dy ⊙ φ'``, ``dx = α·δW`` (with the old W), ``‖G‖`` (from two B×B Gram matrices on the
small-batch path, or from the materialized ``G``), and applies ``W += coef·G``, ``C += coef·G``
with ``⟨ΔW, C⟩`` in the same pass. ``.grad`` is never written. ``opt.step()`` then only turns
the per-layer partial sums into statistics and advances the schedule. On CPU at small batch (see
:func:`autograd_route`) the layer runs autograd's own ops with W and b detached (autograd computes
only ``dx``), a pre-hook on its pre-activation's node keeps ``x`` and ``δ``, and the updates run when the backward
pass ends (one autograd-engine callback): each layer's ``G`` is formed in one shared buffer just before
its loop reads it, with ``‖G‖`` from the Grams where they beat a read. At larger batches the layer
runs :class:`_LinearActUpdate` (α inside the GEMMs) and, on CPU, hands ``x`` and ``δ`` to the same
end-of-pass update: made between the backward's GEMMs, the updates evicted the data those GEMMs read
next (measured 1.025× the drop-in step at batch 256 that way, 1.012× deferred).

Refused, with a clear error: a base optimizer, parameters outside NuMLP layers, and two
backward passes without a step in between (gradient accumulation). Gradient clipping across
layers cannot work either (there are no ``.grad`` tensors): use ``fused=False`` for it.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nup import model as nup_model
from nup import step_core as core
from nup.norms import direction_norms, unit_direction
from nup_kernels import cpu, gram_norm, reference
from nup_kernels.apply_update import apply_bias_update, apply_normalized_update, choose_update_path, max_programs
from nup_kernels.backend import use_triton
from nup_kernels.gram_norm import grad_norm_sq_gram
from nup_kernels.linear_act import (
    activation_delta,
    linear_act_backward_delta_dx,
    linear_act_backward_dw,
    linear_act_forward,
)

if TYPE_CHECKING:
    from nup.model import NuLinear


class FusedStep:
    """The fused path of one NuP optimizer: per-step buffers the layers' backward fills, and
    :meth:`finish`, which ``opt.step()`` calls once.

    Buffers (made at the first step, reused after): ``d_norm`` fp32 ``[n]`` (``‖D‖`` per tensor),
    ``dot`` fp32 ``[n, slots]`` (per-program partials of ``⟨ΔP, C_old⟩``, summed by :meth:`finish`'s
    one step-tail launch) and ``rates`` fp32 ``[n, 2]`` (``η·s`` for normalized tensors, ``η`` for the
    others), which the apply kernels read to form ``coef = −(rates[i,0]/‖G‖ + rates[i,1])``.
    On CPU the same numbers are host floats. Reads the optimizer only through its public
    attributes (``param_groups``, ``state``, ``schedule``, ``cumulative``, ``recompute_every``, ``rates``).
    """

    def __init__(self, opt: torch.optim.Optimizer, slots: int) -> None:
        self.opt_ref = weakref.ref(opt)
        self.slots = slots
        self.seen: list[int] = []
        self.buffers: dict[str, Any] = {}
        self.host: dict[str, list] | None = None  # CPU: this step's rates, ‖D‖ and dots as floats
        self.rates: tuple[torch.Tensor, ...] = ()  # this step's η, s_P and normalize mask, set by the first layer
        self.deferred: list[tuple] = []  # autograd route: (update, layer, x, δ) due at the pass's end

    def defer(self, update: _LayerUpdate, layer: NuLinear, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Autograd route, the pre-hook on a layer's ``h``: keep its input ``x`` and ``δ = ∂L/∂h`` for the update
        at the end of the pass; the first of a backward pass queues :meth:`run_deferred`."""
        if delta is None:  # no gradient reached this layer's h
            return
        if not self.deferred:
            torch.autograd.Variable._execution_engine.queue_callback(self.run_deferred)
        self.deferred.append((update, layer, x, delta))

    def run_deferred(self) -> None:
        """End of the backward pass: each captured layer's update from its ``x`` and ``δ``, as the
        in-backward update makes it (``G`` into the one shared buffer just before the loop reads it, ``‖G‖``
        from the Grams where they beat a read). A layer applied twice in the pass gets the sum of both."""
        pending, self.deferred = self.deferred, []
        by_layer: dict[int, list] = {}
        for entry in pending:
            by_layer.setdefault(id(entry[0]), []).append(entry)
        with torch.no_grad():
            for uses in by_layer.values():
                update, layer, x, delta = uses[0]
                if len(uses) > 1:
                    x, delta = torch.cat([u[2] for u in uses]), torch.cat([u[3] for u in uses])
                update.update(layer, x, None, None, delta)

    def grad_buffer(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """CPU: an fp32 view of ``shape`` on the one scratch buffer every layer's ``G`` is formed in (each is
        consumed by its loop before the next layer's is formed); grown to the largest layer once."""
        views = self.buffers.setdefault("grad_views", {})
        view = views.get(shape)
        if view is None or view.device != like.device:
            numel = math.prod(shape)
            buf = self.buffers.get("grad")
            if buf is None or buf.numel() < numel or buf.device != like.device:
                buf = self.buffers["grad"] = torch.empty(numel, dtype=torch.float32, device=like.device)
                views.clear()  # views of the old buffer
            view = views[shape] = buf[:numel].view(shape)
        return view

    def optimizer(self) -> Any:
        opt = self.opt_ref()
        if opt is None:
            raise RuntimeError("the NuP optimizer of this fused NuMLP was garbage-collected")
        return opt

    def begin(self, index: int, param: torch.Tensor) -> None:
        """Called by each tensor's update: refuses a second backward; the first one sets this step's rates
        (host floats where the kernels do not run, the device rate table where they do)."""
        if index in self.seen:
            raise RuntimeError(
                "fused NuP applies each layer's update inside backward: call opt.step() after every "
                "backward pass; for gradient accumulation use NuP(..., fused=False)"
            )
        if not self.seen:
            device = param.device
            self.rates = eta, scales, normalize = self.optimizer().rates(device)
            if not use_triton(param):
                n = eta.numel()
                self.host = {"rates": [v.tolist() for v in (eta, scales, normalize)], "d_norm": [0.0] * n,
                             "dot": [0.0] * n}  # fmt: skip
            else:
                b = self._device_buffers(eta.numel(), device)
                torch.mul(eta.unsqueeze(1), self._rate_factors(scales, normalize), out=b["rates"])
                b["dot"].zero_()  # a layer's kernel writes only its programs' slots (their count follows the path)
        self.seen.append(index)

    def _device_buffers(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        b = self.buffers
        if "d_norm" not in b or b["d_norm"].numel() != n or b["d_norm"].device != device:
            b["d_norm"] = torch.zeros(n, dtype=torch.float32, device=device)
            b["dot"] = torch.zeros(n, self.slots, dtype=torch.float32, device=device)
            b["rates"] = torch.zeros(n, 2, dtype=torch.float32, device=device)
        return b

    def _rate_factors(self, scales: torch.Tensor, normalize: torch.Tensor) -> torch.Tensor:
        """``[n, 2]``: ``(s_P, 0)`` for normalized tensors, ``(0, 1)`` for the others; made once per scale table."""
        b = self.buffers
        if b.get("factors_of") is not scales or b.get("factors_mask") is not normalize:  # held: ids stay unique
            b["factors"] = torch.stack([torch.where(normalize, scales, 0.0), (~normalize).float()], 1)
            b["factors_of"], b["factors_mask"] = scales, normalize
        return self.buffers["factors"]

    def host_coefficient(self, i: int, d_norm: float) -> float:
        """CPU: tensor ``i``'s ``coef`` (0.0 to skip) from its ``‖D‖`` and this step's rates."""
        eta, scales, normalize = self.host["rates"]
        return core.host_coefficient(d_norm, eta[i], scales[i], normalize[i])

    def file_host(self, i: int, d_norm: float, dot: float) -> None:
        self.host["d_norm"][i], self.host["dot"][i] = d_norm, dot

    def finish(self, device: torch.device) -> None:
        """Turn what the backward filed into this step's statistics; advance the schedule."""
        if not self.seen:
            return
        opt = self.optimizer()
        params = core.all_params(opt.param_groups)
        active, self.seen = sorted(self.seen), []
        g = core.global_state(opt.state, len(params), device)
        idx = core.active_index(active, len(params), device)
        exact = None
        if core.recompute_due(g, opt.recompute_every):
            init = opt.cumulative == "init"
            ps = [params[i] for i in active]
            exact = core.exact_c_norm(ps, [core.cumulative_buffer(opt.state[p], p, init) for p in ps], init)
        if self.host is None:  # the kernels ran: the tail is one launch from the buffers they filled
            b = self.buffers
            core.finish_from_norms(g, idx, self.rates, b["d_norm"], b["dot"], exact, opt.schedule)
            return
        eta, scales, normalize = (core.pick(v, idx) for v in self.rates)
        # float64: a norm beyond fp32's range (a float64 G, or fp32 entries near 1e38) stays what the loop used
        d_norm = torch.tensor(self.host["d_norm"], dtype=torch.float64, device=device)
        dot = torch.tensor(self.host["dot"], dtype=torch.float32, device=device)
        self.host = None
        ok, _, u = core.coefficients(core.pick(d_norm, idx), eta, scales, normalize)
        u = u.float()
        # a skipped tensor's dot is 0 already (its kernel or loop did not run)
        core.finish_step(g, idx, eta, ok, u, core.pick(dot, idx), core.pick(g["c_norm"], idx), exact, opt.schedule)


class _LayerUpdate:
    """Installed as ``NuLinear.fused_update``: runs the layer with its update in the backward."""

    def __init__(self, fused: FusedStep, index_w: int, index_b: int | None) -> None:
        self.fused = fused
        self.index_w, self.index_b = index_w, index_b
        self.scratch: dict[str, torch.Tensor] = {}  # per-layer buffers, made once per shape

    def __call__(self, layer: NuLinear, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != layer.fan_in:
            raise ValueError(f"layer expects inputs (..., {layer.fan_in}), got {tuple(x.shape)}")
        x2d = x if x.dim() == 2 else x.reshape(-1, layer.fan_in)
        if autograd_route(layer, x2d):
            y = layer.activation.apply_(self._captured_preactivation(layer, x2d))
        else:
            y = _LinearActUpdate.apply(x2d, layer.weight, layer.bias, layer, self)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], layer.fan_out)

    def _captured_preactivation(self, layer: NuLinear, x: torch.Tensor) -> torch.Tensor:
        """Autograd route: ``h = α·x Wᵀ + bias_scale·b`` with W and b detached, so autograd computes only
        ``dx`` (with the old W); a pre-hook on ``h``'s node hands ``δ = ∂L/∂h`` and ``x`` to the end-of-pass update."""
        h = nn.functional.linear(x, layer.weight.detach())
        # the first layer's x needs no gradient, but its δ must still reach the update
        alpha = layer.alpha_like(h)
        h = h.mul_(alpha) if h.requires_grad else h.requires_grad_() * alpha
        if layer.bias is not None:
            h = h.add_(layer.bias.detach(), alpha=layer.bias_scale)
        fused = self.fused
        # a pre-hook on h's node gets ∂L/∂h as its first gradient; cheaper than a tensor hook (no hook dict)
        h.grad_fn.register_prehook(lambda grads: fused.defer(self, layer, x, grads[0]))
        return h

    def update(self, layer: NuLinear, x: torch.Tensor, dy: torch.Tensor, saved: torch.Tensor, delta) -> None:
        """Apply this layer's normalized update in place and file its partial sums."""
        opt, fused, w = self.fused.optimizer(), self.fused, layer.weight
        init = opt.cumulative == "init"
        fused.begin(self.index_w, w)
        if self.index_b is not None:
            fused.begin(self.index_b, w)
        c_w = core.cumulative_buffer(opt.state[w], w, init)
        c_b = None if layer.bias is None else core.cumulative_buffer(opt.state[layer.bias], layer.bias, init)
        if fused.host is not None:
            self._update_cpu(layer, x, delta, c_w, c_b, init)
        else:
            self._update_kernels(layer, x, dy, saved, delta, c_w, c_b, init)

    def _update_cpu(self, layer, x, delta, c_w, c_b, init: bool) -> None:
        """BLAS: ``G/α = δᵀx`` into a reused buffer, ``‖G‖`` from the B×B Grams where they beat a read of
        G, then the one-loop update. A norm out of the fast sum's exact range is redone as nup.norms does, and a
        coefficient out of fp32's normal range steps along the unit direction instead (as the drop-in
        path does: any finite, non-zero G takes its step)."""
        w, alpha = layer.weight, layer.alpha
        batch, (n_out, n_in) = x.shape[0], w.shape
        acc = torch.promote_types(w.dtype, torch.float32)  # float64 tensors: float64 G and statistics
        if w.dtype == x.dtype == torch.float32:
            g = torch.mm(delta.t(), x, out=self.fused.grad_buffer((n_out, n_in), w))  # G/α
        else:
            g = delta.to(acc).t() @ x.to(acc)
        g_sq = _grad_norm_sq(x, delta, alpha, g, alpha, grams_beat_a_read(batch, n_in, n_out), acc)
        self._host_step(self.index_w, w, c_w, g, alpha, g_sq, acc, init)
        if layer.bias is not None:
            db = reference.bias_grad(delta, layer.bias_scale)
            self._host_step(self.index_b, layer.bias, c_b, db, 1.0, _grad_norm_sq(None, None, 1.0, db, 1.0, False, acc),
                            acc, init)

    def _host_step(self, index: int, param: torch.Tensor, c: torch.Tensor, g: torch.Tensor, scale: float,
                   g_sq: float, acc: torch.dtype, init: bool) -> None:
        """CPU: tensor ``index``'s update along ``G = scale·g`` with ``‖G‖² = g_sq`` (one loop), filed for
        the step's tail. A sum of squares out of the fast sum's exact range is redone as nup.norms does."""
        lo, hi = _NORM_SQ_EXACT[acc]
        if lo < g_sq < hi:
            d_norm = math.sqrt(g_sq)
        else:  # 0, tiny, huge or not finite: the norm of the materialized G that neither overflows nor underflows
            d_norm = float(direction_norms([g], True)[0]) * scale
        coef = self.fused.host_coefficient(index, d_norm)
        self.fused.file_host(index, d_norm, _step_cpu(param, c, g, coef, scale, d_norm, init))

    def _update_kernels(self, layer, x, dy, saved, delta, c_w, c_b, init: bool) -> None:
        """Triton (CUDA, or the interpreter) and the oracle: ‖G‖² partials (fp64), then one apply launch with
        the coefficient formed inside (fp64, applied as an exact power of two times an fp32 factor, so
        an extreme but finite G takes its step); the bias in one launch of its own. float64 layers run
        torch ops in float64 (G, ‖G‖ and the update), as the kernels are 16/32-bit."""
        b, w, alpha = self.fused.buffers, layer.weight, layer.alpha
        out = dict(rates=b["rates"], d_norm_out=b["d_norm"], cumulative_is_init=init)
        path = choose_update_path(x.shape[0], w.shape[0], w.shape[1], w.dtype, w.device)
        if torch.float64 in (w.dtype, x.dtype, delta.dtype):  # the float64 route: G materialized in float64
            grad = (delta.double().t() @ x.double()).mul_(alpha)
            g_sq = torch.linalg.vector_norm(grad).square().reshape(1)
        elif path == "small_batch" and use_triton(x) and x.shape[0] > 0:
            grad, g_sq = None, self._gram_partials(x, delta, alpha)
        elif path == "small_batch":
            grad, g_sq = None, grad_norm_sq_gram(x, delta, alpha).reshape(1)
        elif use_triton(x):
            grad, g_sq = linear_act_backward_dw(dy, saved, x, alpha, layer.activation, delta=delta)
            g_sq = g_sq.reshape(1)
        else:
            grad, g_sq = reference.linear_act_backward_dw(delta, x, alpha)
            g_sq = g_sq.reshape(1)
        apply_normalized_update(
            w, c_w, g_sq, self.index_w, dot_out=b["dot"][self.index_w], grad=grad, x=x, delta=delta,
            alpha=alpha, **out,
        )  # fmt: skip
        if layer.bias is not None:
            apply_bias_update(
                layer.bias, c_b, delta, layer.bias_scale, self.index_b, dot_out=b["dot"][self.index_b], **out
            )

    def _gram_partials(self, x: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
        """``‖G‖²`` as float64 per-program partials of the Gram kernel, in one launch into a reused buffer."""
        size = gram_norm.grad_norm_sq_partials_size(x.shape[0], x.shape[1], delta.shape[1])
        out = self.scratch.get("gram")
        if out is None or out.shape != (size,) or out.device != x.device or out.dtype != torch.float64:
            out = self.scratch["gram"] = torch.zeros(size, dtype=torch.float64, device=x.device)
        return gram_norm.grad_norm_sq_partials(x, delta, alpha, out=out)


#: sums of squares inside these bounds are exact to rounding (no overflow, no underflow), per accumulation dtype
_NORM_SQ_EXACT = {torch.float32: (1e-30, 1e30), torch.float64: (1e-290, 1e290)}
#: a read of G (memory-bound) costs about this many Gram multiply-adds (compute-bound BLAS on B×n)
_GRAM_MACS_PER_READ = 8
#: G smaller than this (bytes) is still in cache when it is read: the read then beats the Grams
_GRAM_MIN_BYTES = 1 << 20


def autograd_route(layer: NuLinear, x: torch.Tensor) -> bool:
    """CPU, a small batch (as :data:`nup.model.NATIVE_MAX_INPUT`), an activation whose ``φ'`` is read from
    ``y``: the layer runs autograd's own ops and its updates run at the end of the backward pass (no
    Python autograd Function, no update between the backward's GEMMs)."""
    return (not use_triton(x) and x.numel() <= nup_model.NATIVE_MAX_INPUT and cpu.folds_into_blas(layer.activation)
            and x.dtype == layer.weight.dtype)


def grams_beat_a_read(batch: int, n_in: int, n_out: int) -> bool:
    """CPU: True when ``‖G‖²`` from the two B×B Grams (``B²·(n_in + n_out)`` multiply-adds) costs less
    than a read of the just-written fp32 G (measured on one core: G of 900×841 at batch 32, 46 µs
    for the Grams against 109 µs for the read; G of 484×441, still in L2, 36 against 15)."""
    big = n_in * n_out * 4 >= _GRAM_MIN_BYTES
    return big and batch * batch * (n_in + n_out) <= _GRAM_MACS_PER_READ * n_in * n_out


def _grad_norm_sq(x, delta, alpha: float, g, scale: float, gram: bool, dtype: torch.dtype) -> float:
    """``‖G‖²`` as a host float, accumulated in ``dtype``: from the Grams of ``x`` and ``δ`` or from ``g = G/scale``."""
    if gram:  # ‖α·δᵀx‖² = α²·⟨x xᵀ, δ δᵀ⟩
        xs, ds = x.to(dtype), delta.to(dtype)
        return float(((xs @ xs.t()) * (ds @ ds.t())).sum()) * alpha * alpha
    if dtype == torch.float32 and cpu.loop_ready(g):
        return cpu.sum_squares(g) * scale * scale
    flat = g.reshape(-1).to(dtype)
    return float(torch.dot(flat, flat)) * scale * scale


def _step_cpu(w, c, g, coef: float, scale: float, d_norm: float, init: bool) -> float:
    """``W += coef·scale·g``, ``C`` likewise, by the one loop; return ``⟨ΔW, C_old⟩`` (0.0 when skipped).

    A coefficient that is not a normal fp32 (‖G‖ beyond about 1e38·u either way) steps by ``−u`` on
    the unit direction instead, where the loop's fp32 arithmetic holds."""
    if coef == 0.0:
        return 0.0
    step = coef * scale
    if not _FP32_NORMAL[0] <= abs(step) <= _FP32_NORMAL[1]:
        g, step = unit_direction(g), coef * d_norm  # coef·‖G‖ = −u
    return step * cpu.update_and_dot(w, c, g, step, init)


_FP32_NORMAL = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


class _LinearActUpdate(torch.autograd.Function):
    """``y = φ(α·x Wᵀ + bias_scale·b)`` whose backward returns ``dx`` and updates W, b in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, hook):
        act = layer.activation
        kernels = use_triton(x) and act.name != "custom"
        if kernels:
            y, saved = linear_act_forward(x, weight, bias, layer.alpha, layer.bias_scale, act)
        elif cpu.folds_into_blas(act) and x.dtype == weight.dtype:
            y = saved = cpu.scaled_linear_act_forward(x, weight, bias, layer.alpha, layer.bias_scale, act)
        else:
            y, h = reference.linear_act_forward(x, weight, bias, layer.alpha, layer.bias_scale, act)
            saved = y if act.grad_from_output else h
        ctx.save_for_backward(x, weight, saved)
        ctx.layer, ctx.hook, ctx.kernels = layer, hook, kernels
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, saved = ctx.saved_tensors
        layer = ctx.layer
        act = layer.activation
        dx = None
        if ctx.kernels and ctx.needs_input_grad[0]:  # δ and dx (with the old W) in one launch
            delta, dx = linear_act_backward_delta_dx(dy, saved, weight, layer.alpha, act, out_dtype=x.dtype)
        elif ctx.kernels:
            delta = activation_delta(dy, saved, act)
        elif cpu.folds_into_blas(act) and x.dtype == weight.dtype:
            delta = cpu.output_delta(dy, saved, act).to(torch.promote_types(dy.dtype, torch.float32))
        else:
            delta = reference.activation_delta(dy, saved, act, act.grad_from_output)
        if ctx.needs_input_grad[0] and not ctx.kernels:  # uses the old W: computed before the update
            dx = cpu.scaled_mm(delta.to(weight.dtype), weight, layer.alpha).to(x.dtype)
        if use_triton(x):
            with torch.no_grad():
                ctx.hook.update(layer, x, dy, saved, delta)
        else:  # CPU: at the end of the pass, as the autograd route (no update evicting the backward's data)
            ctx.hook.fused.defer(ctx.hook, layer, x, delta)
        return dx, None, None, None, None


def dot_slots(params: list[torch.Tensor]) -> int:
    """Per-tensor partials of ``⟨ΔP, C⟩`` the apply kernels may write (the ``dot`` buffer's width)."""
    return max([max_programs(p.shape[0], p.shape[1]) if p.dim() == 2 else 1 for p in params] + [1])


def attach_fused(opt: torch.optim.Optimizer) -> FusedStep:
    """Install the fused update on every NuMLP layer whose parameters ``opt`` (a NuP) holds."""
    if opt.base is not None:
        raise ValueError("fused=True is νP-SGD mode only; it cannot wrap a base optimizer (use fused=False)")
    params = core.all_params(opt.param_groups)
    index = {id(p): i for i, p in enumerate(params)}
    fused = FusedStep(opt, dot_slots(params))
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
