"""The Edge of Chaos (SPEC §1): the point ``(σ_w², σ_b²)`` where ``χ₁ = 1``, and the correlation map there.

With ``z ~ N(0, 1)``, ``q*`` is the fixed point of ``q = σ_w²·E[φ(√q z)²] + σ_b²`` and
``χ₁ = σ_w²·E[φ'(√q* z)²]``. For ``φ(s) = a·s + b·|s|`` both are closed forms; for any other φ
they are solved numerically with an adaptive, composite Gauss–Legendre quadrature in float64
(fixed-order Gauss–Hermite is not accurate enough once ``φ'²`` is a narrow peak at large ``q*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nup_kernels.activations import Activation, get_activation

_GL_X, _GL_W = np.polynomial.legendre.leggauss(20)
_Z_MAX = 12.0  # |z| range of the Gaussian integrals: the tail beyond is below 1e-30
_RTOL = 1e-13  # per-integral tolerance of the adaptive quadrature
_EPS = float(np.finfo(np.float64).eps)
_T_MIN, _T_MAX = 2.0**-50, 2.0**40  # bracket search range of q* − σ_b²


@dataclass(frozen=True)
class EOCPoint:
    """A point on φ's EOC: weight and bias variances, the variance fixed point ``q*`` and ``χ₁``."""

    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float

    @property
    def sigma_w(self) -> float:
        return math.sqrt(self.sigma_w2)

    @property
    def sigma_b(self) -> float:
        return math.sqrt(self.sigma_b2)


def _values(act: Activation, u: np.ndarray, derivative: bool = False) -> np.ndarray:
    """φ(u) or φ'(u), elementwise, in float64 (torch on CPU, so autograd serves callables)."""
    t = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))
    try:
        with torch.no_grad():
            y = act.derivative(t) if derivative else act(t)
    except RuntimeError as err:
        raise ValueError(
            f"cannot evaluate φ' of {act} by autograd ({err}); pass a function built from torch ops"
        ) from None
    return y.detach().to(torch.float64).numpy().reshape(u.shape)


def _panels(f: Callable[[np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """20-point Gauss–Legendre integrals of ``f`` over each ``[a_i, b_i]``: shape (k, len(a))."""
    mid, half = (a + b) / 2, (b - a) / 2
    vals = f((mid[:, None] + half[:, None] * _GL_X).ravel())
    return vals.reshape(vals.shape[0], a.size, _GL_X.size) @ _GL_W * half


def _integrate(f: Callable[[np.ndarray], np.ndarray], breaks: np.ndarray) -> np.ndarray:
    """Adaptive integral of a vector integrand over ``[breaks[0], breaks[-1]]``.

    ``f`` maps nodes of shape (n,) to values of shape (k, n). Every panel is compared with the
    sum of its two halves; it is accepted (as the halves) once all k differences are within
    ``_RTOL`` of the integral's scale pro rata of its length, or within rounding of the panel's
    own value, and split otherwise. Kinks of the integrand should sit on ``breaks``.
    """
    a, b = breaks[:-1], breaks[1:]
    whole = _panels(f, a, b)
    scale = np.abs(whole).sum(axis=1, keepdims=True)
    total = breaks[-1] - breaks[0]
    result = np.zeros(whole.shape[0])
    for _ in range(60):
        mid = (a + b) / 2
        halves = _panels(f, np.concatenate([a, mid]), np.concatenate([mid, b]))
        left, right = halves[:, : a.size], halves[:, a.size :]
        tol = np.maximum(_RTOL * scale * (b - a) / total, 64 * _EPS * (np.abs(left) + np.abs(right))) + 1e-300
        ok = np.all(np.abs(whole - left - right) <= tol, axis=0)
        result += (left[:, ok] + right[:, ok]).sum(axis=1)
        if ok.all():
            return result
        a, b = np.concatenate([a[~ok], mid[~ok]]), np.concatenate([mid[~ok], b[~ok]])
        whole = np.concatenate([left[:, ~ok], right[:, ~ok]], axis=1)
        if a.size > 20_000:  # a non-integrable singularity: keep the estimate so far
            break
    return result + whole.sum(axis=1)


def _z_breaks(q: float) -> np.ndarray:
    """Panel edges in z for ``E[g(√q z)]``: 0 (kinks of φ), the scale ``1/√q`` of φ in z, and the Gaussian."""
    pts = [2.0**j / math.sqrt(q) for j in range(-4, 8)] + [1.0, 2.0, 4.0, 8.0, _Z_MAX]
    pos = np.unique([p for p in pts if p <= _Z_MAX])
    return np.concatenate([-pos[::-1], [0.0], pos])


def gaussian_moments(activation: str | Activation | Callable, q: float) -> tuple[float, float]:
    """``(E[φ(√q z)²], E[φ'(√q z)²])`` for ``z ~ N(0, 1)``, ``q > 0``, accurate to ~1e-13 relative."""
    act, root = get_activation(activation), math.sqrt(q)

    def f(z: np.ndarray) -> np.ndarray:
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return np.stack([_values(act, root * z) ** 2 * pdf, _values(act, root * z, True) ** 2 * pdf])

    e_phi2, e_dphi2 = _integrate(f, _z_breaks(q))
    return float(e_phi2), float(e_dphi2)


def _chi1_along_fixed_points(act: Activation, sigma_b2: float, t: float) -> tuple[float, float]:
    """For ``q = σ_b² + t``: the σ_w² making q a fixed point, and χ₁ there."""
    e_phi2, e_dphi2 = gaussian_moments(act, sigma_b2 + t)
    if e_dphi2 == 0.0:
        raise ValueError(f"φ' of {act} vanishes, so χ₁ = 0 for every σ_w: a constant φ has no EOC")
    sigma_w2 = t / e_phi2
    return sigma_w2, sigma_w2 * e_dphi2


def _origin_slopes(act: Activation) -> tuple[float, float]:
    """``(a, b)`` such that ``φ(s) ≈ a·s + b·|s|`` near 0, from the one-sided slopes φ'(0±)."""
    up, down = (float(v) for v in _values(act, np.array([1e-150, -1e-150]), derivative=True))
    return (up + down) / 2, (up - down) / 2


def _linear_abs_point(a: float, b: float, act: Activation, q_star: float) -> EOCPoint:
    if a * a + b * b == 0.0:
        raise ValueError(f"φ' of {act} vanishes at 0, so this φ has no EOC at σ_b = 0")
    sigma_w2 = 1.0 / (a * a + b * b)
    return EOCPoint(sigma_w2, 0.0, q_star, sigma_w2 * (a * a + b * b))


def edge_of_chaos(activation: str | Activation | Callable, sigma_b2: float = 0.0) -> EOCPoint:
    """The EOC point of φ at bias variance ``sigma_b2``: σ_w² with ``χ₁ = 1``, to ~1e-12 relative.

    - ``a·s + b·|s|`` (relu, abs, leaky_relu, identity, linear_abs): ``σ_w² = 1/(a² + b²)`` at
      ``σ_b = 0`` only. φ is homogeneous, so every q is then a fixed point; ``q_star = 1.0`` by
      convention (nothing in the network depends on it).
    - ``σ_b² = 0`` and ``φ(0) = 0`` (tanh, gelu, silu, ...): the EOC is the limit ``q* → 0``,
      where φ acts as its linearisation ``a·s + b·|s|`` from the one-sided slopes φ'(0±):
      ``σ_w² = 1/(a² + b²)`` (tanh: 1; gelu, silu: 4) and ``q_star = 0.0``.
    - Otherwise, along the fixed points ``q = σ_b² + t`` (``σ_w² = t/E[φ(√q z)²]``), χ₁(t) is
      bracketed by doubling/halving from ``t = 1`` and its crossing of 1 bisected in ``log t``.
    """
    act = get_activation(activation)
    sigma_b2 = float(sigma_b2)
    if not 0.0 <= sigma_b2 < math.inf:
        raise ValueError(f"sigma_b2 must be a finite variance >= 0, got {sigma_b2}")
    if act.is_linear_abs:
        if sigma_b2 > 0.0:
            raise ValueError(
                f"{act} (a·s + b·|s|) has an EOC only at σ_b = 0 (χ₁ < 1 at every σ_b > 0); "
                "use sigma_b2=0 or a smooth activation such as tanh"
            )
        return _linear_abs_point(act.a, act.b, act, q_star=1.0)
    if sigma_b2 == 0.0 and _values(act, np.zeros(1))[0] == 0.0:
        return _linear_abs_point(*_origin_slopes(act), act, q_star=0.0)

    def log_chi1(log_t: float) -> float:
        return math.log(_chi1_along_fixed_points(act, sigma_b2, math.exp(log_t))[1])

    hi = 0.0
    f0 = log_chi1(0.0)
    step = math.log(2.0) if f0 < 0 else -math.log(2.0)
    while (log_chi1(hi + step) < 0) == (f0 < 0):
        hi += step
        if not math.log(_T_MIN) <= hi <= math.log(_T_MAX):
            side, end = ("below", f"up to {_T_MAX:.1e}") if f0 < 0 else ("above", f"down to {_T_MIN:.1e}")
            raise ValueError(
                f"no EOC for {act} at sigma_b2={sigma_b2:g}: χ₁ stays {side} 1 along the fixed points "
                f"for q* − σ_b² from 1 {end}; try a smaller sigma_b2 (or a larger one if χ₁ > 1)"
            )
    lo, hi = sorted((hi, hi + step))  # log χ₁(lo) < 0 < log χ₁(hi)
    while hi - lo > 1e-14:
        mid = (lo + hi) / 2
        if log_chi1(mid) < 0:
            lo = mid
        else:
            hi = mid
    t = math.exp((lo + hi) / 2)
    sigma_w2, chi1 = _chi1_along_fixed_points(act, sigma_b2, t)
    return EOCPoint(sigma_w2, sigma_b2, sigma_b2 + t, chi1)


def _closed_form_map(c: np.ndarray, delta: float) -> np.ndarray:
    """``(1−Δ)·c + Δ·(2/π)·(√(1−c²) + c·arcsin c)``: the EOC correlation map of ``a·s + b·|s|``."""
    return (1 - delta) * c + delta * (2 / math.pi) * (np.sqrt(1 - c * c) + c * np.arcsin(c))


def _r_rule(q: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``∫_0^10 dr``: geometric panels from ``1/(16√q)`` to 1, then width 1/2."""
    edges = [0.0] + [2.0**-j for j in range(int(4 + max(0.0, 0.5 * math.log2(q))), 0, -1)]
    edges += list(np.linspace(1.0, 10.0, 19))
    a, b = np.array(edges[:-1]), np.array(edges[1:])
    half = ((b - a) / 2)[:, None]
    return (((a + b) / 2)[:, None] + half * _GL_X).ravel(), (half * _GL_W).ravel()


def _mean_product(act: Activation, q: float, c: float) -> float:
    """``E[φ(u)φ(v)]`` for u, v jointly Gaussian, variance q, correlation c, in polar coordinates.

    With ``(z1, z2) = r·(cos θ, sin θ)`` and ``α = arccos c``: ``u = √q·r·cos θ`` and
    ``v = √q·r·cos(θ − α)``, so φ's kink at 0 lies on the θ panel edges ``±π/2``, ``α ± π/2``.
    """
    alpha = math.acos(c)
    r, w = _r_rule(q)
    radial = r * np.exp(-0.5 * r * r) * w / (2 * math.pi)
    root = math.sqrt(q)

    def f(theta: np.ndarray) -> np.ndarray:
        u = root * np.cos(theta)[:, None] * r
        v = root * np.cos(theta - alpha)[:, None] * r
        return ((_values(act, u) * _values(act, v)) @ radial)[None, :]

    kinks = np.mod([math.pi / 2, 3 * math.pi / 2, alpha + math.pi / 2, alpha + 3 * math.pi / 2], 2 * math.pi)
    breaks = np.unique(np.concatenate([[0.0, 2 * math.pi], kinks]))
    return float(_integrate(f, breaks)[0])


def correlation_map(
    activation: str | Activation | Callable,
    c: float | np.ndarray,
    sigma_b2: float = 0.0,
    point: EOCPoint | None = None,
) -> float | np.ndarray:
    """The correlation map at the EOC: ``c' = (σ_w²·E[φ(u)φ(v)] + σ_b²)/q*``, c in [-1, 1].

    ``u, v`` have variance ``q*`` and correlation ``c``. ``point`` (default: ``edge_of_chaos``
    at ``sigma_b2``) supplies ``σ_w², σ_b², q*``. The ``a·s + b·|s|`` family, and any φ with
    ``q* = 0`` (its linearisation at 0), use the closed form with ``Δ = b²/(a² + b²)``; other φ
    a 2-D quadrature (one per entry of c). Returns a float for scalar c, else an array of c's shape.
    """
    act = get_activation(activation)
    if point is None:
        point = edge_of_chaos(act, sigma_b2)
    elif sigma_b2 not in (0.0, point.sigma_b2):
        raise ValueError(f"sigma_b2={sigma_b2:g} contradicts point.sigma_b2={point.sigma_b2:g}; pass one")
    arr = np.asarray(c, dtype=np.float64)
    if not np.all((arr >= -1.0) & (arr <= 1.0)):
        raise ValueError("correlations c must lie in [-1, 1]")
    if act.is_linear_abs or point.q_star == 0.0:
        a, b = (act.a, act.b) if act.is_linear_abs else _origin_slopes(act)
        out = _closed_form_map(arr, b * b / (a * a + b * b))
    else:
        prod = np.array([_mean_product(act, point.q_star, x) for x in arr.ravel()]).reshape(arr.shape)
        out = (point.sigma_w2 * prod + point.sigma_b2) / point.q_star
    return float(out) if out.ndim == 0 else out
