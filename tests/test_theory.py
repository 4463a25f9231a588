"""nup.theory against SPEC §2's closed forms: T(L) per parameterization and the predicted η* slope."""

import math

import numpy as np
import pytest

from nup import NuMLP
from nup.theory import T, T_hidden, layout_of, predicted_lr_ratio, predicted_lr_slope, rho


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
