"""A minibatch step's efficiency per layer: the prediction from the inputs' cosines and the EOC map
(nup.theory) against closed forms and a wide net's measurement (nup.diagnostics), the effective move sum
T_e(L), and a number as depth normalizer."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup.diagnostics import pairwise_cosines, step_efficiency
from nup.theory import T, T_effective, batch_efficiency_at_init, effective_divisor, lr_slope, predicted_lr_slope


def test_efficiency_closed_forms():
    """Batch 1 or identical inputs: a rank-one step (e = 1). Orthogonal inputs under ReLU: layer 1 has
    e² = 1/B, layer 2 sees the map's c = 1/π, so e² = 1/B + (1 − 1/B)/π²."""
    cos = np.zeros(45)  # 10 mutually orthogonal inputs
    assert batch_efficiency_at_init(cos, 6, 1) == pytest.approx([1.0] * 5)
    assert batch_efficiency_at_init(np.ones(45), 6, 64) == pytest.approx([1.0] * 5)
    e = batch_efficiency_at_init(cos, 3, 16)
    assert e == pytest.approx([math.sqrt(1 / 16), math.sqrt(1 / 16 + (15 / 16) / math.pi**2)], abs=1e-5)
    deep = batch_efficiency_at_init(cos, 32, 64)
    assert all(a < b for a, b in zip(deep, deep[1:])) and 0.9 < deep[-1] < 1.0  # deep inputs look alike
    with pytest.raises(ValueError, match="batch_size"):
        batch_efficiency_at_init(cos, 4, 0)
    with pytest.raises(ValueError, match="input_cosines is empty"):
        batch_efficiency_at_init([], 4, 8)


def test_step_efficiency_is_the_move_a_nup_step_makes():
    """One NuP step: each layer's own move (its input held at init) over lr·ρ_k is the diagnostic's e_k."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    model = NuMLP(10, 3, 5, 4, width_offset=2)
    predicted = step_efficiency(model, x, y)
    with torch.no_grad():
        inputs, hs, w0 = [x], model.preactivations(x), [layer.weight.clone() for layer in model.layers]
        inputs += [model.activation(h) for h in hs[:-2]]
    lr = 1e-3
    opt = NuP(model.named_parameters(), lr=lr)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        moved = [float((layer.alpha * (a @ (layer.weight - w).t())).norm() / h.norm()) / (lr * r)
                 for layer, a, w, h, r in zip(model.layers, inputs, w0, hs, model.layout.rho)]
    assert moved == pytest.approx(predicted, rel=1e-3)
    assert step_efficiency(model, x[:1], y[:1]) == pytest.approx([1.0] * 4, abs=0.25)  # rank one: 1 ± 1/√n_k


def test_step_efficiency_changes_nothing_under_a_fused_optimizer():
    """With NuP(fused=True) attached (updates applied inside backward), the diagnostic moves no weight."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = NuMLP(6, 3, 4, 4, width_offset=1)
    plain = step_efficiency(model, x, y)
    NuP(model.named_parameters(), lr=0.1, fused=True)  # attaches an in-backward update to every layer
    before = [p.detach().clone() for p in model.parameters()]
    assert step_efficiency(model, x, y) == plain
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_wide_net_measures_the_predicted_efficiency():
    """Widths 16·(k + 3)², up to 2304: every layer's measured e_k within 0.06 of the prediction, which rises
    from ≈ 0.4 (8-dim Gaussian inputs) towards 1."""
    torch.manual_seed(1)
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    predicted = np.array(batch_efficiency_at_init(pairwise_cosines(x).numpy(), 10, 48))
    measured = np.mean([step_efficiency(NuMLP(8, 4, 10, 16, width_offset=3), x, y) for _ in range(3)], axis=0)
    assert np.abs(measured - predicted).max() < 0.06, (measured.round(3), predicted.round(3))
    assert predicted[0] < 0.5 < 0.8 < predicted[-1]


def test_effective_move_sum_and_divisor():
    torch.manual_seed(0)
    cos = pairwise_cosines(torch.randn(64, 8)).numpy()
    for depth in (4, 8, 16):
        assert T_effective(depth, 1, cos, 1, width_offset=3) == pytest.approx(T(depth, 1, width_offset=3))
        e = batch_efficiency_at_init(cos, depth, 64)
        assert T_effective(depth, 1, cos, 64, width_offset=3) < T(depth, 1, width_offset=3)
        div = effective_divisor(depth, 1, cos, 64, width_offset=3)
        # the divisor as normalizer: the hidden block's effective move is 1, so T_e = e_1·ρ_1 + 1 at every depth
        assert NuMLP(8, 4, depth, 1, width_offset=3, depth_normalizer=div).layout.hidden_divisor == div
        assert T_effective(depth, 1, cos, 64, width_offset=3, depth_normalizer=div) == pytest.approx(e[0] + 1.0)
    # the efficiencies rise with depth, so T_e's slope is steeper than T's
    depths = [4, 8, 16, 32]
    te = [T_effective(d, 1, cos, 64, width_offset=3) for d in depths]
    assert lr_slope(depths, te) < predicted_lr_slope(depths, 1, width_offset=3) - 0.1
    with pytest.raises(ValueError, match="depth >= 3"):
        effective_divisor(2, 1, cos, 64)


def test_a_number_as_depth_normalizer_divides_the_hidden_scales():
    plain, normed = NuMLP(7, 3, 6, 2, width_offset=1), NuMLP(7, 3, 6, 2, width_offset=1, depth_normalizer=2.5)
    for a, b in zip(plain.layers, normed.layers):
        factor = 2.5 if a.weight_meta.role == "hidden" else 1.0
        assert b.weight_meta.scale == pytest.approx(a.weight_meta.scale / factor)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "log"):
        with pytest.raises(ValueError, match="unknown depth_normalizer .* or a positive number"):
            NuMLP(7, 3, 6, 2, depth_normalizer=bad)
