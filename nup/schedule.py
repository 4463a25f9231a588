"""Learning-rate multipliers ``λ_t`` that NuP applies on top of ``group['lr']`` (SPEC §4).

Every schedule keeps ``λ`` as a device tensor of shape ``[n]`` (one entry per parameter
tensor; global schedules hold the same value everywhere), reads the statistics of step ``t``
in :meth:`update` and so sets the rate of step ``t+1``. Nothing here syncs with the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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
    """Base class: a multiplier vector ``λ`` and a host-side step count."""

    name = "base"

    def __init__(self) -> None:
        self.lam: torch.Tensor | None = None
        self.steps_done = 0

    def multiplier(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``λ_t``, fp32, shape ``[n]``, on ``device``."""
        if self.lam is None or self.lam.numel() != n or self.lam.device != torch.device(device):
            self.lam = self._resize(self.lam, n, device)
        return self.lam

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

    def update(self, cos: torch.Tensor, update_norm: torch.Tensor) -> None:
        """Read step t's per-tensor cosines and update norms (fp32 ``[n]``); set ``λ_{t+1}``."""
        self.steps_done += 1
        self.lam = self._next(cos, update_norm)

    def _next(self, cos: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if torch.is_tensor(v) else v)


class ConstantSchedule(MultiplierSchedule):
    """``λ = 1`` at every step: plain normalized updates at ``group['lr']``."""

    name = "constant"

    def _next(self, cos: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(cos)


class WarmupCosineSchedule(MultiplierSchedule):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_mult`` at ``total_steps``.

    ``total_steps=None`` keeps λ at 1 after the warm-up (plain warm-up).
    """

    name = "warmup_cosine"

    def __init__(self, total_steps: int | None = None, warmup: int = 0, min_mult: float = 0.0) -> None:
        super().__init__()
        require_count(total_steps=total_steps, warmup=warmup)
        require_finite(min_mult=min_mult)
        if not 0.0 <= min_mult <= 1.0:
            raise ValueError(f"min_mult must be in [0, 1], got {min_mult}")
        if warmup < 0 or (total_steps is not None and total_steps <= warmup):
            raise ValueError(f"need 0 <= warmup < total_steps, got warmup={warmup}, total_steps={total_steps}")
        self.total_steps, self.warmup, self.min_mult = total_steps, warmup, float(min_mult)

    def value_at(self, t: int) -> float:
        """λ for step ``t`` (0-based)."""
        if t < self.warmup:
            return (t + 1) / self.warmup
        if self.total_steps is None:
            return 1.0
        frac = min(1.0, (t - self.warmup) / (self.total_steps - self.warmup))
        return self.min_mult + (1.0 - self.min_mult) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def multiplier(self, n: int, device: torch.device | str) -> torch.Tensor:
        lam = super().multiplier(n, device)
        if self.steps_done == 0:
            lam.fill_(self.value_at(0))
        return lam

    def _next(self, cos: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cos, self.value_at(self.steps_done))


class GeometryAwareLR(MultiplierSchedule):
    """The geometry-aware controller of SPEC §4.

    ``c̃_t = β·c̃_{t−1} + (1−β)·c̄_t`` and
    ``λ_{t+1} = clip(λ_t·exp(clip(gain·(c̃_t − target), −max_change, max_change)), min_mult, max_mult)``.
    ``c̄_t`` is the update-norm-weighted mean cosine (global mode) or each tensor's own
    cosine (``per_layer=True``). λ is held at 1 for the first ``warmup`` steps. A step whose
    updates were all skipped (update norm 0) leaves the controller unchanged. ``c̃`` starts at 0.
    """

    def __init__(
        self,
        target: float = 0.1,
        gain: float = 0.5,
        beta: float = 0.9,
        max_change: float = 0.05,
        min_mult: float = 1e-3,
        max_mult: float = 1e3,
        warmup: int = 0,
        per_layer: bool = False,
    ) -> None:
        super().__init__()
        require_finite(target=target, gain=gain, beta=beta, max_change=max_change, min_mult=min_mult,
                       max_mult=max_mult)
        require_count(warmup=warmup)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not 0.0 < min_mult <= 1.0 <= max_mult:
            raise ValueError(f"need 0 < min_mult <= 1 <= max_mult, got {min_mult}, {max_mult}")
        if max_change < 0 or warmup < 0:
            raise ValueError("max_change and warmup must be non-negative")
        self.target, self.gain, self.beta, self.max_change = float(target), float(gain), float(beta), float(max_change)
        self.min_mult, self.max_mult, self.warmup, self.per_layer = (
            float(min_mult),
            float(max_mult),
            int(warmup),
            per_layer,
        )
        self.ema: torch.Tensor | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return "geometry_per_layer" if self.per_layer else "geometry"

    def materialize(self, n: int, device: torch.device | str) -> None:
        super().materialize(n, device)
        if self.ema is None or self.ema.numel() != n:
            self.ema = self._resize(self.ema, n, device, fill=0.0)

    def _next(self, cos: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
        assert self.lam is not None
        moved = update_norm > 0
        if self.per_layer:
            signal, active = cos, moved
        else:
            total = update_norm.sum()
            signal = torch.where(total > 0, (update_norm * cos).sum() / total.clamp_min(1e-30), 0.0).expand_as(cos)
            active = moved.any().expand_as(cos)
        if self.ema is None or self.ema.shape != cos.shape:
            self.ema = self._resize(self.ema, cos.numel(), cos.device, fill=0.0)
        ema = torch.where(active, self.beta * self.ema + (1.0 - self.beta) * signal, self.ema)
        self.ema = ema
        if self.steps_done < self.warmup:
            return torch.ones_like(cos)
        factor = torch.exp((self.gain * (ema - self.target)).clamp(-self.max_change, self.max_change))
        lam = torch.where(active, (self.lam * factor).clamp(self.min_mult, self.max_mult), self.lam)
        return lam


SCHEDULES = ("constant", "warmup", "warmup_cosine", "geometry", "geometry_per_layer")


def make_schedule(name: str, total_steps: int | None = None, warmup: int = 0, **kwargs: Any) -> MultiplierSchedule:
    """Build a schedule by name: one of :data:`SCHEDULES`. ``kwargs`` go to its constructor."""
    if name == "constant":
        return ConstantSchedule()
    if name == "warmup":
        return WarmupCosineSchedule(None, warmup=warmup, **kwargs)
    if name == "warmup_cosine":
        if total_steps is None:
            raise ValueError("warmup_cosine needs total_steps")
        return WarmupCosineSchedule(total_steps, warmup=warmup, **kwargs)
    if name in ("geometry", "geometry_per_layer"):
        return GeometryAwareLR(warmup=warmup, per_layer=name == "geometry_per_layer", **kwargs)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
