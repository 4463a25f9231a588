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

from nup.distributed import stat_reducer
from nup.schedule import ConstantSchedule, MultiplierSchedule
from nup_kernels import multi_tensor
from nup_kernels.backend import use_triton

CUMULATIVE_MODES = ("delta", "init")
STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "skipped")
_GLOBAL = "nup"  # key of the optimizer-wide entry in self.state


def _host_readable(t: torch.Tensor) -> bool:
    """True for CPU tensors: there is no device queue, so reading a value costs no sync."""
    return t.device.type == "cpu"


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
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if cumulative not in CUMULATIVE_MODES:
            raise ValueError(f"cumulative must be one of {CUMULATIVE_MODES}, got {cumulative!r}")
        if recompute_every < 1:
            raise ValueError(f"recompute_every must be >= 1, got {recompute_every}")
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
        if fused:
            from nup.fused import attach_fused  # local: the fused path is optional

            attach_fused(self)

    # ----------------------------------------------------------------------------------------
    # bookkeeping
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def param_names(self) -> list[str]:
        n = len(self._params())
        return self._names[:n] + [f"param{i}" for i in range(len(self._names), n)]

    def _global(self, device: torch.device) -> dict[str, Any]:
        """Optimizer-wide state: step count and fp32 ``[n]`` statistic vectors."""
        n = len(self._params())
        g = self.state.setdefault(_GLOBAL, {"step": 0})
        for key in ("update_norm", "cos", "c_norm", "path", "lr", "skipped"):
            v = g.get(key)
            if v is None or v.numel() != n or v.device != device:
                dtype = torch.int64 if key == "skipped" else torch.float32
                new = torch.zeros(n, dtype=dtype, device=device)
                if v is not None:
                    k = min(n, v.numel())
                    new[:k] = v[:k].to(device)
                g[key] = new
        return g

    def _cumulative_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "cumulative" not in state:
            init = self.cumulative == "init"
            state["cumulative"] = (
                p.detach().clone() if init else torch.zeros_like(p, memory_format=torch.preserve_format)
            )
        return state["cumulative"]

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
        if self.fused:
            from nup.fused import finish_fused_step

            finish_fused_step(self, device)
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

    def _sanitize_grads(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Zero non-finite gradients before the base step, so the base's state stays finite.

        Returns the bool ``[k]`` mask of tensors whose gradient was not finite (their update is
        then skipped), or None when every gradient is known to be finite.
        """
        finite = torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params], 2)))
        if _host_readable(finite) and bool(finite.all()):
            return None  # every gradient is finite: no pass to make
        for p, f in zip(params, finite.unbind()):
            p.grad.mul_(f).nan_to_num_(0.0, 0.0, 0.0)
        return ~finite

    def _index(self, active: list[int], n: int, device: torch.device) -> torch.Tensor | None:
        """Index of the tensors that take part in this step, or None when all do."""
        return None if len(active) == n else torch.tensor(active, device=device)

    def _rates(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's effective lr ``η = group lr · λ``, scales ``s_P`` and normalize mask, each ``[n]``."""
        n = len(self._params())
        scales, normalize = self._scales(device)
        return self._group_lr(device) * self.schedule.multiplier(n, device), scales, normalize

    def _coefficients(
        self,
        d_norm: torch.Tensor,
        idx: torch.Tensor | None,
        device: torch.device,
        rates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """From ``‖D‖`` (fp32 ``[k]``): effective lr ``η``, the ok mask, ``coef`` with ``ΔP = coef·D``, and ``u``.

        ``rates`` is :meth:`_rates`' result when the caller already has it. A tensor whose ``‖D‖``
        is 0 or not finite gets ``coef = −0.0`` (so ``P + coef·0`` keeps every bit of P) and ``u = 0``.
        """
        pick = (lambda v: v) if idx is None else (lambda v: v.index_select(0, idx))
        eta, scales, normalize = (pick(v) for v in (rates or self._rates(device)))
        ok = torch.isfinite(d_norm) & (d_norm > 0)
        step_size = torch.where(normalize, eta * scales, eta * d_norm)  # u when ok
        coef = torch.where(ok, -step_size / torch.where(ok, d_norm, 1.0), -0.0)
        return eta, ok, coef, torch.where(ok, step_size, 0.0)

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
        idx = self._index(active, len(params), device)
        init_mode = self.cumulative == "init"
        sharded = stat_reducer(act_params, init_mode)  # DTensor shards: local sums, one packed all-reduce
        reduce, apply = (
            (sharded.reduce, sharded.apply)
            if sharded is not None
            else (multi_tensor.multi_tensor_reduce, multi_tensor.multi_tensor_apply)
        )
        # the kernels keep C; P_0 runs on foreach; sharded tensors take this path with exact ‖C‖
        packed = sharded is not None or (use_triton(act_params[0]) and not init_mode)
        if packed:
            d_sq, dc, c_sq = reduce(directions, cumulatives)
            d_norm = d_sq.sqrt()
        else:
            d_norm = torch.stack(torch._foreach_norm(directions, 2, dtype=torch.float32))
        if bad is not None:  # a sanitized non-finite gradient: skip, even though the base still moved
            d_norm = torch.where(bad, float("nan"), d_norm)
        eta, ok, coef, u = self._coefficients(d_norm, idx, device)
        if packed:
            apply(act_params, directions, cumulatives, coef)
            dc = torch.where(ok, dc, 0.0)  # a skipped tensor's ⟨D, C⟩ may be NaN
            c_norm_old, exact = c_sq.sqrt(), None
        else:
            if _host_readable(ok) and bool(ok.all()):
                safe = directions  # every direction is finite: nothing to mask
            else:
                safe = [torch.where(o, d, 0.0) for o, d in zip(ok.unbind(), directions)]
            dc = self._dots(safe, act_params, cumulatives, init_mode)
            c_norm_old = g["c_norm"] if idx is None else g["c_norm"].index_select(0, idx)
            coefs = coef.unbind()
            self._addcmul(act_params, safe, coefs)
            if not init_mode:
                self._addcmul(cumulatives, safe, coefs)
            exact = None
            if (g["step"] + 1) % self.recompute_every == 0:
                cs = [p.float() - c.float() for c, p in zip(cumulatives, act_params)] if init_mode else cumulatives
                exact = torch.stack(torch._foreach_norm(cs, 2, dtype=torch.float32))
        self._finish_step(g, idx, eta, ok, u, coef * dc, c_norm_old, exact)

    def _finish_step(
        self,
        g: dict[str, Any],
        idx: torch.Tensor | None,
        eta: torch.Tensor,
        ok: torch.Tensor,
        u: torch.Tensor,
        dot: torch.Tensor,
        c_norm_old: torch.Tensor,
        c_norm_exact: torch.Tensor | None,
    ) -> None:
        """Cosines, ``‖C‖`` by the identity (or ``c_norm_exact``), the records and the schedule update.

        ``dot`` is ``⟨ΔP_t, C_t⟩`` and ``c_norm_old`` is ``‖C_t‖``, both fp32 ``[k]``.
        """
        denom = u * c_norm_old
        cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0).clamp(-1.0, 1.0)
        if c_norm_exact is None:
            c_norm_exact = (c_norm_old.square() + 2.0 * dot + u.square()).clamp_min(0.0).sqrt()
        self._record(g, idx, u, cos, c_norm_exact, eta, ok)
        g["step"] += 1
        moved = ok if idx is None else torch.zeros_like(g["update_norm"], dtype=torch.bool).index_copy(0, idx, ok)
        self.schedule.update(g["cos"], g["update_norm"], c_norm=g["c_norm"], ok=moved)

    def _dots(self, safe, params, cumulatives, init_mode) -> torch.Tensor:
        """``⟨D, C_t⟩`` per tensor (fp32), with ``C_t = P − P_0`` in ``init`` mode."""

        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if a.dtype == torch.float32 and b.dtype == torch.float32:
                return torch.dot(a.reshape(-1), b.reshape(-1))
            return (a.float() * b.float()).sum()

        if init_mode:
            return torch.stack([dot(d, p) - dot(d, c) for d, p, c in zip(safe, params, cumulatives)])
        return torch.stack([dot(d, c) for d, c in zip(safe, cumulatives)])

    def _addcmul(self, targets, tensors, coefs) -> None:
        if self.foreach:
            torch._foreach_addcmul_(targets, tensors, list(coefs))
        else:
            for t, d, c in zip(targets, tensors, coefs):
                t.addcmul_(d, c)

    def _record(self, g, idx, u, cos, c_norm, eta, ok) -> None:
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
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        g = copy.deepcopy(g)  # never share the step count or statistics with the source
        self.state[_GLOBAL] = g
        if "schedule" in g:
            self.schedule.load_state_dict(g["schedule"])
        if self.base is not None and "base" in g:
            self.base.load_state_dict(g["base"])
