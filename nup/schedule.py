"""Learning-rate multipliers ``λ_t`` that NuP applies on top of ``group['lr']`` (SPEC §4).

Every schedule keeps ``λ`` as a device tensor of shape ``[n]`` (one entry per parameter
tensor; global schedules hold the same value everywhere), reads the statistics of step ``t``
in :meth:`MultiplierSchedule.update` and so sets the rate of step ``t+1``. Nothing here syncs
with the host. A step in which no tensor moved advances no schedule's clock.

Controllers (SPEC §4), all ``λ_{t+1} = clip(λ_t·exp(clip(gain·s_t, −δ, δ)), λ_min, λ_max)`` for
a signal ``s_t`` read from scalars NuP already has (no extra pass over P):

- :class:`RandomWalkLR` (``geometry``, the default): ``s`` is the excess growth of ``‖C‖²`` over
  a random walk's, ``EMA(‖C_{t+1}‖² − ‖C_t‖² − u_t²) / EMA(u_t²)``. Pure noise gives 0 on
  average (``λ`` stays), drift gives ``s > 0``, a period-2 oscillation ``s ≈ −1``.
- :class:`GeometryAwareLR` (``geometry_cosine``, SPEC's original): ``s = EMA(cos) − c*``.
  Under noise ``cos → a`` (the drift fraction), so ``λ`` falls to ``λ_min`` whenever ``a < c*``.

:class:`SharpnessTargetLR` (``geometry_sharpness``) sets ``λ`` from a measured effective
sharpness instead (CDAT-like); it needs the caller to measure it (:meth:`SharpnessTargetLR.observe`).

On the Triton code path (CUDA) :meth:`MultiplierSchedule.update` is not called: the step-tail kernel
(:mod:`nup_kernels.step_tail`) runs the same formulas in the launch that records the statistics, on
the schedule's own tensors (in place), from the :class:`~nup_kernels.step_tail.Controller` that
:meth:`MultiplierSchedule.kernel_update` describes. A subclass that changes a formula gets None there
and its ``update()`` runs in torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nup_kernels.step_tail import Controller


def require_finite(**values: Any) -> None:
    """ValueError naming the first value that is not a finite number (bools are not numbers)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")


def require_count(**values: Any) -> None:
    """ValueError naming the first value that is not an integer >= 0 (None passes)."""
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")


class MultiplierSchedule:
    """Base class: a multiplier vector ``λ``, a device clock and a host count of :meth:`update` calls.

    ``clock`` (float64 scalar on the statistics' device) counts the steps in which at least one
    tensor moved; schedules that follow the step index read it, so a skipped step costs nothing.
    """

    name = "base"
    uses_clock = True  # whether :meth:`update` advances ``clock`` (schedules that follow the step index)

    def __init__(self) -> None:
        self.lam: torch.Tensor | None = None
        self.clock: torch.Tensor | None = None
        self.steps_done = 0

    def multiplier(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``λ_t``, fp32, shape ``[n]``, on ``device``."""
        if self.lam is None or self.lam.numel() != n or self.lam.device != torch.device(device):
            self.lam = self._resize(self.lam, n, device, self._initial())
        return self.lam

    def _initial(self) -> float:
        """λ of step 0."""
        return 1.0

    @staticmethod
    def _resize(old: torch.Tensor | None, n: int, device: torch.device | str, fill: float = 1.0) -> torch.Tensor:
        new = torch.full((n,), fill, dtype=torch.float32, device=device)
        if old is not None:
            k = min(n, old.numel())
            new[:k] = old[:k].to(device)
        return new

    def materialize(self, n: int, device: torch.device | str) -> None:
        """Create every state tensor for ``n`` tensors without advancing (a checkpoint template needs them)."""
        self.multiplier(n, device)
        if self.clock is None:
            self.clock = torch.zeros((), dtype=torch.float64, device=device)
        for name in self._state_names:
            if getattr(self, name) is None:
                setattr(self, name, self._resize(None, n, device, 0.0))

    _state_names: tuple[str, ...] = ()  # the controller's ``[n]`` state vectors (made by :meth:`_state`)

    def _state(self, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """The ``[n]`` fp32 state vector ``name``, created (or resized, or moved) like ``like``."""
        value = getattr(self, name)
        if value is None or value.shape != like.shape or value.device != like.device:
            value = self._resize(value, like.numel(), like.device, fill)
        return value

    def update(
        self,
        cos: torch.Tensor,
        update_norm: torch.Tensor,
        *,
        c_norm: torch.Tensor | None = None,
        ok: torch.Tensor | None = None,
    ) -> None:
        """Read step t's statistics and set ``λ_{t+1}``.

        ``cos``, ``update_norm``: fp32 ``[n]``; ``c_norm``: ``‖C_{t+1}‖`` fp32 ``[n]`` (optional);
        ``ok``: bool ``[n]``, the tensors that took their step (default ``update_norm > 0``).
        """
        self.steps_done += 1
        moved = update_norm > 0 if ok is None else ok.to(torch.bool)
        if self.lam is None:
            self.multiplier(cos.numel(), cos.device)
        if self.uses_clock:
            clock = torch.zeros((), dtype=torch.float64, device=cos.device) if self.clock is None else self.clock
            self.clock = clock.to(cos.device) + moved.any()
        self.lam = self._next(cos, update_norm, c_norm, moved)

    def _next(
        self, cos: torch.Tensor, update_norm: torch.Tensor, c_norm: torch.Tensor | None, moved: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def kernel_update(self, n: int, device: torch.device | str) -> Controller | None:
        """:meth:`update` for the step-tail kernel: count the call, make the state tensors (first step
        only) and return the :class:`~nup_kernels.step_tail.Controller` the kernel runs on them in
        place. None, with nothing done, where ``update()`` must run in torch instead (a schedule the
        kernel does not know, or a subclass that overrides one of the formulas)."""
        controller = self._controller(n, torch.device(device)) if self._inherits(MultiplierSchedule, "update") else None
        if controller is not None:
            self.steps_done += 1
        return controller

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        """The kernel form of this schedule (None: none)."""
        return None

    def _inherits(self, cls: type, *names: str) -> bool:
        """Whether this object's class takes the methods ``names`` from ``cls`` (no override below it)."""
        return all(getattr(type(self), name) is getattr(cls, name) for name in names)

    def _kernel_tensors(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``λ`` (fp32 ``[n]``) and the clock (float64 0-dim; None where unused) on ``device``, made once."""
        lam = self.multiplier(n, device)
        if lam.dtype != torch.float32 or not lam.is_contiguous():
            self.lam = lam = lam.float().contiguous()
        if not self.uses_clock:
            return lam, None
        clock = self.clock
        if clock is None:
            self.clock = torch.zeros((), dtype=torch.float64, device=device)
        elif clock.device != device or clock.dtype != torch.float64 or clock.dim() != 0:
            self.clock = clock.to(device, torch.float64).reshape(()).clone()
        return lam, self.clock

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if torch.is_tensor(v) else v)
        if "clock" not in state and "steps_done" in state:  # saved before the clock existed: every step counted
            self.clock = torch.tensor(float(state["steps_done"]), dtype=torch.float64)


class ConstantSchedule(MultiplierSchedule):
    """``λ = 1`` at every step: plain normalized updates at ``group['lr']``."""

    name = "constant"
    uses_clock = False  # λ never depends on the step: two launches a step saved

    def _next(self, cos, update_norm, c_norm, moved) -> torch.Tensor:
        return self.lam  # made as ones by multiplier(), never changed: no launch

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        if not self._inherits(ConstantSchedule, "_next"):
            return None
        return Controller("none", self._kernel_tensors(n, device)[0])


class WarmupCosineSchedule(MultiplierSchedule):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_mult`` at ``total_steps``.

    ``total_steps=None`` keeps λ at 1 after the warm-up (plain warm-up). ``peak`` scales the
    whole curve (λ of the plateau). Steps in which nothing moved do not count.
    """

    name = "warmup_cosine"

    def __init__(
        self, total_steps: int | None = None, warmup: int = 0, min_mult: float = 0.0, peak: float = 1.0
    ) -> None:
        super().__init__()
        require_count(total_steps=total_steps, warmup=warmup)
        require_finite(min_mult=min_mult)
        if not 0.0 <= min_mult <= 1.0:
            raise ValueError(f"min_mult must be in [0, 1], got {min_mult}")
        if warmup < 0 or (total_steps is not None and total_steps <= warmup):
            raise ValueError(f"need 0 <= warmup < total_steps, got warmup={warmup}, total_steps={total_steps}")
        if not (math.isfinite(peak) and peak > 0):
            raise ValueError(f"peak must be a positive finite number, got {peak}")
        self.total_steps, self.warmup, self.min_mult, self.peak = total_steps, warmup, float(min_mult), float(peak)

    def value_at(self, t: int | torch.Tensor) -> float | torch.Tensor:
        """λ for step ``t`` (0-based): a float for an int, a float64 tensor for a (device) tensor."""
        s = torch.as_tensor(t, dtype=torch.float64)
        if self.total_steps is None:
            frac = torch.zeros_like(s)
        else:
            frac = ((s - self.warmup) / (self.total_steps - self.warmup)).clamp(0.0, 1.0)
        decay = self.min_mult + (1.0 - self.min_mult) * 0.5 * (1.0 + torch.cos(math.pi * frac))
        value = self.peak * (torch.where(s < self.warmup, (s + 1) / max(self.warmup, 1), decay))
        return value if torch.is_tensor(t) else float(value)

    def _initial(self) -> float:
        return float(self.value_at(0))

    def _next(self, cos, update_norm, c_norm, moved) -> torch.Tensor:
        return self.value_at(self.clock).float().expand_as(cos).clone()

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        if not self._inherits(WarmupCosineSchedule, "_next", "value_at"):
            return None
        lam, clock = self._kernel_tensors(n, device)
        return Controller("warmup_cosine", lam, clock, warmup=self.warmup, total_steps=self.total_steps,
                          min_mult=self.min_mult, peak=self.peak)  # fmt: skip


class ReplaySchedule(MultiplierSchedule):
    """Open-loop ``λ_t = values[t]`` (the last value after the end), e.g. a recorded controller's λ_t."""

    name = "replay"

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        if len(values) == 0 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("replay needs a non-empty list of positive finite multipliers")
        self.values = torch.tensor(values, dtype=torch.float32)

    def _initial(self) -> float:
        return float(self.values[0])

    def _next(self, cos, update_norm, c_norm, moved) -> torch.Tensor:
        if self.values.device != cos.device:
            self.values = self.values.to(cos.device)  # once: no copy per step
        t = self.clock.clamp(max=self.values.numel() - 1).long().reshape(1)
        return self.values.index_select(0, t).expand_as(cos).clone()

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        if not self._inherits(ReplaySchedule, "_next"):
            return None
        lam, clock = self._kernel_tensors(n, device)
        if self.values.device != device or self.values.dtype != torch.float32:
            self.values = self.values.to(device, torch.float32).contiguous()  # once
        return Controller("replay", lam, clock, values=self.values)


class _LogController(MultiplierSchedule):
    """``λ_{t+1} = clip(λ_t·exp(clip(gain·s_t, −max_change, max_change)), min_mult, max_mult)``.

    Subclasses give the signal ``s_t`` (:meth:`_signal`). λ is held at 1 for the first ``warmup``
    (moved) steps; a tensor that did not move (global mode: a step where none moved) keeps its λ
    and its controller state. Global mode sums the statistics over tensors; ``per_layer=True``
    runs one controller per tensor.
    """

    def __init__(self, gain: float, max_change: float, min_mult: float, max_mult: float, warmup: int,
                 per_layer: bool) -> None:
        super().__init__()
        require_finite(gain=gain, max_change=max_change, min_mult=min_mult, max_mult=max_mult)
        require_count(warmup=warmup)
        if not 0.0 < min_mult <= 1.0 <= max_mult:
            raise ValueError(f"need 0 < min_mult <= 1 <= max_mult, got {min_mult}, {max_mult}")
        if max_change < 0 or warmup < 0:
            raise ValueError("max_change and warmup must be non-negative")
        self.gain, self.max_change = float(gain), float(max_change)
        self.min_mult, self.max_mult = float(min_mult), float(max_mult)
        self.warmup, self.per_layer = int(warmup), per_layer

    @staticmethod
    def _check_beta(beta: float) -> float:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        return float(beta)

    def _active(self, moved: torch.Tensor) -> torch.Tensor:
        return moved if self.per_layer else moved.any().expand_as(moved)

    def _pool(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layer: as is; global: the sum over tensors, broadcast to ``[n]``."""
        return values if self.per_layer else values.sum().expand_as(values)

    def _signal(self, cos, update_norm, c_norm, active) -> torch.Tensor:
        raise NotImplementedError

    def _next(self, cos, update_norm, c_norm, moved) -> torch.Tensor:
        assert self.lam is not None and self.clock is not None
        active = self._active(moved)
        signal = self._signal(cos, update_norm, c_norm, active)
        factor = torch.exp((self.gain * signal).clamp(-self.max_change, self.max_change))
        lam = torch.where(active, (self.lam * factor).clamp(self.min_mult, self.max_mult), self.lam)
        return torch.where(self.clock < self.warmup, torch.ones_like(lam), lam)

    def _log_controller(self, cls: type, kind: str, n: int, device: torch.device, **extra: Any) -> Controller | None:
        """The kernel form of controller ``cls`` (``kind``), with its state vectors made on ``device``."""
        if not self._inherits(cls, "_next", "_signal", "_active", "_pool"):
            return None
        lam, clock = self._kernel_tensors(n, device)
        for name in self._state_names:
            setattr(self, name, self._state(name, lam))
        return Controller(kind, lam, clock, per_layer=bool(self.per_layer),
                          state=tuple(getattr(self, name) for name in self._state_names), gain=self.gain,
                          max_change=self.max_change, min_mult=self.min_mult, max_mult=self.max_mult,
                          warmup=self.warmup, **extra)  # fmt: skip


class GeometryAwareLR(_LogController):
    """SPEC §4's original controller (``geometry_cosine``): ``s_t = c̃_t − target``.

    ``c̃_t = β·c̃_{t−1} + (1−β)·c̄_t``, with ``c̄_t`` the update-norm-weighted mean cosine (global
    mode) or each tensor's own cosine (``per_layer=True``); ``c̃`` starts at 0. Under minibatch
    noise ``cos → a`` (the drift fraction), so λ has no fixed point: it falls to ``min_mult``
    whenever ``a < target``.
    """

    def __init__(self, target: float = 0.1, gain: float = 0.5, beta: float = 0.9, max_change: float = 0.05,
                 min_mult: float = 1e-3, max_mult: float = 1e3, warmup: int = 0, per_layer: bool = False) -> None:
        super().__init__(gain, max_change, min_mult, max_mult, warmup, per_layer)
        require_finite(target=target, beta=beta)
        self.target, self.beta = float(target), self._check_beta(beta)
        self.ema: torch.Tensor | None = None

    _state_names = ("ema",)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "geometry_cosine_per_layer" if self.per_layer else "geometry_cosine"

    def _signal(self, cos, update_norm, c_norm, active) -> torch.Tensor:
        signal = cos
        if not self.per_layer:
            total = update_norm.sum()
            signal = torch.where(total > 0, (update_norm * cos).sum() / total.clamp_min(1e-30), 0.0).expand_as(cos)
        ema = self._state("ema", cos)
        self.ema = torch.where(active, self.beta * ema + (1.0 - self.beta) * signal, ema)
        return self.ema - self.target

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        return self._log_controller(GeometryAwareLR, "cosine_ema", n, device, beta=self.beta, target=self.target)


class RandomWalkLR(_LogController):
    """The random-walk test (``geometry``, the default): is ``C`` growing faster than a random walk's?

    Per tensor, ``‖C_{t+1}‖² − ‖C_t‖² = 2·u_t·‖C_t‖·cos_t + u_t²`` (SPEC §3); a random walk adds
    ``u_t²`` on average. The signal is the excess ratio
    ``s_t = EMA_β(2·u·‖C_t‖·cos) / EMA_β(u²)`` (global mode: both summed over tensors first):
    0 on average under pure noise (so λ has a fixed point there), ``> 0`` under drift, and
    ``≈ −1`` under a period-2 oscillation (the steps cancel and ``C`` stops growing). ``‖C_t‖``
    is kept from the previous ``c_norm`` (or by the identity when it is not given); everything
    is ``[n]``-sized: no pass over P.
    """

    def __init__(self, gain: float = 0.02, beta: float = 0.95, max_change: float = 0.02, min_mult: float = 1e-2,
                 max_mult: float = 1e2, warmup: int = 0, per_layer: bool = False) -> None:
        super().__init__(gain, max_change, min_mult, max_mult, warmup, per_layer)
        require_finite(beta=beta)
        self.beta = self._check_beta(beta)
        self.c_prev: torch.Tensor | None = None
        self.excess: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None

    _state_names = ("c_prev", "excess", "noise")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "geometry_per_layer" if self.per_layer else "geometry"

    def _signal(self, cos, update_norm, c_norm, active) -> torch.Tensor:
        c_prev = self._state("c_prev", cos)
        excess = 2.0 * update_norm * c_prev * cos
        if c_norm is None:
            c_norm = (c_prev.square() + excess + update_norm.square()).clamp_min(0.0).sqrt()
        self.c_prev = c_prev.copy_(c_norm)  # a copy: NuP updates its c_norm vector in place
        ema_x, ema_n = self._state("excess", cos), self._state("noise", cos)
        b = self.beta
        self.excess = torch.where(active, b * ema_x + (1 - b) * self._pool(excess), ema_x)
        self.noise = torch.where(active, b * ema_n + (1 - b) * self._pool(update_norm.square()), ema_n)
        return torch.where(self.noise > 0, self.excess / self.noise.clamp_min(1e-30), 0.0)

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        return self._log_controller(RandomWalkLR, "random_walk", n, device, beta=self.beta)


class SharpnessTargetLR(MultiplierSchedule):
    """CDAT-like (``geometry_sharpness``): drive the measured effective sharpness to ``target``.

    The caller measures ``S_eff`` (e.g. ``λ_max(D^½HD^½)`` of the NuP step, which scales like λ)
    every few steps and passes it to :meth:`observe`; λ is set to
    ``λ·(target/S_eff)^rate`` (each change clipped to ``[1/max_jump, max_jump]``, λ to
    ``[min_mult, max_mult]``). Its fixed point ``λ·S_eff/λ = target`` does not depend on the
    gradient noise; the cost is the measurement (Hessian-vector products), outside ``step()``.
    """

    name = "geometry_sharpness"

    def __init__(self, target: float = 2.0, rate: float = 0.5, max_jump: float = 2.0, min_mult: float = 1e-2,
                 max_mult: float = 1e2) -> None:
        super().__init__()
        if not (target > 0 and 0 < rate <= 1 and max_jump >= 1 and 0 < min_mult <= 1 <= max_mult):
            raise ValueError("need target > 0, 0 < rate <= 1, max_jump >= 1 and 0 < min_mult <= 1 <= max_mult")
        self.target, self.rate, self.max_jump = float(target), float(rate), float(max_jump)
        self.min_mult, self.max_mult = float(min_mult), float(max_mult)

    def observe(self, s_eff: torch.Tensor | float) -> None:
        """Take one measurement of the effective sharpness at the current λ (a scalar, any device)."""
        if self.lam is None:
            raise RuntimeError("observe() before the first multiplier(): build the optimizer first")
        s = torch.as_tensor(s_eff, dtype=torch.float32, device=self.lam.device)
        factor = (self.target / s.clamp_min(1e-30)).pow(self.rate).clamp(1.0 / self.max_jump, self.max_jump)
        factor = torch.where(torch.isfinite(s) & (s > 0), factor, 1.0)
        self.lam = (self.lam * factor).clamp(self.min_mult, self.max_mult)

    def _next(self, cos, update_norm, c_norm, moved) -> torch.Tensor:
        return self.lam

    def _controller(self, n: int, device: torch.device) -> Controller | None:
        if not self._inherits(SharpnessTargetLR, "_next"):
            return None
        return Controller("none", *self._kernel_tensors(n, device))


SCHEDULES = ("constant", "warmup", "warmup_cosine", "geometry", "geometry_per_layer", "geometry_cosine",
             "geometry_cosine_per_layer")
MEASURED_SCHEDULES = ("geometry_sharpness",)  # need a caller that measures (observe()): not for a plain loop


def make_schedule(name: str, total_steps: int | None = None, warmup: int = 0, **kwargs: Any) -> MultiplierSchedule:
    """Build a schedule by name: one of :data:`SCHEDULES` or :data:`MEASURED_SCHEDULES`; ``kwargs`` go to it."""
    if name == "constant":
        return ConstantSchedule()
    if name == "warmup":
        return WarmupCosineSchedule(None, warmup=warmup, **kwargs)
    if name == "warmup_cosine":
        if total_steps is None:
            raise ValueError("warmup_cosine needs total_steps")
        return WarmupCosineSchedule(total_steps, warmup=warmup, **kwargs)
    if name in ("geometry", "geometry_per_layer"):
        return RandomWalkLR(warmup=warmup, per_layer=name == "geometry_per_layer", **kwargs)
    if name in ("geometry_cosine", "geometry_cosine_per_layer"):
        return GeometryAwareLR(warmup=warmup, per_layer=name == "geometry_cosine_per_layer", **kwargs)
    if name == "geometry_sharpness":
        return SharpnessTargetLR(**kwargs)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES + MEASURED_SCHEDULES}")
