"""Width schedules and update scales ``s_P`` (SPEC §1–2), and the relative moves ``ρ`` they give.

The ``ρ`` checks take one aligned rank-one step ``ΔW = s·u vᵀ`` (``v`` the layer's normalized
input for one sample, ``u`` a unit vector) on a real model and measure the relative RMS change
of that layer's pre-activation.
"""

import math

import numpy as np
import pytest
import torch

from nup import NuMLP
from nup.parameterization import ParamInfo, bias_scale_of, resolve_parameterization, weight_scale

SQRT2 = math.sqrt(2.0)  # σ_w of ReLU at the EOC


def _metas(model: NuMLP) -> dict[str, object]:
    return {name: p._nup_meta for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------- widths


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("quadratic", lambda m, k: m * k * k),
        ("linear", lambda m, k: m * k),
        ("constant", lambda m, k: m),
    ],
)
@pytest.mark.parametrize("m", [1, 3])
def test_named_width_schedules(schedule, expected, m):
    depth = 7
    param = resolve_parameterization("nup", m, schedule)
    assert param.hidden_widths(depth) == [expected(m, k) for k in range(1, depth)]
    model = NuMLP(5, 2, depth, m, width_schedule=schedule)
    assert model.widths == [5, *[expected(m, k) for k in range(1, depth)], 2]
    assert [layer.weight.shape for layer in model.layers] == [
        (model.widths[k], model.widths[k - 1]) for k in range(1, depth + 1)
    ]


def test_custom_callable_width_schedule():
    model = NuMLP(4, 3, 5, 2, width_schedule=lambda k: 10 + 3 * k)
    assert model.widths == [4, 13, 16, 19, 22, 3]


def test_named_parameterizations_pick_their_width_schedule():
    assert NuMLP(4, 3, 5, 2, parameterization="nup").widths == [4, 2, 8, 18, 32, 3]
    assert NuMLP(4, 3, 5, 6, parameterization="sp").widths == [4, 6, 6, 6, 6, 3]
    assert NuMLP(4, 3, 5, 6, parameterization="sp_inv_depth").widths == [4, 6, 6, 6, 6, 3]
    # The width schedule and the scale rule are separate knobs.
    model = NuMLP(4, 3, 5, 2, parameterization="sp", width_schedule="quadratic")
    assert model.widths == [4, 2, 8, 18, 32, 3]
    assert model.layers[2].weight_meta.scale == pytest.approx(math.sqrt(18))


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize("parameterization", ["nup", "sp", "sp_inv_depth"])
def test_named_parameterization_scales_match_spec_table(parameterization):
    depth, m = 6, 3
    model = NuMLP(7, 2, depth, m, parameterization=parameterization)
    n = model.widths
    hidden = {
        "nup": lambda k: math.sqrt(n[1]),
        "sp": lambda k: math.sqrt(n[k]),
        "sp_inv_depth": lambda k: math.sqrt(n[k]) / (depth - 2),
    }[parameterization]
    expected = {"layers.0.weight": math.sqrt(n[1]), f"layers.{depth - 1}.weight": math.sqrt(n[depth - 1])}
    expected |= {f"layers.{k - 1}.weight": hidden(k) for k in range(2, depth)}
    metas = _metas(model)
    assert set(metas) == set(expected)  # no biases by default
    for name, scale in expected.items():
        assert metas[name].scale == pytest.approx(scale, rel=1e-12), name


def test_custom_pair_of_width_schedule_and_scale_rule():
    seen = []

    def rule(p: ParamInfo) -> float:
        seen.append(p)
        return 0.25 * p.fan_in + p.layer

    model = NuMLP(3, 2, 5, 4, parameterization=(lambda k: 5 * k, rule))
    assert model.param.name == "custom"
    assert model.widths == [3, 5, 10, 15, 20, 2]
    assert [p.layer for p in seen] == [2, 3, 4]
    assert all(p.role == "hidden" and p.m == 4 and p.depth == 5 for p in seen)
    assert all(p.sigma_w == pytest.approx(SQRT2) for p in seen)
    assert [(p.fan_in, p.fan_out) for p in seen] == [(5, 10), (10, 15), (15, 20)]
    scales = [layer.weight_meta.scale for layer in model.layers]
    assert scales == pytest.approx([math.sqrt(5), 0.25 * 5 + 2, 0.25 * 10 + 3, 0.25 * 15 + 4, math.sqrt(20)])


def test_pair_of_names():
    model = NuMLP(3, 2, 4, 5, parameterization=("linear", "sp"))
    assert model.widths == [3, 5, 10, 15, 2]
    assert model.layers[1].weight_meta.scale == pytest.approx(math.sqrt(10))


def test_weight_scale_roles_and_readouts():
    info = lambda role: ParamInfo(role, 3, 16, 9, 2, 5, 1.5)
    rule = lambda p: 7.0
    assert weight_scale(info("input"), rule, "mup") == pytest.approx(3.0)
    assert weight_scale(info("hidden"), rule, "mup") == 7.0
    assert weight_scale(info("readout"), rule, "mup") == pytest.approx(4.0)
    with pytest.raises(ValueError, match="role"):
        weight_scale(info("bias"), rule, "mup")


def test_bias_scale_formula():
    info = ParamInfo("hidden", 3, 8, 18, 2, 5, 1.5)
    s_w, sigma_b, q_star = 0.7, 0.4, 1.3
    rho = s_w / math.sqrt(18)  # SPEC §2: ρ_k = s_W/√n_k (σ_w cancels)
    assert bias_scale_of(info, s_w, sigma_b, q_star) == pytest.approx(rho * math.sqrt(18 * q_star) / sigma_b)


def _gauss_mean(f, q: float) -> float:
    """``E[f(√q z)]``, z ~ N(0, 1), by 200-node Gauss–Hermite (smooth f, moderate q)."""
    z, w = np.polynomial.hermite_e.hermegauss(200)
    return float(np.sum(w * f(math.sqrt(q) * z)) / math.sqrt(2 * math.pi))


def test_tanh_bias_scales_match_spec():
    depth, m = 5, 2
    model = NuMLP(6, 2, depth, m, activation="tanh", bias=True, sigma_b2=0.3)
    eoc = model.eoc
    assert eoc.sigma_w2 == pytest.approx(2.505127, abs=1e-6)
    # q* is the variance fixed point and χ1 = 1 there (checked independently of nup.eoc).
    q_map = eoc.sigma_w2 * _gauss_mean(lambda s: np.tanh(s) ** 2, eoc.q_star) + 0.3
    assert eoc.q_star == pytest.approx(q_map, rel=1e-9)
    assert eoc.sigma_w2 * _gauss_mean(lambda s: np.cosh(s) ** -4, eoc.q_star) == pytest.approx(1.0, rel=1e-7)
    sigma_b = math.sqrt(0.3)
    n = model.widths
    metas = _metas(model)
    assert f"layers.{depth - 1}.bias" not in metas  # the readout has no bias
    for k in range(1, depth):
        w, b = metas[f"layers.{k - 1}.weight"], metas[f"layers.{k - 1}.bias"]
        s_w = math.sqrt(n[1])  # input and νP hidden: √n_1 (= √m under quadratic widths)
        assert (w.role, w.layer, w.scale) == ("input" if k == 1 else "hidden", k, pytest.approx(s_w))
        rho = s_w / math.sqrt(n[k])
        assert rho == pytest.approx(1 / k)  # ρ_k as SPEC defines it, under quadratic widths
        assert (b.role, b.layer) == ("bias", k)
        assert b.scale == pytest.approx(rho * math.sqrt(n[k] * eoc.q_star) / sigma_b, rel=1e-12)


# ----------------------------------------------------------------------------- resulting ρ


def _weight_step_rho(model: NuMLP, x: torch.Tensor) -> list[float]:
    """Relative RMS move of ``h_k`` under one aligned step ``s_P·u vᵀ`` on ``W_k``, k = 1 … L−1.

    Averaged over x's rows (one step per row).
    """
    hs = model.preactivations(x)
    out = []
    for k in range(1, model.depth):
        layer = model.layers[k - 1]
        inputs = x if k == 1 else model.activation(hs[k - 2])
        rels = []
        for inp, h in zip(inputs, hs[k - 1]):
            u = torch.randn(layer.fan_out)
            step = layer.weight_meta.scale * torch.outer(u / u.norm(), inp / inp.norm())
            with torch.no_grad():
                layer.weight += step
                moved = layer.preactivation(inp) - h
                layer.weight -= step
            rels.append((moved.norm() / h.norm()).item())
        out.append(sum(rels) / len(rels))
    return out


# (parameterization, width schedule, m, width offset, SPEC's "resulting ρ" column for k = 1 … L−1)
RHO_CASES = {
    "nup-quadratic": ("nup", "quadratic", 128, 0, lambda k, L: 1.0 / k),
    "nup-offset": ("nup", "quadratic", 32, 2, lambda k, L: 3.0 / (k + 2)),
    "nup-linear": ("nup", "linear", 512, 0, lambda k, L: 1.0 if k == 1 else 1.0 / math.sqrt(k)),
    "sp": ("sp", None, 1024, 0, lambda k, L: 1.0),
    "sp_inv_depth": ("sp_inv_depth", None, 1024, 0, lambda k, L: 1.0 if k == 1 else 1.0 / (L - 2)),
}


@pytest.fixture(scope="module")
def measured_rho():
    """Measured ρ_k of a depth-5 ReLU model for each case (built once: it takes a second)."""
    torch.manual_seed(1)
    x = torch.randn(2, 32)
    result = {}
    for case, (param, schedule, m, offset, _) in RHO_CASES.items():
        model = NuMLP(32, 4, 5, m, width_schedule=schedule, parameterization=param, width_offset=offset)
        scale_rho = [layer.weight_meta.scale / math.sqrt(layer.fan_out) for layer in model.layers[:-1]]
        result[case] = (_weight_step_rho(model, x), scale_rho, model.depth)
    return result


@pytest.mark.parametrize("case", list(RHO_CASES))
def test_aligned_step_moves_layers_by_s_over_sqrt_n(measured_rho, case):
    """What the scales give, whatever the case: ρ_k = s_P/√n_k (SPEC §2; σ_w cancels)."""
    measured, scale_rho, _ = measured_rho[case]
    assert measured == pytest.approx(scale_rho, rel=0.1)


@pytest.mark.parametrize("case", list(RHO_CASES))
def test_aligned_step_moves_layers_by_spec_rho(measured_rho, case):
    """SPEC §2's "resulting ρ" column, measured (this was a strict xfail while the column had a σ_w)."""
    measured, _, depth = measured_rho[case]
    assert measured == pytest.approx([RHO_CASES[case][4](k, depth) for k in range(1, depth)], rel=0.15)


def test_readout_step_moves_output_by_order_one():
    torch.manual_seed(2)
    for m in (16, 256):
        model = NuMLP(16, 3, 4, m)
        x = torch.randn(1, 16)
        hs = model.preactivations(x)
        phi = torch.relu(hs[-2][0])
        readout = model.layers[-1]
        u = torch.randn(3)
        with torch.no_grad():
            readout.weight += readout.weight_meta.scale * torch.outer(u / u.norm(), phi / phi.norm())
        moved = (model.preactivations(x)[-1] - hs[-1]).norm().item()
        # ‖Δf‖ = c_out·RMS(φ(h_{L−1})): independent of the width.
        assert moved == pytest.approx(phi.pow(2).mean().sqrt().item(), rel=1e-4)
        assert 0.3 < moved < 3


def _tanh_model_and_input(depth: int = 5, m: int = 128) -> tuple[NuMLP, torch.Tensor]:
    """A tanh model at σ_b² = 0.3 and 16 inputs whose h_1 has variance ≈ q*."""
    model = NuMLP(32, 2, depth, m, activation="tanh", bias=True, sigma_b2=0.3)
    x = torch.randn(16, 32)
    x *= math.sqrt((model.eoc.q_star - 0.3) / model.eoc.sigma_w2) / x.pow(2).mean().sqrt()
    return model, x


def _bias_step_rho(model: NuMLP, x: torch.Tensor) -> list[float]:
    out = []
    before = model.preactivations(x)
    for k in range(1, model.depth):
        layer = model.layers[k - 1]
        u = torch.randn(layer.fan_out)
        b0 = layer.bias.detach().clone()
        with torch.no_grad():
            layer.bias += layer.bias_meta.scale * u / u.norm()
        after = model.preactivations(x)
        with torch.no_grad():
            layer.bias.copy_(b0)
        out.append(((after[k - 1] - before[k - 1]).norm() / before[k - 1].norm()).item())
    return out


def test_bias_step_moves_its_layer_by_rho():
    torch.manual_seed(3)
    model, x = _tanh_model_and_input()
    rho = [1.0 / k for k in range(1, model.depth)]
    assert _bias_step_rho(model, x) == pytest.approx(rho, rel=0.1)


def test_bias_step_moves_like_its_weight_step():
    """Both move h_k by ρ_k = s_W/√n_k relative to RMS(h_k) = √q*, except that the weight only reaches the
    part of h_k it makes, a fraction √(1 − σ_b²/q*) of it (0.89 for tanh at σ_b² = 0.3). This was a strict
    xfail while bias_scale_of kept the old σ_w factor (biases then moved σ_w = 1.58 times more)."""
    torch.manual_seed(3)
    model, x = _tanh_model_and_input()
    weight_share = math.sqrt(1 - 0.3 / model.eoc.q_star)
    bias_rho, weight_rho = _bias_step_rho(model, x), _weight_step_rho(model, x[:2])
    assert bias_rho == pytest.approx([r / weight_share for r in weight_rho], rel=0.1)
    assert bias_rho == pytest.approx([layer.weight_meta.scale / math.sqrt(layer.fan_out)
                                      for layer in model.layers[:-1]], rel=0.1)


# ----------------------------------------------------------------------------- errors


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown parameterization"):
        resolve_parameterization("mup", 2)
    with pytest.raises(ValueError, match="unknown width schedule"):
        resolve_parameterization("nup", 2, "cubic")
    with pytest.raises(ValueError, match="unknown scale rule"):
        resolve_parameterization(("quadratic", "xyz"), 2)
    with pytest.raises(ValueError, match="pair"):
        resolve_parameterization(("quadratic",), 2)
    with pytest.raises(ValueError, match="width_schedule"):
        resolve_parameterization("nup", 2, 17)
    with pytest.raises(ValueError, match="unknown parameterization"):
        NuMLP(3, 2, 4, 2, parameterization="standard")
    with pytest.raises(ValueError, match="unknown width schedule"):
        NuMLP(3, 2, 4, 2, width_schedule="exponential")


def test_non_positive_custom_widths_raise():
    with pytest.raises(ValueError, match="non-positive"):
        NuMLP(3, 2, 4, 2, width_schedule=lambda k: 2 - k)
