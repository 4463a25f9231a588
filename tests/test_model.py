"""NuMLP (SPEC §1–2): widths, multipliers, parameter metadata, the forward against the SPEC formulas,
pre-activations, the depth-64 coordinate check at init, and argument errors."""

import copy
import math

import pytest
import torch

from nup import NuMLP, ParamMeta
from nup.parameterization import DEFAULT_WIDTH_LIMIT
from nup_kernels.activations import get_activation

SQRT2 = math.sqrt(2.0)  # σ_w of ReLU at the EOC
TANH_SIGMA_W2 = 2.505127  # SPEC §1: tanh at σ_b² = 0.3


def hand_forward(model: NuMLP, x: torch.Tensor, phi, sigma_w: float, sigma_b: float, c_out: float = 1.0):
    """``[h_1, …, h_{L−1}, f]`` from SPEC §1's formulas, in float64, from the model's weights."""
    ws = [layer.weight.detach().double() for layer in model.layers]
    bs = [None if layer.bias is None else layer.bias.detach().double() for layer in model.layers]
    a, out = x.double(), []
    for k, (w, b) in enumerate(zip(ws, bs), start=1):
        if k < len(ws):
            h = sigma_w / math.sqrt(w.shape[1]) * a @ w.T
            if b is not None:
                h = h + sigma_b * b
            out.append(h)
            a = phi(h)
        else:
            out.append(c_out / w.shape[1] * a @ w.T)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- structure


def test_widths_layers_and_multipliers():
    model = NuMLP(10, 3, 5, 2, c_out=2.5)
    n = [10, 2, 8, 18, 32, 3]
    assert model.widths == n
    assert len(model.layers) == 5 and model.depth == 5 and model.capped is False
    for k, layer in enumerate(model.layers, start=1):
        assert layer.weight.shape == (n[k], n[k - 1])
        assert layer.bias is None
        alpha = 2.5 / n[k - 1] if k == 5 else SQRT2 / math.sqrt(n[k - 1])
        assert layer.alpha == pytest.approx(alpha, rel=1e-12)


def test_ntk_readout_multiplier():
    model = NuMLP(4, 2, 3, 3, readout="ntk")
    assert model.layers[-1].alpha == pytest.approx(1 / math.sqrt(12))


def test_weights_start_standard_normal():
    model = NuMLP(64, 8, 4, 16)
    w = torch.cat([layer.weight.detach().flatten() for layer in model.layers])
    assert w.numel() == 64 * 16 + 16 * 64 + 64 * 144 + 144 * 8
    assert abs(w.mean().item()) < 0.02
    assert w.std().item() == pytest.approx(1.0, abs=0.02)


def _check_meta(model: NuMLP) -> None:
    depth = model.depth
    names = dict(model.named_parameters())
    for k, layer in enumerate(model.layers, start=1):
        role = "input" if k == 1 else "readout" if k == depth else "hidden"
        meta = names[f"layers.{k - 1}.weight"]._nup_meta
        assert isinstance(meta, ParamMeta)
        assert (meta.layer, meta.role) == (k, role)
        assert meta == layer.weight_meta
        assert names[f"layers.{k - 1}.weight"]._nup_layer() is layer
        if layer.bias is not None:
            bmeta = names[f"layers.{k - 1}.bias"]._nup_meta
            assert (bmeta.layer, bmeta.role) == (k, "bias") and bmeta == layer.bias_meta
            assert names[f"layers.{k - 1}.bias"]._nup_layer() is layer
    assert all(hasattr(p, "_nup_meta") for p in model.parameters())


def test_param_meta_on_every_parameter_and_survives_copies():
    model = NuMLP(6, 2, 4, 2, activation="tanh", bias=True, sigma_b2=0.3)
    assert len(list(model.parameters())) == 4 + 3  # weights, and biases on the hidden layers only
    _check_meta(model)
    scales = [p._nup_meta.scale for p in model.parameters()]
    assert all(s > 0 for s in scales)

    clone = copy.deepcopy(model)
    _check_meta(clone)
    assert [p._nup_meta.scale for p in clone.parameters()] == scales
    assert all(p is not q for p, q in zip(clone.parameters(), model.parameters()))

    as64 = model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in as64.parameters())
    _check_meta(as64)
    assert [p._nup_meta.scale for p in as64.parameters()] == scales


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    ("activation", "kwargs", "phi"),
    [
        ("relu", {}, torch.relu),
        ("tanh", {"bias": True, "sigma_b2": 0.3}, torch.tanh),
    ],
)
def test_forward_and_preactivations_match_spec_formulas(activation, kwargs, phi):
    depth = 5
    model = NuMLP(7, 3, depth, 3, activation=activation, c_out=1.7, **kwargs)
    sigma_w2 = 2.0 if activation == "relu" else TANH_SIGMA_W2
    assert model.eoc.sigma_w2 == pytest.approx(sigma_w2, abs=1e-6)
    sigma_b = math.sqrt(kwargs.get("sigma_b2", 0.0))
    x = torch.randn(9, 7)
    expected = hand_forward(model, x, phi, model.eoc.sigma_w, sigma_b, c_out=1.7)
    # The SPEC's 7-digit σ_w² gives the same forward to that precision.
    spec = hand_forward(model, x, phi, math.sqrt(sigma_w2), sigma_b, c_out=1.7)
    assert rel_err(spec[-1], expected[-1]) < 1e-5

    out = model(x)
    assert out.shape == (9, 3) and out.dtype == torch.float32
    assert rel_err(out, expected[-1]) < 1e-5
    hs = model.preactivations(x)
    assert len(hs) == depth
    assert [h.shape[-1] for h in hs] == model.widths[1:]
    for h, e in zip(hs, expected):
        assert rel_err(h, e) < 1e-5
    assert rel_err(hs[-1], out) < 1e-6

    # A float64 model computes in float64; leading batch dimensions are kept.
    model64 = model.to(torch.float64)
    out64 = model64(x.double())
    assert out64.dtype == torch.float64 and rel_err(out64, expected[-1]) < 1e-12
    assert model64(x.double().reshape(3, 3, 7)).shape == (3, 3, 3)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_small_batch_cpu_forward_takes_autograds_own_ops_and_agrees(activation, monkeypatch):
    """A layer input of at most NATIVE_MAX_INPUT entries runs autograd's own ops (α scales x); a larger
    one ScaledLinearAct (α inside the GEMMs). Values, gradients and a Hessian-vector product agree."""
    import nup.model as model_module

    kwargs = {"bias": True, "sigma_b2": 0.3} if activation == "tanh" else {}
    model = NuMLP(13, 3, 4, 2, activation=activation, **kwargs)
    x = torch.randn(6, 13)
    results = {}
    for name, limit in (("native", 1 << 30), ("function", 0)):
        monkeypatch.setattr(model_module, "NATIVE_MAX_INPUT", limit)
        model.zero_grad(set_to_none=True)
        out = model(x)
        graph = []
        node = out.grad_fn
        while node is not None:  # the readout's node and what feeds it
            graph.append(type(node).__name__)
            node = node.next_functions[0][0] if node.next_functions else None
        params = list(model.parameters())
        grads = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), params)
        results[name] = (out.detach(), [g.detach() for g in grads], hvp, graph)
    assert not any("ScaledLinearAct" in n for n in results["native"][3])
    assert any("ScaledLinearAct" in n for n in results["function"][3])
    (o1, g1, h1, _), (o2, g2, h2, _) = results["native"], results["function"]
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1 + list(h1), g2 + list(h2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "identity", "tanh", "abs", "leaky_relu:0.1", "gelu"])
def test_activation_apply_in_place_matches_call_and_its_gradient(name):
    """``apply_`` writes φ(h) into h for ReLU, identity and tanh (nothing else changes), and returns
    a new tensor for the rest; values and gradients through ``h = (x Wᵀ)·α`` equal ``__call__``'s."""
    act = get_activation(name)
    x, w = torch.randn(5, 7), torch.randn(6, 7, requires_grad=True)
    grads = []
    for apply in (act.__call__, act.apply_):
        h = torch.nn.functional.linear(x, w).mul_(0.3)
        y = apply(h)
        in_place = name == "identity" or (apply == act.apply_ and name in ("relu", "tanh"))
        assert (y.data_ptr() == h.data_ptr()) == in_place
        (g,) = torch.autograd.grad((y * torch.arange(6.0)).sum(), w)
        grads.append((y.detach(), g))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_alpha_as_a_tensor_scales_as_the_python_float_and_is_made_once(dtype):
    """``alpha_like`` gives the bits of ``h·α`` with a Python float α, forward and backward, in every dtype,
    and is made once per dtype and device."""
    layer = NuMLP(13, 3, 4, 2).to(dtype).layers[1]
    h = torch.randn(6, layer.fan_out, dtype=torch.float64).mul(40).to(dtype)
    alpha = layer.alpha_like(h)
    assert alpha.dtype == (torch.float64 if dtype is torch.float64 else torch.float32) and alpha.dim() == 0
    assert layer.alpha_like(h) is alpha and layer.alpha_like(h.clone()) is alpha
    assert torch.equal(h.clone().mul_(alpha), h.clone().mul_(layer.alpha))
    assert torch.equal(h * alpha, h * layer.alpha)
    assert layer.alpha_like(h.double() if dtype is not torch.float64 else h.float()) is not alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_route_converts_no_scalar_per_layer(dtype):
    """A Python float α was turned into a tensor and copied on every call, forward and backward (one
    ``aten::_to_copy`` each); with α kept as a tensor a deeper model runs no more of them."""
    from torch.profiler import profile

    copies = []
    for depth in (4, 8):
        model = NuMLP(13, 3, depth, 2).to(dtype)
        x = torch.randn(5, 13, dtype=dtype)
        model(x).square().sum().backward()  # warm-up: every layer makes its α tensor
        with profile() as prof:
            model(x).square().sum().backward()
        copies.append(sum(e.name == "aten::_to_copy" for e in prof.events()))
    assert copies[1] == copies[0], copies


def test_forward_is_differentiable():
    model = NuMLP(5, 2, 4, 2, activation="tanh", bias=True, sigma_b2=0.3)
    model(torch.randn(6, 5)).pow(2).sum().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- coordinate check at init


def _layer_rms(model: NuMLP, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([h.pow(2).mean().sqrt() for h in model.preactivations(x)[:-1]])


def test_preactivation_rms_stays_order_one_at_depth_64():
    model = NuMLP(16, 1, 64, 16, max_width=768)  # widths 16k², capped from k = 7 on (fast)
    assert model.capped and max(model.widths) == 768 and model.widths[6] == 576
    x = torch.randn(16, 16)
    x *= (1 / SQRT2) / x.pow(2).mean().sqrt()  # so that h_1 has RMS ≈ 1
    rms = _layer_rms(model, x)
    assert rms.shape == (63,)
    assert rms.min() > 0.3 and rms.max() < 3, rms

    # The same check catches a model off the EOC: weights × 1.5 blow up by 1.5 per layer.
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(1.5)
    blown = _layer_rms(model, x)
    assert blown.max() > 3
    assert blown[-1] / rms[-1] == pytest.approx(1.5**63, rel=1e-3)


# ----------------------------------------------------------------------------- errors and limits


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 1}, "depth"),
        ({"depth": 0}, "depth"),
        ({"m": 0}, "m must"),
        ({"m": 2.5}, "m must"),
        ({"parameterization": "mup"}, "unknown parameterization"),
        ({"width_schedule": "cubic"}, "unknown width schedule"),
        ({"activation": "sigmoidish"}, "unknown activation"),
        ({"readout": "sp"}, "unknown readout"),
        ({"bias": True}, "sigma_b2"),
        ({"bias": True, "sigma_b2": 0.0, "activation": "tanh"}, "sigma_b2"),
        ({"max_width": 0}, "max_width"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"in_features": 4, "out_features": 2, "depth": 4, "m": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        NuMLP(**args)


def test_width_over_default_limit_needs_max_width():
    assert DEFAULT_WIDTH_LIMIT == 65_536
    with pytest.raises(ValueError, match="max_width"):
        NuMLP(2, 1, 3, 20_000)  # n_2 = 80,000
    with pytest.raises(ValueError, match="max_width"):
        NuMLP(1, 1, 2, DEFAULT_WIDTH_LIMIT + 1, parameterization="sp")
    assert NuMLP(1, 1, 2, DEFAULT_WIDTH_LIMIT, parameterization="sp").widths == [1, 65_536, 1]  # at the limit: fine

    capped = NuMLP(2, 1, 3, 20_000, max_width=24)
    assert capped.capped is True
    assert capped.widths == [2, 24, 24, 1]
    assert capped.layers[1].weight.shape == (24, 24)
    assert "capped=True" in repr(capped)
    # A cap above every width leaves the model uncapped.
    loose = NuMLP(2, 1, 4, 2, max_width=1000)
    assert loose.capped is False and loose.widths == [2, 2, 8, 18, 1]


def test_wrong_input_size_raises_clear_error():
    model = NuMLP(8, 2, 3, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        model(torch.randn(4, 9))
    with pytest.raises(ValueError, match="expects inputs"):
        model(torch.randn(9))
