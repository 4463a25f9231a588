"""nup.theory against SPEC §2's closed forms: T(L) per parameterization and the predicted η* slope; the readout
inputs' cosine at init against the EOC correlation map."""

import math

import numpy as np
import pytest
import torch

from nup import NuMLP
from nup.diagnostics import pairwise_cosines, readout_features
from nup.theory import (
    T,
    T_hidden,
    feature_cosine_at_init,
    layout_of,
    predicted_lr_ratio,
    predicted_lr_slope,
    rho,
)


def harmonic(n: int) -> float:
    return sum(1.0 / k for k in range(1, n + 1))


@pytest.mark.parametrize("depth", [3, 4, 9, 32])
def test_T_closed_forms(depth):
    assert T(depth, 16, parameterization="sp") == pytest.approx(depth - 1)  # ρ_k = 1
    assert T(depth, 16, parameterization="sp_inv_depth") == pytest.approx(2.0)  # 1 + (L−2)/(L−2)
    assert T(depth, 2) == pytest.approx(harmonic(depth - 1))  # ρ_k = 1/k
    k0 = 3
    assert T(depth, 1, width_offset=k0) == pytest.approx((1 + k0) * (harmonic(depth - 1 + k0) - harmonic(k0)))
    assert T(depth, 1, width_offset=k0, depth_normalizer="harmonic") == pytest.approx(2.0)
    assert T_hidden(depth, 2) == pytest.approx(harmonic(depth - 1) - 1)
    assert T(depth, 4, width_schedule="linear") == pytest.approx(sum(1 / math.sqrt(k) for k in range(1, depth)))


def test_rho_matches_the_built_model():
    kwargs = dict(width_offset=2, depth_normalizer="harmonic", activation="tanh")
    model = NuMLP(5, 3, 7, 3, **kwargs)
    expected = [la.weight_meta.scale / math.sqrt(la.fan_out) for la in model.layers[:-1]]
    assert rho(7, 3, in_features=5, out_features=3, **kwargs) == pytest.approx(expected)
    assert layout_of(7, 3, in_features=5, out_features=3, **kwargs).widths == model.widths


def test_predicted_slopes():
    depths = (4, 8, 16, 32)
    assert predicted_lr_slope(depths, 1, parameterization="sp_inv_depth") == pytest.approx(0.0, abs=1e-12)
    assert predicted_lr_slope(depths, 1, width_offset=3, depth_normalizer="harmonic") == pytest.approx(0, abs=1e-12)
    # sp: η* ∝ 1/(L − 1), a slope a little steeper than −1 over 4 … 32
    expected = np.polyfit(np.log(depths), -np.log([d - 1 for d in depths]), 1)[0]
    assert predicted_lr_slope(depths, 128, parameterization="sp") == pytest.approx(expected)
    assert -1.2 < expected < -1.0
    # νP with (k + 3)² widths: about −0.63 (the measurement: −0.65)
    assert predicted_lr_slope(depths, 1, width_offset=3) == pytest.approx(-0.627, abs=0.005)
    ratio = T(4, 1, width_offset=3) / T(32, 1, width_offset=3)
    assert predicted_lr_ratio(depths, 1, width_offset=3) == pytest.approx(ratio)


def test_bad_configuration_keys_and_depths_raise():
    with pytest.raises(ValueError, match="unknown NuMLP configuration keys"):
        T(4, 2, widht_offset=3)
    with pytest.raises(ValueError, match="two or more depths"):
        predicted_lr_slope([4], 2)


def test_feature_cosine_at_init_is_the_relu_arc_cosine_map_iterated():
    """Depth 2 is one application of ReLU's EOC map, (√(1−c²) + (π − arccos c)·c)/π; deeper nets push pairs to 1."""
    cs = np.array([-0.9, -0.3, 0.0, 0.4, 0.95])
    arc = (np.sqrt(1 - cs**2) + (np.pi - np.arccos(cs)) * cs) / np.pi
    for c, want in zip(cs, arc):
        assert feature_cosine_at_init([c], 2) == pytest.approx(want, abs=1e-5)
    twice = (np.sqrt(1 - arc**2) + (np.pi - np.arccos(arc)) * arc) / np.pi
    assert feature_cosine_at_init(cs, 3) == pytest.approx(twice.mean(), abs=1e-5)
    by_depth = [feature_cosine_at_init(cs, d) for d in (2, 4, 8, 16, 32)]
    assert all(a < b for a, b in zip(by_depth, by_depth[1:])) and 0.9 < by_depth[-1] < 1.0
    with pytest.raises(ValueError, match="depth"):
        feature_cosine_at_init(cs, 1)


def test_feature_cosine_of_a_wide_net_at_init_matches_the_prediction():
    """A wide NuMLP at init measures what the infinite-width map predicts, within its finite-width spread."""
    torch.manual_seed(0)
    x = torch.randn(48, 8) + 0.5  # inputs with positive mean cosines
    predicted = feature_cosine_at_init(pairwise_cosines(x).numpy(), 6)
    measured = [readout_features(NuMLP(8, 3, 6, 64), x)["cos"] for _ in range(3)]  # widths 64·k², up to 1600
    assert abs(np.mean(measured) - predicted) < 0.03, (measured, predicted)
    assert predicted > float(pairwise_cosines(x).mean()) + 0.1  # the map moved the pairs towards 1


def test_readout_features_count_units_switched_off_for_every_input():
    """Readout inputs whose last hidden weights are all negative see a ReLU's 0 on every input (its inputs
    φ(h_{L−2}) are ≥ 0): planting half the rows negative and half positive gives exactly 0.5; leaky ReLU
    switches no unit off."""
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    for activation, expected in (("relu", 0.5), ("leaky_relu:0.5", 0.0)):
        model = NuMLP(8, 3, 4, 16, activation=activation)
        w = model.layers[-2].weight
        with torch.no_grad():
            w.abs_()
            w[: w.shape[0] // 2].neg_()
        if activation == "relu":  # the positive half is on for every input whose h_{L−2} is not all off
            assert (model.activation(model.preactivations(x)[-3]) > 0).any(dim=1).all()
        got = readout_features(model, x)
        assert got["inactive"] == expected
        phi = model.activation(model.preactivations(x)[-2]).detach()
        assert got["cos"] == pytest.approx(float(pairwise_cosines(phi).mean()), rel=1e-12)


def test_pairwise_cosines_against_each_pair_by_hand():
    rows = torch.randn(5, 7, dtype=torch.float64)
    rows[3] = 0.0  # a zero row: cosine 0 with every other
    got = pairwise_cosines(rows)
    want = [0.0 if 3 in (i, j) else float(torch.nn.functional.cosine_similarity(rows[i], rows[j], dim=0))
            for i in range(5) for j in range(i + 1, 5)]
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, abs=1e-12)
    for bad in (torch.randn(1, 3), torch.randn(4)):
        with pytest.raises(ValueError, match="k >= 2"):
            pairwise_cosines(bad)
