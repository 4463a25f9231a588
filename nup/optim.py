"""NuP: normalized updates with per-tensor update geometry (SPEC §2–4).

``ΔP_t = −η_t·s_P·D_t/‖D_t‖_F`` with ``η_t = group['lr']·λ_t``; ``D_t`` is the gradient
(νP-SGD, ``base=None``) or the step a base optimizer would have taken (wrapper mode). For
every tensor and step NuP keeps, on device and without host syncs: the update norm ``u_t``,
the cosine between ``ΔP_t`` and the cumulative update ``C_t = P_t − P_0``, ``‖C‖`` (through
``‖C_{t+1}‖² = ‖C_t‖² + 2⟨ΔP_t, C_t⟩ + u_t²``, recomputed every ``recompute_every`` steps),
the coherence ``‖C‖/Σu``, the effective lr and a count of skipped steps.

Which tensors are normalized, at what scale ``s_P`` (:mod:`nup.scales`), and how the others move:

- tensors with NuMLP metadata, and every tensor with 2+ dimensions: normalized, at the scale of
  the metadata, a ``scales=`` override, or the layout rule of :mod:`nup.scales`;
- other tensors (biases, norm weights) unless ``normalize_vectors``: in νP-SGD mode a plain
  ``−η·g`` step; in wrapper mode **the base's own step** ``D``, times ``(group lr / lr_ref)·λ``
  (``lr_ref``: the group's lr when it was added), so that they train at the base's rate and every
  lr schedule still applies to them as a ratio. Their ``lr`` statistic is that multiplier.

``weight_decay`` (per group) is decoupled, as in AdamW: ``P ← P·(1 − η·wd)`` with the effective
``η = group lr·λ``, applied before the normalized step and outside the normalized direction, and
skipped with it. The cumulative update ``C`` (and so cos and ‖C‖) holds the normalized updates only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nup import param_groups as pg
from nup import step_core as core
from nup.distributed import _local, stat_reducer
from nup.fused import attach_fused
from nup.norms import direction_norms, representable
from nup.scales import Overrides, check_overrides, resolve_scale
from nup.scales import default_scale as default_scale  # re-exported: nup.optim.default_scale
from nup.schedule import ConstantSchedule, MultiplierSchedule
from nup.step_core import GLOBAL_KEY as _GLOBAL
from nup.wrapper_mode import PASS_THROUGH, WrapperMode, host_readable
from nup_kernels import cpu, multi_tensor
from nup_kernels.backend import use_triton

CUMULATIVE_MODES = ("delta", "init")
STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "skipped")


class NuP(WrapperMode, torch.optim.Optimizer):
    """Normalized-update optimizer with update geometry. A real ``torch.optim.Optimizer``.

    Args:
        params: tensors, ``model.named_parameters()`` (names key :meth:`stats`; torch keeps them in
            ``group['param_names']``, so they survive ``add_param_group`` and the state dict), groups,
            or the model itself (named, and :mod:`nup.scales` reads its layers' layouts).
        lr: base rate ``η`` (a float or a one-element tensor); ``group['lr']`` stays the user's
            (torch LR schedulers compose).
        base: None (direction = gradient), or a torch optimizer over the same parameters whose
            step gives the direction, or several (e.g. SparseAdam for the embeddings and AdamW for
            the rest), each over its own parameters; their state is never written by NuP.
            ``momentum``/``betas`` of NuP's groups are copied to the base's groups before each
            base step, so cyclic schedulers (OneCycleLR) drive the base through NuP.
        weight_decay: decoupled decay per group (see the module docstring).
        scales: per-tensor ``s_P`` overrides: ``{name or fnmatch pattern: s}``, or a rule
            ``(name, tensor, layout) -> s | None`` (see :mod:`nup.scales`); :meth:`scales` reads them.
        schedule: a :class:`nup.schedule.MultiplierSchedule` (default constant ``λ = 1``).
        cumulative: ``"delta"`` stores ``C`` per tensor; ``"init"`` stores ``P_0`` (fp32 only).
        foreach: use foreach kernels on the reference path (default: yes).
        fused: NuMLP only, νP-SGD mode: apply each layer's update inside the backward pass.
        recompute_every: recompute ``‖C‖`` exactly every this many steps.
        scale: per-group override of ``s_P`` for every tensor in the group.
        normalize_vectors: normalize 1-D tensors without metadata too (default: plain
            ``−η·g`` steps in νP-SGD mode, the base's step in wrapper mode).

    Groups also take ``momentum`` (0 without a base: recorded for schedulers, unused) or the base's
    ``betas``. Sparse gradients need a base that takes them (SparseAdam); νP-SGD refuses them.
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        lr: float | torch.Tensor,
        base: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedule: MultiplierSchedule | None = None,
        cumulative: str = "delta",
        foreach: bool | None = None,
        fused: bool = False,
        recompute_every: int = 100,
        scale: float | None = None,
        normalize_vectors: bool = False,
        weight_decay: float = 0.0,
        scales: Overrides | None = None,
    ) -> None:
        pg.check_group_values(dict(lr=lr, scale=scale, normalize_vectors=normalize_vectors, weight_decay=weight_decay))
        lr = pg.check_lr(lr)
        if cumulative not in CUMULATIVE_MODES:
            raise ValueError(f"cumulative must be one of {CUMULATIVE_MODES}, got {cumulative!r}")
        if isinstance(recompute_every, bool) or not isinstance(recompute_every, int) or recompute_every < 1:
            raise ValueError(f"recompute_every must be an integer >= 1, got {recompute_every!r}")
        groups = pg.groups(params, base is not None)
        bases = [] if base is None else [base] if isinstance(base, torch.optim.Optimizer) else list(base)
        momentum = {k: v for b in bases for k, v in b.defaults.items() if k in PASS_THROUGH}
        defaults = dict(lr=lr, scale=scale, normalize_vectors=normalize_vectors, weight_decay=float(weight_decay),
                        **(momentum if bases else {"momentum": 0.0}))
        self._scale_overrides = scales
        super().__init__(groups, defaults)
        self.bases: list[torch.optim.Optimizer] = bases
        self.base = base
        self.schedule = schedule if schedule is not None else ConstantSchedule()
        self.cumulative = cumulative
        self.foreach = True if foreach is None else foreach
        self.recompute_every = recompute_every
        self.fused = fused
        if self.bases:
            self._check_bases()
        check_overrides(scales, self.param_names)
        if fused and any(g["weight_decay"] for g in self.param_groups):
            raise ValueError("weight_decay needs fused=False (the fused step applies updates inside backward)")
        for p in self._params():
            if cumulative == "init" and p.dtype != torch.float32:
                raise ValueError("cumulative='init' stores P_0 and needs fp32 parameters (W − P_0 cancels in 16-bit)")
        self._fused = attach_fused(self) if fused else None

    # ----------------------------------------------------------------------------------------
    # bookkeeping
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def param_names(self) -> list[str]:
        """One name per tensor, in group order: torch's ``param_names`` (without ``_orig_mod.``), else ``param{i}``."""
        names, i = [], 0
        for g in self.param_groups:
            given = g.get("param_names")
            count = len(g["params"])
            names += [pg.display_name(n) for n in given] if given else [f"param{i + j}" for j in range(count)]
            i += len(g["params"])
        return names

    def _check_bases(self) -> None:
        seen: dict[int, int] = {}
        for b in self.bases:
            for g in b.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("each base optimizer must hold its own parameters; one tensor is in two")
                    seen[id(p)] = 1
        if set(seen) != {id(p) for p in self._params()}:
            raise ValueError("base must be built on exactly the same parameters as NuP (with several bases: "
                             "together; build them on list(model.parameters()), not on a consumed generator)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (names included); in wrapper mode the new tensors join the base too.

        Tensors the base does not hold yet are added to it as one group (with this group's
        ``momentum``/``betas``); with several bases, add them to the right base first.
        """
        pg.check_group_values({**self.defaults, **param_group})
        param_group = dict(param_group)
        items = param_group["params"]
        param_group["params"] = [items] if torch.is_tensor(items) else list(items)
        param_group.setdefault("lr_ref", float(param_group.get("lr", self.defaults["lr"])))
        bases = getattr(self, "bases", None)  # None while torch's __init__ adds the first groups
        if bases:
            held = {id(p) for b in bases for g in b.param_groups for p in g["params"]}
            tensors = [item[1] if isinstance(item, tuple) else item for item in param_group["params"]]
            new = [p for p in tensors if id(p) not in held]
            if new and len(bases) > 1:
                raise ValueError("NuP has several bases: add the new tensors to the right one first "
                                 "(base.add_param_group), then to NuP")
            if new:
                bases[0].add_param_group({"params": new, **{k: param_group[k] for k in PASS_THROUGH
                                                            if k in param_group}})
        super().add_param_group(param_group)
        if bases:
            self._base_targets = None

    def scales(self) -> dict[str, float | None]:
        """``{name: s_P}`` as applied to each tensor; None for a tensor that is not normalized (see the module doc)."""
        scales, normalize = self._scales(torch.device("cpu"))
        return {n: float(s) if z else None for n, s, z in zip(self.param_names, scales.tolist(), normalize.tolist())}

    def _global(self, device: torch.device) -> dict[str, Any]:
        return core.global_state(self.state, len(self._params()), device)

    def _cumulative_buffer(self, p: torch.Tensor) -> torch.Tensor:
        return core.cumulative_buffer(self.state[p], p, self.cumulative == "init")

    def _scales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``s_P`` and a normalize mask, cached until the groups or their settings change."""
        signature = (tuple((id(g["params"]), len(g["params"]), g["scale"], g["normalize_vectors"])
                           for g in self.param_groups), device)
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[2] != signature:
            scales, normalize = [], []
            names = iter(self.param_names)
            for g in self.param_groups:
                for p in g["params"]:
                    name, meta = next(names), getattr(p, "_nup_meta", None)
                    s = g["scale"] if g["scale"] is not None else resolve_scale(name, p, self._scale_overrides)
                    scales.append(float(s))
                    forced = g["normalize_vectors"] or g["scale"] is not None
                    normalize.append(meta is not None or p.dim() >= 2 or forced)
            self._scale_cache = (
                (tuple(scales), tuple(normalize)),
                (torch.tensor(scales, dtype=torch.float32, device=device),
                 torch.tensor(normalize, dtype=torch.bool, device=device)),
                signature,
            )
        return self._scale_cache[1]

    def _group_lr(self, device: torch.device) -> torch.Tensor:
        """``group['lr']`` per tensor, fp32 ``[n]``."""
        return self._group_vector("lr", device)

    def _group_vector(self, key: str, device: torch.device) -> torch.Tensor:
        """``group[key]`` per tensor, fp32 ``[n]``; floats are cached until they change, tensors (a tensor
        lr) are read on device every time, without a sync."""
        values = [g[key] for g in self.param_groups]
        counts = [len(g["params"]) for g in self.param_groups]
        if any(torch.is_tensor(v) for v in values):
            return torch.cat([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1).expand(c)
                              for v, c in zip(values, counts)])
        cache = self.__dict__.setdefault("_vector_cache", {})
        signature = (tuple(map(float, values)), tuple(counts), device)
        if key not in cache or cache[key][0] != signature:
            parts = [torch.full((c,), float(v), device=device) for v, c in zip(values, counts)]
            cache[key] = (signature, torch.cat(parts))
        return cache[key][1]

    # ----------------------------------------------------------------------------------------
    # the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Apply one normalized step to every tensor that has a gradient; return the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        if not params:
            return loss
        device = params[0].device
        if self._is_checkpoint_init_step(params):
            self._materialize_state(params, device)
            return loss
        if self._fused is not None:
            self._fused.finish(device)
            return loss
        active = [i for i, p in enumerate(params) if p.grad is not None]
        if not active:
            return loss
        act_params = [params[i] for i in active]
        if not self.bases and any(p.grad.is_sparse for p in act_params):
            raise ValueError("NuP: a sparse gradient (an nn.Embedding(sparse=True)?) cannot be normalized in "
                             "νP-SGD mode: pass base=torch.optim.SparseAdam(...) over those tensors, or sparse=False")
        if self.base is not None:
            self._wrapper_step(params, active, act_params, device)
            return loss
        cumulatives = [self._cumulative_buffer(p) for p in act_params]
        directions = [p.grad for p in act_params]
        self._normalized_step(params, active, act_params, directions, cumulatives, device)
        return loss

    def _is_checkpoint_init_step(self, params: list[torch.Tensor]) -> bool:
        """The step ``torch.distributed.checkpoint`` takes to build a template of a fresh optimizer's state.

        Recognized as: no step taken yet, every group's lr 0, every parameter with an all-zero
        gradient. The lr test is on host floats; only then are the gradients read (one sync, and
        for DTensor shards one all-reduce, so that every rank decides alike).
        """
        if self.state.get(_GLOBAL, {}).get("step", 0) != 0:
            return False
        if any(float(g["lr"]) != 0.0 for g in self.param_groups) or any(p.grad is None for p in params):
            return False
        grads = [p.grad for p in params]
        local = _local(grads)
        nonzero = torch.stack([g.any() for g in local]).any().to(torch.int32)
        if any(a is not b for a, b in zip(grads, local)):
            torch.distributed.all_reduce(nonzero, op=torch.distributed.ReduceOp.MAX)
        return not bool(nonzero)

    def _materialize_state(self, params: list[torch.Tensor], device: torch.device) -> None:
        """Create every state tensor a checkpoint holds (statistics, buffers, λ, the base's state) without
        taking or counting a step; the base steps on the zero gradients and its move is undone."""
        self._global(device)
        for p in params:
            self._cumulative_buffer(p)
        self.schedule.materialize(len(params), device)
        if self.bases:
            old = [p.detach().clone() for p in params]
            for base in self.bases:
                base.step()
            for p, o in zip(params, old):
                p.copy_(o)

    def rates(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's effective lr ``η = group lr · λ``, scales ``s_P`` and normalize mask, each fp32/bool ``[n]``.

        In wrapper mode a tensor that is not normalized gets ``(group lr / lr_ref)·λ``: a multiplier
        on the base's own step (see the module docstring).
        """
        n = len(self._params())
        scales, normalize = self._scales(device)
        lam = self.schedule.multiplier(n, device)
        eta = self._group_lr(device) * lam
        if self.bases and not self._all_normalized():
            ref = self._group_vector("lr_ref", device)
            ratio = torch.where(ref > 0, self._group_lr(device) / torch.where(ref > 0, ref, 1.0), 0.0)
            eta = torch.where(normalize, eta, ratio * lam)
        return eta, scales, normalize

    def _all_normalized(self) -> bool:
        """Whether every tensor is normalized (from the host-side key of :meth:`_scales`' cache)."""
        return all(self._scale_cache[0][1])

    def _weight_decay(self, params: list[torch.Tensor], cumulatives: list[torch.Tensor], ok: torch.Tensor,
                      idx: torch.Tensor | None, device: torch.device) -> None:
        """Decoupled decay ``P ← P·(1 − η·wd)`` of the tensors whose step is not skipped (``[k]`` vectors).

        With ``cumulative="init"``, ``P_0`` moves by the same amount, so ``P − P_0`` stays the sum of
        the normalized updates as in ``"delta"`` mode.
        """
        shrink = self._decay(ok, idx, device)
        if shrink is None:
            return
        init_mode = self.cumulative == "init"
        for p, c, s in zip(params, cumulatives, shrink.unbind()):
            if init_mode:
                c.sub_(p * s.to(p.dtype))
            p.mul_((1.0 - s).to(p.dtype))

    def _decay(self, ok: torch.Tensor, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """``η·wd`` per active tensor (``[k]``; 0 where the step is skipped), with ``η = group lr·λ`` for
        every tensor, vectors included; None when no group decays."""
        if not any(g["weight_decay"] for g in self.param_groups):
            return None
        lam = self.schedule.multiplier(len(self._params()), device)
        rate = self._group_lr(device) * lam * self._group_vector("weight_decay", device)
        return torch.where(ok, core.pick(rate, idx), 0.0)

    def _normalized_step(
        self,
        params: list[torch.Tensor],
        active: list[int],
        act_params: list[torch.Tensor],
        directions: list[torch.Tensor],
        cumulatives: list[torch.Tensor],
        device: torch.device,
        bad: torch.Tensor | None = None,
    ) -> None:
        """One normalized step of ``act_params``; ``bad`` marks tensors to skip whatever their direction."""
        g = self._global(device)
        idx = core.active_index(active, len(params), device)
        init_mode = self.cumulative == "init"
        sharded = stat_reducer(act_params, init_mode)  # DTensor shards: local sums, one packed all-reduce
        reduce, apply = (
            (sharded.reduce, sharded.apply)
            if sharded is not None
            else (multi_tensor.multi_tensor_reduce, multi_tensor.multi_tensor_apply)
        )
        # the kernels keep C; P_0 and float64 run on foreach; sharded tensors take this path with exact ‖C‖
        wide = any(p.dtype == torch.float64 for p in act_params)
        packed = sharded is not None or (use_triton(act_params[0]) and not init_mode and not wide)
        host = host_readable(act_params[0]) and not torch.compiler.is_compiling()  # no host reads in a graph
        if packed:
            d_sq, dc, c_sq = reduce(directions, cumulatives)  # float64 sums: any finite non-zero D gets its step
            d_norm = d_sq.sqrt()  # float64, so coef (possibly beyond fp32's range) is too; the apply takes it
        else:
            d_norm = direction_norms(directions, host)  # float64: any finite non-zero D gets its step
        if bad is not None:  # a sanitized non-finite gradient: skip, even though the base still moved
            d_norm = torch.where(bad, float("nan"), d_norm)
        eta, scales, normalize = (core.pick(v, idx) for v in self.rates(device))
        ok, coef, u = core.coefficients(d_norm, eta, scales, normalize)
        self._weight_decay(act_params, cumulatives, ok, idx, device)
        if packed:
            apply(act_params, directions, cumulatives, coef)
            dc = torch.where(ok, dc, 0.0)  # a skipped tensor's ⟨D, C⟩ may be NaN
            c_norm_old, exact = c_sq.sqrt().float(), None
        else:
            directions = list(directions)
            ok, coef, u = representable(directions, ok, coef, u, host)
            c_norm_old = core.pick(g["c_norm"], idx)
            if host_readable(ok) and not torch.compiler.is_compiling():
                # eager CPU: coefficients are free to read; one loop per tensor updates P and C and
                # accumulates ⟨D, C⟩ (a skipped tensor, coef = 0, is not touched)
                dots = cpu.update_and_dot_many(act_params, cumulatives, directions, coef.tolist(), init_mode)
                dc = torch.tensor(dots, dtype=torch.float32)
            else:  # no data-dependent branch: CUDA foreach, torch.compile(fullgraph=True), graph capture
                safe = [torch.where(o, d, 0.0) for o, d in zip(ok.unbind(), directions)]
                dc = self._dots(safe, act_params, cumulatives, init_mode)
                coefs = coef.unbind()
                self._addcmul(act_params, safe, coefs)
                if not init_mode:
                    self._addcmul(cumulatives, safe, coefs)
            exact = None
            if core.recompute_due(g, self.recompute_every):
                exact = core.exact_c_norm(act_params, cumulatives, init_mode)
        core.finish_step(g, idx, eta, ok, u.float(), (coef * dc).float(), c_norm_old, exact, self.schedule)

    def _dots(self, safe, params, cumulatives, init_mode) -> torch.Tensor:
        """``⟨D, C_t⟩`` per tensor (fp32), with ``C_t = P − P_0`` in ``init`` mode."""

        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
                return torch.dot(a.reshape(-1), b.reshape(-1)).double()
            return (a.double() * b.double()).sum() if torch.float64 in (a.dtype, b.dtype) else (
                (a.float() * b.float()).sum().double())

        if init_mode:
            return torch.stack([dot(d, p) - dot(d, c) for d, p, c in zip(safe, params, cumulatives)])
        return torch.stack([dot(d, c) for d, c in zip(safe, cumulatives)])

    def _addcmul(self, targets, tensors, coefs) -> None:
        if self.foreach:
            torch._foreach_addcmul_(targets, tensors, list(coefs))
        else:
            for t, d, c in zip(targets, tensors, coefs):
                t.addcmul_(d, c)

    # ----------------------------------------------------------------------------------------
    # statistics and checkpoints
    def stat_vectors(self) -> dict[str, Any]:
        """This step's statistics as fp32 ``[n]`` device tensors, plus names, the multiplier and step.

        The vectors are the optimizer's own buffers, updated in place by the next step: clone to keep them.
        """
        params = self._params()
        device = params[0].device
        g = self._global(device)
        coherence = torch.where(g["path"] > 0, g["c_norm"] / g["path"].clamp_min(1e-30), 0.0)
        u = g["update_norm"]
        total = u.sum()
        cos_mean = torch.where(total > 0, (u * g["cos"]).sum() / total.clamp_min(1e-30), 0.0)
        return {
            "names": self.param_names,
            "update_norm": u,
            "cos": g["cos"],
            "c_norm": g["c_norm"],
            "coherence": coherence,
            "lr": g["lr"],
            "skipped": g["skipped"],
            "multiplier": self.schedule.multiplier(len(params), device),
            "cos_mean": cos_mean,
            "step": g["step"],
        }

    def stats(self) -> dict[str, Any]:
        """The same statistics keyed by parameter name: ``{"params": {name: {...}}, "global": {...}}``."""
        v = self.stat_vectors()
        per = {name: {k: v[k][i] for k in STAT_KEYS} for i, name in enumerate(v["names"])}
        return {"params": per, "global": {"multiplier": v["multiplier"], "cos_mean": v["cos_mean"], "step": v["step"]}}

    def log_dict(self, prefix: str = "nup") -> dict[str, float]:
        """The last step's statistics as one flat dict of floats, for loggers; the one method that syncs.

        Keys: ``{prefix}/{stat}/{name}`` for every tensor and stat in ``cos``, ``update_norm``,
        ``c_norm``, ``coherence``, ``lr`` (the effective rate ``group lr·λ``) and ``skipped``, plus
        ``{prefix}/multiplier`` (mean ``λ``), ``{prefix}/cos_mean`` and ``{prefix}/step``.
        """
        v = self.stat_vectors()
        flat = torch.cat([*(v[k].float() for k in STAT_KEYS), v["multiplier"].float().mean().reshape(1),
                          v["cos_mean"].float().reshape(1)]).tolist()
        n, out = len(v["names"]), {}
        for i, key in enumerate(STAT_KEYS):
            out.update({f"{prefix}/{key}/{name}": flat[i * n + j] for j, name in enumerate(v["names"])})
        out[f"{prefix}/multiplier"], out[f"{prefix}/cos_mean"] = flat[-2], flat[-1]
        out[f"{prefix}/step"] = float(v["step"])
        return out

    def state_dict(self) -> dict[str, Any]:
        g = self.state.setdefault(_GLOBAL, {"step": 0})
        g["schedule"] = self.schedule.state_dict()
        g["schedule_kind"], g["base_kind"] = pg.kind(self.schedule), pg.kind(self.bases or None)
        if self.bases:
            g["base"] = [b.state_dict() for b in self.bases] if len(self.bases) > 1 else self.bases[0].state_dict()
        sd = super().state_dict()
        # torch.distributed.checkpoint maps every key of "state" to a parameter name: carry the
        # optimizer-wide entry in the first param group, whose extra keys it keeps as they are.
        sd["param_groups"][0][_GLOBAL] = sd["state"].pop(_GLOBAL)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = [dict(group) for group in state_dict["param_groups"]]
        state = dict(state_dict["state"])
        g = groups[0].pop(_GLOBAL, None) or state.pop(_GLOBAL, {})
        self._check_checkpoint(groups, g)
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        for group in self.param_groups:  # a state dict from before a group setting existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("lr_ref", float(group["lr"]))
        g = copy.deepcopy(g)  # never share the step count or statistics with the source
        self.state[_GLOBAL] = g
        if "schedule" in g:
            self.schedule.load_state_dict(g["schedule"])
        if self.bases and "base" in g:
            saved = g["base"] if isinstance(g["base"], list) else [g["base"]]
            if len(saved) != len(self.bases):
                raise ValueError(f"the state dict holds {len(saved)} base optimizer(s); this NuP has {len(self.bases)}")
            for b, sd in zip(self.bases, saved):
                b.load_state_dict(sd)
        self._base_targets = None

    def __repr__(self) -> str:
        """torch's group listing, with the base optimizer(s) and the schedule."""
        lines = super().__repr__().splitlines()
        bases = ", ".join(f"{type(b).__name__}(lr={b.defaults.get('lr')})" for b in self.bases) or "None (νP-SGD)"
        extra = [f"base: {bases}", f"schedule: {pg.describe(self.schedule)}",
                 f"tensors: {len(self._params())}, cumulative: {self.cumulative}, fused: {self.fused}"]
        return "\n".join([lines[0], *extra, *lines[1:]])

    def _check_checkpoint(self, groups: list[dict[str, Any]], g: dict[str, Any]) -> None:
        """ValueError (before anything is loaded) for bad group values or a checkpoint of another kind of NuP."""
        for i, group in enumerate(groups):
            try:
                pg.check_group_values({**self.defaults, **group})
            except ValueError as err:
                raise ValueError(f"checkpoint: param group {i}: {err}") from None
        schedule = g.get("schedule_kind")
        if schedule is not None and schedule != pg.kind(self.schedule):
            raise ValueError(f"checkpoint: saved with schedule {schedule!r}, this NuP has {pg.kind(self.schedule)!r}; "
                             "build NuP with the schedule it was saved with")
        saved_base = g["base_kind"] if "base_kind" in g else "?" if "base" in g else ""  # "?": an older checkpoint
        mine = pg.kind(self.bases or None)
        if saved_base and not self.bases:
            raise ValueError(f"checkpoint: saved with base optimizer {saved_base}, this NuP has none; "
                             f"pass base=torch.optim.{saved_base}(...) over the same parameters")
        if not saved_base and self.bases:
            raise ValueError(f"checkpoint: saved without a base optimizer, this NuP wraps {mine}; "
                             "build NuP(..., base=None) to load it")
        if saved_base not in ("", "?", mine):
            raise ValueError(f"checkpoint: saved with base optimizer {saved_base}, this NuP wraps "
                             f"{mine}; build NuP with the base it was saved with")
