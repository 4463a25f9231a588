"""EOC solver and correlation map (SPEC §1): table values, an independent quadrature, Monte Carlo."""

import math

import numpy as np
import pytest
import torch

from nup.eoc import EOCPoint, correlation_map, edge_of_chaos, gaussian_moments
from nup_kernels.activations import get_activation, linear_abs

SIGMA_B2 = [0.01, 0.1, 0.5, 1.0, 2.0, 4.0]


# ---------------------------------------------------------------------------- the EOC point


@pytest.mark.parametrize(
    "spec, sigma_b2, sigma_w2, q_star",
    [("tanh", 0.05, 1.760955, 0.570048), ("tanh", 0.3, 2.505127, None), ("tanh", 0.0, 1.0, 0.0)],
)
def test_spec_table(spec, sigma_b2, sigma_w2, q_star):
    p = edge_of_chaos(spec, sigma_b2)
    assert p.sigma_w2 == pytest.approx(sigma_w2, abs=1e-6)
    if q_star is not None:
        assert p.q_star == pytest.approx(q_star, abs=1e-6)
    assert p.sigma_b2 == sigma_b2
    assert p.chi1 == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "spec, sigma_w2",
    [
        ("relu", 2.0),
        ("abs", 1.0),
        ("identity", 1.0),
        ("leaky_relu:0.2", 1 / (0.6**2 + 0.4**2)),
        ("linear_abs:0.25,0.75", 1 / (0.25**2 + 0.75**2)),
        (linear_abs(-0.3, 0.4), 1 / (0.3**2 + 0.4**2)),
    ],
)
def test_linear_abs_closed_form(spec, sigma_w2):
    p = edge_of_chaos(spec)
    assert p.sigma_w2 == pytest.approx(sigma_w2, rel=1e-15) and p.chi1 == pytest.approx(1.0, rel=1e-15)
    assert (p.sigma_b2, p.q_star) == (0.0, 1.0)
    assert p.sigma_w == pytest.approx(math.sqrt(sigma_w2)) and p.sigma_b == 0.0


@pytest.mark.parametrize("spec, sigma_w2", [("tanh", 1.0), ("gelu", 4.0), ("silu", 4.0), (torch.relu, 2.0)])
def test_zero_bias_limit(spec, sigma_w2):
    """σ_b² = 0 and φ(0) = 0: the q* → 0 limit, σ_w² = 1/(a² + b²) from the slopes φ'(0±)."""
    p = edge_of_chaos(spec, 0.0)
    assert (p.sigma_w2, p.q_star, p.chi1) == (sigma_w2, 0.0, 1.0)
    if spec != torch.relu:  # the EOC curve σ_w²(σ_b²) runs into the limit point
        near = edge_of_chaos(spec, 1e-12)
        assert abs(near.sigma_w2 - sigma_w2) < 1e-3 * sigma_w2 and near.q_star < 1e-3


def test_callable_matches_named_and_scales():
    named = edge_of_chaos("tanh", 0.3)
    via_autograd = edge_of_chaos(lambda s: torch.tanh(s), 0.3)
    assert via_autograd.sigma_w2 == pytest.approx(named.sigma_w2, rel=1e-12)
    assert via_autograd.q_star == pytest.approx(named.q_star, rel=1e-12)
    # φ(s) = tanh(k·s) at σ_b² is tanh at k²·σ_b² with σ_w² and q* divided by k²
    k = 40.0
    steep = edge_of_chaos(lambda s: torch.tanh(k * s), 0.3)
    wide = edge_of_chaos("tanh", 0.3 * k * k)
    assert steep.sigma_w2 * k * k == pytest.approx(wide.sigma_w2, rel=1e-10)
    assert steep.q_star * k * k == pytest.approx(wide.q_star, rel=1e-10)


def _scipy_moments(spec: str, q: float) -> tuple[float, float]:
    """E[φ(√q z)²], E[φ'(√q z)²] by scipy's adaptive QUADPACK, in u = √q z, split at 0."""
    integrate = pytest.importorskip("scipy.integrate")
    phi = {
        "tanh": (math.tanh, lambda u: 1 - math.tanh(u) ** 2),
        "gelu": (
            lambda u: u * 0.5 * math.erfc(-u / math.sqrt(2)),
            lambda u: 0.5 * math.erfc(-u / math.sqrt(2)) + u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi),
        ),
        "silu": (
            lambda u: u / (1 + math.exp(-u)),
            lambda u: (1 + math.exp(-u) + u * math.exp(-u)) / (1 + math.exp(-u)) ** 2,
        ),
    }[spec]
    s = math.sqrt(q)

    def mean(g):
        dens = lambda u: g(u) ** 2 * math.exp(-u * u / (2 * q)) / math.sqrt(2 * math.pi * q)
        return sum(
            integrate.quad(dens, lo, hi, epsabs=0, epsrel=1e-13, limit=500)[0]
            for lo, hi in [(-12 * s, 0.0), (0.0, 12 * s)]
        )

    return mean(phi[0]), mean(phi[1])


@pytest.mark.parametrize("spec", ["tanh", "gelu", "silu"])
def test_solver_against_independent_quadrature(spec):
    """χ₁ = 1 and the fixed point hold under scipy's quadrature (an EOC exists at every σ_b² here)."""
    for sigma_b2 in SIGMA_B2:
        p = edge_of_chaos(spec, sigma_b2)
        e_phi2, e_dphi2 = _scipy_moments(spec, p.q_star)
        assert p.sigma_w2 * e_dphi2 == pytest.approx(1.0, abs=1e-9), sigma_b2
        assert p.sigma_w2 * e_phi2 + sigma_b2 == pytest.approx(p.q_star, rel=1e-9), sigma_b2
        assert gaussian_moments(spec, p.q_star) == pytest.approx((e_phi2, e_dphi2), rel=1e-11)


def test_moments_at_large_q():
    """The narrow peak of φ'²: E[sech⁴(√q z)] → (4/3)/√(2πq) as q → ∞."""
    for q in [1e4, 1e6, 1e8]:
        e_phi2, e_dphi2 = gaussian_moments("tanh", q)
        assert e_dphi2 * math.sqrt(2 * math.pi * q) * 3 / 4 == pytest.approx(1.0, abs=2 / math.sqrt(q))
        assert 0.99 < e_phi2 < 1.0


# ---------------------------------------------------------------------------- Monte Carlo


def _layers(act, point: EOCPoint, depth: int, x: torch.Tensor, gen: torch.Generator):
    """Pre-activations h_1..h_depth of a random MLP with N(0, σ_w²/n) weights and N(0, σ_b²) biases."""
    h, out = x, []
    for k in range(depth):
        n = h.shape[1]
        w = torch.randn(n, n, generator=gen).double()  # float32 draws: 4x faster than float64 ones
        b = torch.randn(n, generator=gen).double()
        a = h if k == 0 else act(h)
        h = point.sigma_w / math.sqrt(n) * a @ w.T + point.sigma_b * b
        out.append(h)
    return out


def test_monte_carlo_chi1_tanh():
    """Width 2000: once q has reached q*, σ_w²·mean φ'(h)² ≈ 1 and perturbations neither grow nor shrink."""
    act, point = get_activation("tanh"), edge_of_chaos("tanh", 0.3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2000, generator=gen, dtype=torch.float64)
    dx = 1e-6 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    both = _layers(act, point, 10, torch.cat([x, x + dx]), gen)
    hs, hs_dx = [h[:16] for h in both], [h[16:] for h in both]
    late = hs[4:]
    q = np.mean([float((h**2).mean()) for h in late])
    chi1 = np.mean([float((point.sigma_w2 * act.derivative(h) ** 2).mean()) for h in late])
    growth = [float(((b - a) ** 2).sum()) for a, b in zip(hs, hs_dx)]
    per_layer = np.exp(np.mean(np.log(np.array(growth[5:]) / np.array(growth[4:-1]))))
    assert q == pytest.approx(point.q_star, rel=0.03)
    assert chi1 == pytest.approx(1.0, abs=0.02)
    assert per_layer == pytest.approx(1.0, abs=0.02)
    assert float((hs[0] ** 2).mean()) > 1.5 * point.q_star  # it did start away from q*


def test_monte_carlo_relu_preserves_length():
    """ReLU at σ_w² = 2: the per-layer gain of the squared length is 1 (its spread over seeds is ~1%)."""
    point = edge_of_chaos("relu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2000, generator=gen, dtype=torch.float64)
    q = np.array([float((h**2).mean()) for h in _layers(torch.relu, point, 16, x, gen)])
    assert np.mean(q[1:] / q[:-1]) == pytest.approx(1.0, abs=0.03)


# ---------------------------------------------------------------------------- correlation map


C = np.array([-1.0, -0.9, -0.3, 0.0, 0.4, 0.8, 0.99, 1.0])


@pytest.mark.parametrize(
    "name, fn, delta", [("relu", torch.relu, 0.5), ("abs", torch.abs, 1.0), ("leaky_relu:0.2", None, 0.16 / 0.52)]
)
def test_correlation_map_closed_form_vs_quadrature(name, fn, delta):
    closed = correlation_map(name, C)
    expected = (1 - delta) * C + delta * 2 / math.pi * (np.sqrt(1 - C**2) + C * np.arcsin(C))
    np.testing.assert_allclose(closed, expected, rtol=0, atol=1e-15)
    assert closed[-1] == 1.0 and np.all(closed[:-1] > C[:-1])  # c = 1 is the fixed point it moves to
    fn = fn or (lambda s: torch.nn.functional.leaky_relu(s, 0.2))
    for q_star in [1.0, 37.0]:  # a callable takes the 2-D quadrature; homogeneous φ: q* does not matter
        point = EOCPoint(edge_of_chaos(name).sigma_w2, 0.0, q_star, 1.0)
        np.testing.assert_allclose(correlation_map(fn, C, point=point), closed, rtol=0, atol=1e-12)
    # with no point, a callable with φ(0) = 0 gets the q* → 0 limit: its linearisation's closed form
    np.testing.assert_allclose(correlation_map(fn, C), closed, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sigma_b2", [0.05, 0.3, 2.0])
def test_correlation_map_tanh(sigma_b2):
    point = edge_of_chaos("tanh", sigma_b2)
    c0, c1 = correlation_map("tanh", [0.0, 1.0], point=point)
    assert c0 == pytest.approx(sigma_b2 / point.q_star, abs=1e-12)  # odd φ: E[φ(u)φ(v)] = 0 at c = 0
    assert c1 == pytest.approx(1.0, abs=1e-12)
    eps = 1e-4  # the slope of the map at c = 1 is χ₁ = 1
    assert (1 - correlation_map("tanh", 1 - eps, sigma_b2)) / eps == pytest.approx(1.0, abs=1e-3)
    integrate = pytest.importorskip("scipy.integrate")
    c, q = 0.5, point.q_star
    s, r = math.sqrt(1 - c * c), math.sqrt(q)
    dens = lambda z2, z1: (
        math.tanh(r * z1) * math.tanh(r * (c * z1 + s * z2)) * math.exp(-(z1 * z1 + z2 * z2) / 2) / (2 * math.pi)
    )
    mean_prod = integrate.dblquad(dens, -10, 10, -10, 10, epsabs=1e-13, epsrel=1e-12)[0]
    assert correlation_map("tanh", c, point=point) == pytest.approx(
        (point.sigma_w2 * mean_prod + sigma_b2) / q, abs=1e-10
    )


@pytest.mark.parametrize("name, delta", [("relu", 0.5), ("abs", 1.0), ("leaky_relu:0.2", 0.16 / 0.52)])
def test_correlation_depth_asymptotics(name, delta):
    """1 − c^l ≈ 9π²/(8Δ²l²): measured ratios from c⁰ = 0 are ~0.92 at l=300, ~0.97 at 1000, ~0.99 at 3000."""
    c, ratio = 0.0, {}
    for layer in range(1, 3001):
        c = correlation_map(name, c)
        if layer in (300, 1000, 3000):
            ratio[layer] = (1 - c) * 8 * delta**2 * layer**2 / (9 * math.pi**2)
    assert abs(ratio[1000] - 1) < 0.05 and abs(ratio[3000] - 1) < 0.02
    assert abs(ratio[3000] - 1) < abs(ratio[1000] - 1) < abs(ratio[300] - 1)


def test_correlation_map_shapes_and_errors():
    assert isinstance(correlation_map("relu", 0.3), float)
    assert correlation_map("relu", np.zeros((2, 3))).shape == (2, 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        correlation_map("relu", 1.5)
    with pytest.raises(ValueError, match="contradicts"):
        correlation_map("tanh", 0.5, sigma_b2=0.1, point=edge_of_chaos("tanh", 0.3))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, sigma_b2, match",
    [
        (lambda s: 0 * s + 1, 0.0, "constant φ has no EOC"),
        (lambda s: 0 * s + 1, 0.5, "constant φ has no EOC"),
        (lambda s: torch.ones_like(s), 0.5, "autograd"),
        ("tanh", -0.1, "finite variance >= 0"),
        ("tanh", float("nan"), "finite variance >= 0"),
        ("relu", 0.5, "EOC only at σ_b = 0.*use sigma_b2=0 or a smooth activation"),
        ("linear_abs:0,0", 0.0, "no EOC"),
        ("swish", 0.0, "unknown activation.*choose one of"),
        (torch.relu, 0.5, "no EOC.*try a smaller sigma_b2"),
    ],
)
def test_no_eoc_errors(spec, sigma_b2, match):
    with pytest.raises(ValueError, match=match):
        edge_of_chaos(spec, sigma_b2)
