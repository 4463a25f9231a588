"""NuP: normalized updates with per-tensor update geometry (SPEC §2–4).

``ΔP_t = −η_t·s_P·D_t/‖D_t‖_F`` with ``η_t = group['lr']·λ_t``; ``D_t`` is the gradient
(νP-SGD, ``base=None``) or the step a base optimizer would have taken (wrapper mode). For
every tensor and step NuP keeps, on device and without host syncs: the update norm ``u_t``,
the cosine between ``ΔP_t`` and the cumulative update ``C_t = P_t − P_0``, ``‖C‖`` (through
``‖C_{t+1}‖² = ‖C_t‖² + 2⟨ΔP_t, C_t⟩ + u_t²``, recomputed every ``recompute_every`` steps),
the coherence ``‖C‖/Σu``, the effective lr and a count of skipped steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nup import step_core as core
from nup.distributed import _local as _local_shards  # each DTensor's local shard
from nup.distributed import stat_reducer
from nup.fused import attach_fused
from nup.norms import direction_norms, unit_direction
from nup.schedule import ConstantSchedule, MultiplierSchedule
from nup.step_core import GLOBAL_KEY as _GLOBAL
from nup_kernels import multi_tensor
from nup_kernels.backend import use_triton

CUMULATIVE_MODES = ("delta", "init")
STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "skipped")


def _host_readable(t: torch.Tensor) -> bool:
    """True for CPU tensors: there is no device queue, so reading a value costs no sync."""
    return t.device.type == "cpu"


def _check_group_values(values: dict[str, Any]) -> None:
    """ValueError for a group's lr, scale or normalize_vectors that no step can use."""
    lr, scale, normalize = values.get("lr"), values.get("scale"), values.get("normalize_vectors", False)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not (math.isfinite(scale) and scale > 0)):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize_vectors must be True or False, got {normalize!r}")


def _kind(obj: Any) -> str:
    """A schedule's name or a base optimizer's class name, as stored in checkpoints ("" for none)."""
    if obj is None:
        return ""
    return type(obj).__name__ if isinstance(obj, torch.optim.Optimizer) else str(obj.name)


def default_scale(p: torch.Tensor) -> float:
    """``s_P`` for a tensor without NuMLP metadata: ``√(fan_out/fan_in)`` for matrices, 1 for vectors."""
    if p.dim() >= 2:
        return math.sqrt(p.shape[0] / (p.numel() // p.shape[0]))
    return 1.0


def _split_names(params: Any) -> tuple[list[Any], list[str | None]]:
    """Accept tensors, ``(name, tensor)`` pairs or group dicts; return torch-style groups and names."""
    params = list(params)
    if not params:
        raise ValueError("NuP got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    names: list[str | None] = []
    out = []
    for group in groups:
        group = dict(group)
        plist = list(group["params"]) if not torch.is_tensor(group["params"]) else [group["params"]]
        tensors = []
        for item in plist:
            if isinstance(item, tuple):
                names.append(item[0])
                tensors.append(item[1])
            else:
                names.append(None)
                tensors.append(item)
        group["params"] = tensors
        out.append(group)
    return out, names


class NuP(torch.optim.Optimizer):
    """Normalized-update optimizer with update geometry. A real ``torch.optim.Optimizer``.

    Args:
        params: tensors, ``model.named_parameters()`` (names key :meth:`stats`), or groups.
        lr: base rate ``η``; ``group['lr']`` stays the user's (torch LR schedulers compose).
        base: None (direction = gradient), or a torch optimizer over the same parameters whose
            step gives the direction; its state is never written by NuP.
        schedule: a :class:`nup.schedule.MultiplierSchedule` (default constant ``λ = 1``).
        cumulative: ``"delta"`` stores ``C`` per tensor; ``"init"`` stores ``P_0`` (fp32 only).
        foreach: use foreach kernels on the reference path (default: yes).
        fused: NuMLP only, νP-SGD mode: apply each layer's update inside the backward pass.
        recompute_every: recompute ``‖C‖`` exactly every this many steps.
        scale: per-group override of ``s_P`` for every tensor in the group.
        normalize_vectors: normalize 1-D tensors without metadata too (default: plain
            ``−η·D`` steps for them).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        base: torch.optim.Optimizer | None = None,
        schedule: MultiplierSchedule | None = None,
        cumulative: str = "delta",
        foreach: bool | None = None,
        fused: bool = False,
        recompute_every: int = 100,
        scale: float | None = None,
        normalize_vectors: bool = False,
    ) -> None:
        _check_group_values(dict(lr=lr, scale=scale, normalize_vectors=normalize_vectors))
        if cumulative not in CUMULATIVE_MODES:
            raise ValueError(f"cumulative must be one of {CUMULATIVE_MODES}, got {cumulative!r}")
        if isinstance(recompute_every, bool) or not isinstance(recompute_every, int) or recompute_every < 1:
            raise ValueError(f"recompute_every must be an integer >= 1, got {recompute_every!r}")
        groups, names = _split_names(params)
        defaults = dict(lr=float(lr), scale=scale, normalize_vectors=normalize_vectors)
        super().__init__(groups, defaults)
        self._names = [n if n is not None else f"param{i}" for i, n in enumerate(names)]
        self.base = base
        self.schedule = schedule if schedule is not None else ConstantSchedule()
        self.cumulative = cumulative
        self.foreach = True if foreach is None else foreach
        self.recompute_every = recompute_every
        self.fused = fused
        if base is not None:
            base_ids = {id(p) for g in base.param_groups for p in g["params"]}
            if base_ids != {id(p) for p in self._params()}:
                raise ValueError("base must be built on exactly the same parameters as NuP")
        for p in self._params():
            if cumulative == "init" and p.dtype != torch.float32:
                raise ValueError("cumulative='init' stores P_0 and needs fp32 parameters (W − P_0 cancels in 16-bit)")
        self._fused = attach_fused(self) if fused else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after checking the group's lr, scale and normalize_vectors."""
        _check_group_values({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------
    # bookkeeping
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def param_names(self) -> list[str]:
        n = len(self._params())
        return self._names[:n] + [f"param{i}" for i in range(len(self._names), n)]

    def _global(self, device: torch.device) -> dict[str, Any]:
        return core.global_state(self.state, len(self._params()), device)

    def _cumulative_buffer(self, p: torch.Tensor) -> torch.Tensor:
        return core.cumulative_buffer(self.state[p], p, self.cumulative == "init")

    def _scales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``s_P`` and a normalize mask, cached until the groups' settings change."""
        key, scales, normalize = [], [], []
        for g in self.param_groups:
            for p in g["params"]:
                meta = getattr(p, "_nup_meta", None)
                s = g["scale"] if g["scale"] is not None else meta.scale if meta is not None else default_scale(p)
                norm = meta is not None or p.dim() >= 2 or g["normalize_vectors"] or g["scale"] is not None
                scales.append(float(s))
                normalize.append(norm)
        key = (tuple(scales), tuple(normalize), device)
        cached = getattr(self, "_scale_cache", None)
        if cached is None or cached[0] != key:
            self._scale_cache = (
                key,
                torch.tensor(scales, dtype=torch.float32, device=device),
                torch.tensor(normalize, dtype=torch.bool, device=device),
            )
        return self._scale_cache[1], self._scale_cache[2]

    def _group_lr(self, device: torch.device) -> torch.Tensor:
        """``group['lr']`` per tensor, fp32 ``[n]``; rebuilt only when a group's lr changes."""
        key = (tuple((float(g["lr"]), len(g["params"])) for g in self.param_groups), device)
        cached = getattr(self, "_lr_cache", None)
        if cached is None or cached[0] != key:
            parts = [torch.full((count,), lr, device=device) for lr, count in key[0]]
            self._lr_cache = (key, torch.cat(parts))
        return self._lr_cache[1]

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
        old = [p.detach().clone() for p in act_params] if self.base is not None else None
        bad = None
        if self.base is not None:
            bad = self._sanitize_grads(act_params)
            self.base.step()
            directions = torch._foreach_sub(old, act_params)  # what base moved, as a descent direction
            for p, o in zip(act_params, old):  # per tensor: DTensor has no foreach_copy_ rule
                p.copy_(o)
        else:
            directions = [p.grad for p in act_params]
        cumulatives = [self._cumulative_buffer(p) for p in act_params]
        self._normalized_step(params, active, act_params, directions, cumulatives, device, bad)
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
        local = _local_shards(grads)
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
        if self.base is not None:
            old = [p.detach().clone() for p in params]
            self.base.step()
            for p, o in zip(params, old):
                p.copy_(o)

    def _sanitize_grads(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Zero non-finite gradients before the base step, so the base's state stays finite.

        Returns the bool ``[k]`` mask of tensors whose gradient was not finite (their update is
        then skipped), or None when every gradient is known to be finite.
        """
        finite = torch.isfinite(direction_norms([p.grad for p in params], _host_readable(params[0])))
        if _host_readable(finite) and bool(finite.all()):
            return None  # every gradient is finite: no pass to make
        for p, f in zip(params, finite.unbind()):
            p.grad.mul_(f).nan_to_num_(0.0, 0.0, 0.0)
        return ~finite

    def rates(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's effective lr ``η = group lr · λ``, scales ``s_P`` and normalize mask, each fp32/bool ``[n]``."""
        n = len(self._params())
        scales, normalize = self._scales(device)
        return self._group_lr(device) * self.schedule.multiplier(n, device), scales, normalize

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
        host = _host_readable(act_params[0])
        if packed:
            d_sq, dc, c_sq = reduce(directions, cumulatives)
            d_norm = d_sq.sqrt()
        else:
            d_norm = direction_norms(directions, host)  # float64: any finite non-zero D gets its step
        if bad is not None:  # a sanitized non-finite gradient: skip, even though the base still moved
            d_norm = torch.where(bad, float("nan"), d_norm)
        eta, scales, normalize = (core.pick(v, idx) for v in self.rates(device))
        ok, coef, u = core.coefficients(d_norm, eta, scales, normalize)
        if packed:
            apply(act_params, directions, cumulatives, coef)
            dc = torch.where(ok, dc, 0.0)  # a skipped tensor's ⟨D, C⟩ may be NaN
            c_norm_old, exact = c_sq.sqrt(), None
        else:
            directions = list(directions)
            ok, coef, u = _representable(directions, ok, coef, u, host)
            if host and bool(ok.all()):
                safe = directions  # every direction is finite: nothing to mask
            else:
                safe = [torch.where(o, d, 0.0) for o, d in zip(ok.unbind(), directions)]
            dc = self._dots(safe, act_params, cumulatives, init_mode)
            c_norm_old = core.pick(g["c_norm"], idx)
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
        """This step's statistics as fp32 ``[n]`` device tensors, plus names, the multiplier and step."""
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

    def state_dict(self) -> dict[str, Any]:
        g = self.state.setdefault(_GLOBAL, {"step": 0})
        g["schedule"] = self.schedule.state_dict()
        g["schedule_kind"], g["base_kind"] = _kind(self.schedule), _kind(self.base)
        if self.base is not None:
            g["base"] = self.base.state_dict()
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
        g = copy.deepcopy(g)  # never share the step count or statistics with the source
        self.state[_GLOBAL] = g
        if "schedule" in g:
            self.schedule.load_state_dict(g["schedule"])
        if self.base is not None and "base" in g:
            self.base.load_state_dict(g["base"])

    def _check_checkpoint(self, groups: list[dict[str, Any]], g: dict[str, Any]) -> None:
        """ValueError (before anything is loaded) for bad group values or a checkpoint of another kind of NuP."""
        for i, group in enumerate(groups):
            try:
                _check_group_values({**self.defaults, **group})
            except ValueError as err:
                raise ValueError(f"checkpoint: param group {i}: {err}") from None
        schedule = g.get("schedule_kind")
        if schedule is not None and schedule != _kind(self.schedule):
            raise ValueError(f"checkpoint: saved with schedule {schedule!r}, this NuP has {_kind(self.schedule)!r}; "
                             "build NuP with the schedule it was saved with")
        saved_base = g["base_kind"] if "base_kind" in g else "?" if "base" in g else ""  # "?": an older checkpoint
        if saved_base and self.base is None:
            raise ValueError(f"checkpoint: saved with base optimizer {saved_base}, this NuP has none; "
                             f"pass base=torch.optim.{saved_base}(...) over the same parameters")
        if not saved_base and self.base is not None:
            raise ValueError(f"checkpoint: saved without a base optimizer, this NuP wraps {_kind(self.base)}; "
                             "build NuP(..., base=None) to load it")
        if saved_base not in ("", "?", _kind(self.base)):
            raise ValueError(f"checkpoint: saved with base optimizer {saved_base}, this NuP wraps "
                             f"{_kind(self.base)}; build NuP with the base it was saved with")


def _representable(
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
