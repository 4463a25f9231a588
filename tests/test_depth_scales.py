"""Each layer's own move under a real NuP step at batch 1 is ``η·s_P/√n_k`` (SPEC §2), for offset widths
and the harmonic depth normalizer too.

At batch 1 the gradient of ``W_k`` is rank one, ``G = α·δ xᵀ``, so the normalized step is exactly aligned
with the layer's input: ``ΔW = −η·s·δ̂ x̂ᵀ`` and ``‖Δh_k‖/‖h_k‖ = η·s·‖x‖/‖W_k x‖``, which is
``η·s/√n_k`` up to the ``O(1/√n_k)`` fluctuation of ``‖W_k x̂‖/√n_k`` for Gaussian ``W_k``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup.theory import T_hidden


def _own_moves(model: NuMLP, lr: float) -> tuple[list[float], list[float]]:
    """``(measured, exact)`` relative moves of ``h_1 … h_{L−1}`` from one NuP step, each layer's input held."""
    x = torch.randn(1, model.widths[0])
    inputs, h_before = [], []
    with torch.no_grad():
        a = x
        for layer in model.layers[:-1]:
            inputs.append(a)
            h_before.append(layer.preactivation(a))
            a = layer.activation(h_before[-1])
    w_before = [layer.weight.detach().clone() for layer in model.layers[:-1]]
    opt = NuP(model.named_parameters(), lr=lr)
    F.cross_entropy(model(x), torch.tensor([1])).backward()
    opt.step()
    measured, exact = [], []
    with torch.no_grad():
        for layer, a, h, w in zip(model.layers[:-1], inputs, h_before, w_before):
            measured.append(((layer.preactivation(a) - h).norm() / h.norm()).item())
            exact.append(lr * layer.weight_meta.scale * a.norm().item() / (a @ w.T).norm().item())
    return measured, exact


CASES = {
    "nup, k0 = 0": dict(parameterization="nup"),
    "nup, k0 = 3": dict(parameterization="nup", width_offset=3),
    "nup, k0 = 3, harmonic": dict(parameterization="nup", width_offset=3, depth_normalizer="harmonic"),
    "sp": dict(parameterization="sp"),
    "sp_inv_depth": dict(parameterization="sp_inv_depth"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_moves_by_lr_times_s_over_sqrt_n_at_batch_one(case):
    torch.manual_seed(0)
    kwargs = CASES[case]
    m = 64 if kwargs["parameterization"] == "nup" else 512
    model = NuMLP(24, 5, 6, m, **kwargs)
    lr = 0.01
    measured, exact = _own_moves(model, lr)
    spec = [lr * layer.weight_meta.scale / math.sqrt(layer.fan_out) for layer in model.layers[:-1]]
    assert measured == pytest.approx(exact, rel=1e-3)  # the step is exactly rank one and aligned (fp32)
    assert measured == pytest.approx(spec, rel=0.1)  # ‖W x̂‖ ≈ √n_k


def test_offset_widths_and_their_rho_profile():
    model = NuMLP(7, 3, 6, 2, width_offset=3)
    assert model.widths == [7, *[2 * (k + 3) ** 2 for k in range(1, 6)], 3]
    assert model.width_offset == 3 and model.depth_normalizer == "none"
    assert model.layout.rho == pytest.approx([4 / (k + 3) for k in range(1, 6)])  # (1 + k0)/(k + k0)
    assert NuMLP(7, 3, 6, 2).widths == NuMLP(7, 3, 6, 2, width_offset=0).widths  # default k0 = 0


def test_harmonic_normalizer_divides_hidden_scales_by_T_hidden():
    plain = NuMLP(7, 3, 9, 2, width_offset=2)
    normed = NuMLP(7, 3, 9, 2, width_offset=2, depth_normalizer="harmonic")
    t_hidden = sum(plain.layout.rho[1:])
    assert normed.layout.hidden_divisor == pytest.approx(t_hidden)
    assert T_hidden(9, 2, width_offset=2) == pytest.approx(t_hidden)
    for a, b in zip(plain.layers, normed.layers):
        expected = a.weight_meta.scale / (t_hidden if a.weight_meta.role == "hidden" else 1.0)
        assert b.weight_meta.scale == pytest.approx(expected)
    assert sum(normed.layout.rho[1:]) == pytest.approx(1.0)  # the hidden block moves like one layer
    # under sp the harmonic normalizer is sp_inv_depth: T_hidden = L − 2
    sp_h = NuMLP(7, 3, 9, 16, parameterization="sp", depth_normalizer="harmonic")
    sp_inv = NuMLP(7, 3, 9, 16, parameterization="sp_inv_depth")
    assert [la.weight_meta.scale for la in sp_h.layers] == pytest.approx([la.weight_meta.scale for la in sp_inv.layers])


def test_harmonic_bias_scales_follow_their_normalized_weights():
    model = NuMLP(6, 2, 5, 16, activation="tanh", bias=True, sigma_b2=0.3, depth_normalizer="harmonic")
    for layer in model.layers[:-1]:
        rho = layer.weight_meta.scale / math.sqrt(layer.fan_out)
        expected = rho * math.sqrt(layer.fan_out * model.eoc.q_star) / math.sqrt(0.3)
        assert layer.bias_meta.scale == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(width_offset=-1), "width_offset must be an integer >= 0"),
        (dict(width_offset=1.5), "width_offset must be an integer >= 0"),
        (dict(depth_normalizer="log"), "unknown depth_normalizer 'log'"),
    ],
)
def test_bad_offset_or_normalizer_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NuMLP(4, 2, 4, 2, **kwargs)
