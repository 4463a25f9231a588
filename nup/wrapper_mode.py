"""Wrapper mode's step (``NuP(base=...)``): the base optimizer's own step, normalized per tensor.

:class:`WrapperMode` is the part of :class:`nup.optim.NuP` that drives the base: the general path
(the base steps ``P`` from a copy, NuP takes ``D = P_t − P`` through its normalized step; the one CUDA
and compiled steps take), and two host-side CPU paths for fp32 tensors: the rebase (one snapshot
pass, the base's step, ``‖D‖`` and one update loop) and, over a torch Adam/AdamW base, the step of
:mod:`nup.adam_base` (the base's moments and ``‖D‖`` in one loop, the update in another).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nup import adam_base
from nup import step_core as core
from nup.distributed import _local
from nup_kernels import cpu

PASS_THROUGH = ("momentum", "betas")  # group keys copied to the base's groups before every base step


def host_readable(t: torch.Tensor) -> bool:
    """True for CPU tensors: there is no device queue, so reading a value costs no sync."""
    return t.device.type == "cpu"


def _stored(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local (DTensor) dense storage of each gradient: a sparse gradient's stored values."""
    return [g._values() if g.is_sparse else g for g in _local(grads)]


class WrapperMode:
    """Wrapper-mode methods of :class:`nup.optim.NuP` (which provides ``bases``, the groups, ``rates``,
    ``_normalized_step`` and the other step parts used here)."""

    def _pass_through(self) -> None:
        """Copy each group's ``momentum``/``betas`` to the base groups holding its tensors."""
        targets = getattr(self, "_base_targets", None)
        if targets is None or len(targets) != len(self.param_groups):
            where = {id(p): bg for b in self.bases for bg in b.param_groups for p in bg["params"]}
            targets = [list({id(where[id(p)]): where[id(p)] for p in g["params"]}.values()) for g in self.param_groups]
            self._base_targets = targets
        for group, base_groups in zip(self.param_groups, targets):
            for key in PASS_THROUGH:
                if key in group:
                    for bg in base_groups:
                        if key in bg:
                            bg[key] = group[key]

    def _wrapper_step(
        self, params: list[torch.Tensor], active: list[int], act_params: list[torch.Tensor], device: torch.device
    ) -> None:
        """Wrapper mode: the base's step, normalized. The base steps the parameters in place from a
        copy ``old``; the direction is ``D = old − P`` and ``P = old + coef·D``.

        A non-finite gradient anywhere skips the whole step, the base's included (like torch's
        GradScaler), and counts every tensor as skipped. On CPU the base is then not called; on CUDA
        (no host sync) a base that takes ``found_inf`` (torch's fused optimizers) skips on device,
        and any other base steps on gradients with the non-finite entries zeroed (its state stays
        finite) while every parameter is restored. A zero gradient is no special case: the base's
        move is normalized; when the base does not move (SGD or Adam at step 0 without weight decay)
        ``‖D‖ = 0`` and the tensor is left bit-identical.
        """
        cumulatives = [self._cumulative_buffer(p) for p in act_params]
        grads = [p.grad for p in act_params]
        every = torch.ones(len(act_params), dtype=torch.bool, device=device)
        if self._rebase_ready(act_params, cumulatives, grads):  # CPU, fp32: the host-side paths
            if self._adam_ready(act_params, cumulatives, grads):
                if cpu.all_finite(grads):
                    self._adam_step(params, active, act_params, cumulatives, device)
                    return
            else:
                old = self._wrapper_scratch(act_params)
                if cpu.snapshot_if_finite(old, [p.detach() for p in act_params], grads):
                    self._rebase_step(params, active, act_params, cumulatives, device, old)
                    return
            self._normalized_step(params, active, act_params, grads, cumulatives, device, every)  # skip everything
            return
        found = self._found_non_finite(grads)
        if host_readable(found) and not torch.compiler.is_compiling() and bool(found):
            self._normalized_step(params, active, act_params, grads, cumulatives, device, every)  # skip, as above
            return
        for g in _stored(grads):  # the base's state stays finite (it may still step: see above)
            g.nan_to_num_(0.0, 0.0, 0.0)
        old = [p.detach().clone() for p in act_params]
        self._base_step(found)
        directions = torch._foreach_sub(old, act_params)  # what base moved, as a descent direction
        for p, o in zip(act_params, old):  # per tensor: DTensor has no foreach_copy_ rule
            p.copy_(o)
        self._normalized_step(params, active, act_params, directions, cumulatives, device, every & found)

    def _rebase_ready(self, params: list[torch.Tensor], cumulatives: list[torch.Tensor], grads: list) -> bool:
        """True when a host-side path takes this step: eager, delta mode, CPU fp32 dense tensors."""
        return (
            not torch.compiler.is_compiling() and self.cumulative == "delta"
            and all(g is not None and not g.is_sparse for g in grads)
            and all(cpu.loop_ready(p, c, g) for p, c, g in zip(params, cumulatives, grads))
        )  # fmt: skip

    def _adam_ready(self, params: list[torch.Tensor], cumulatives: list[torch.Tensor], grads: list) -> bool:
        """True when :mod:`nup.adam_base` takes this step (a torch Adam/AdamW base, no NuP weight decay)."""
        return not any(g["weight_decay"] for g in self.param_groups) and adam_base.takes(
            self.bases, params, grads, cumulatives)

    def _adam_step(self, params: list[torch.Tensor], active: list[int], act_params: list[torch.Tensor],
                   cumulatives: list[torch.Tensor], device: torch.device) -> None:
        """Wrapper mode over a torch Adam/AdamW base on CPU (finite gradients): the base's moments and
        ``‖D‖`` in one loop, then one loop ``P += coef·D``, ``C += coef·D``, ``⟨D, C⟩`` (:mod:`nup.adam_base`)."""
        self._pass_through()
        base = self.bases[0]
        plans, d_sq = adam_base.moments(base, act_params, [p.grad for p in act_params])
        self._host_step(params, active, act_params, cumulatives, device, d_sq,
                        lambda coefs: adam_base.apply(base, act_params, cumulatives, plans, coefs),
                        lambda: adam_base.directions(base, act_params, plans))

    def _rebase_step(
        self, params: list[torch.Tensor], active: list[int], act_params: list[torch.Tensor],
        cumulatives: list[torch.Tensor], device: torch.device, old: list[torch.Tensor],
    ) -> None:  # fmt: skip
        """Wrapper mode on CPU, fp32, after ``old`` took a copy of P: step the base, then per tensor
        ``‖old − P‖`` and one loop ``P = old + coef·D``, ``C += coef·D``, ``⟨D, C⟩`` (no clone, no sub)."""
        self._base_step(None)

        def update(coefs: list[float]) -> list[float]:
            dots = []
            for p, o, c, cf in zip(act_params, old, cumulatives, coefs):
                if cf == 0.0:  # skipped: back to the old bits
                    p.detach().copy_(o)
                    dots.append(0.0)
                else:
                    dots.append(cpu.rebase_update(p.detach(), o, c, cf))
            return dots

        def restore() -> list[torch.Tensor]:
            directions = [o - p.detach() for o, p in zip(old, act_params)]
            for p, o in zip(act_params, old):
                p.detach().copy_(o)
            return directions

        self._host_step(params, active, act_params, cumulatives, device,
                        [cpu.dist_sq(o, p) for o, p in zip(old, act_params)], update, restore, old)

    def _host_step(
        self, params: list[torch.Tensor], active: list[int], act_params: list[torch.Tensor],
        cumulatives: list[torch.Tensor], device: torch.device, d_sq: list[float],
        update: Callable[[list[float]], list[float]], directions: Callable[[], list[torch.Tensor]],
        old: list[torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        """The rest of a host-side wrapper step once each ``‖D‖²`` is known: coefficients, then
        ``update(coefs) → ⟨D, C_old⟩`` per tensor, NuP's weight decay (from ``old = P_t``) and the
        step's tail. An extreme but finite ``‖D‖`` sends ``directions()`` (P restored to ``P_t``)
        through the general normalized step instead."""
        if any(v != 0.0 and not 1e-24 < v < 1e24 for v in d_sq):
            self._normalized_step(params, active, act_params, directions(), cumulatives, device)
            return
        d_norm = torch.tensor([math.sqrt(v) for v in d_sq], dtype=torch.float32)
        g = self._global(device)
        idx = core.active_index(active, len(params), device)
        eta, scales, normalize = (core.pick(v, idx) for v in self.rates(device))
        ok, coef, u = core.coefficients(d_norm, eta, scales, normalize)
        dots = update(coef.tolist())
        if old is not None:
            self._rebase_weight_decay(act_params, old, ok, idx, device)
        exact = None
        if core.recompute_due(g, self.recompute_every):
            exact = core.exact_c_norm(act_params, cumulatives, False)
        dot = coef * torch.tensor(dots, dtype=torch.float32)
        core.finish_step(g, idx, eta, ok, u, dot, core.pick(g["c_norm"], idx), exact, self.schedule)

    def _wrapper_scratch(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reused fp32 copies of the parameters (not optimizer state: not in the state dict)."""
        scratch = self.__dict__.setdefault("_scratch", {})
        out = []
        for p in params:
            t = scratch.get(p)
            if t is None or t.shape != p.shape:
                t = scratch[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(t)
        return out

    def _base_step(self, found: torch.Tensor | None) -> None:
        """Every base optimizer's step, after this step's ``momentum``/``betas`` reach their groups;
        ``found`` (0-dim bool, non-finite gradients) goes to the bases that take ``found_inf``."""
        self._pass_through()
        for base in self.bases:
            amp = found is not None and getattr(base, "_step_supports_amp_scaling", False)
            if amp:
                base.found_inf = found.float().reshape(1)
            try:
                base.step()
            finally:
                if amp:
                    del base.found_inf

    @staticmethod
    def _found_non_finite(grads: list[torch.Tensor]) -> torch.Tensor:
        """0-dim bool: some gradient holds NaN or Inf (on DTensor shards: on any rank)."""
        local = _stored(grads)
        if not torch.compiler.is_compiling() and all(host_readable(g) and not hasattr(g, "to_local") for g in grads):
            return torch.tensor(not cpu.all_finite(local))
        found = ~torch.stack([torch.isfinite(n) for n in torch._foreach_norm(local, math.inf)]).all()  # max|g|
        if any(g is not t for g, t in zip(grads, _local(grads))) and torch.distributed.is_initialized():
            flag = found.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank agrees
            found = flag > 0
        return found

    def _rebase_weight_decay(self, params: list[torch.Tensor], old: list[torch.Tensor], ok: torch.Tensor,
                             idx: torch.Tensor | None, device: torch.device) -> None:
        """:meth:`_weight_decay` for the CPU rebase path, after its update: ``P −= η·wd·P_t`` (``old`` = ``P_t``)."""
        shrink = self._decay(ok, idx, device)
        if shrink is None:
            return
        for p, o, s in zip(params, old, shrink.tolist()):
            if s:
                p.detach().sub_(o, alpha=s)
