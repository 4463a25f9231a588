"""Diagnostics: sharpness and HVPs against explicit Hessians, the NTK's λ_0 against J Jᵀ and the GD
stability threshold, and the coordinate check (structure, flatness at the EOC, a planted failure)."""

import math

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, jacrev

from nup import NuMLP, NuP
from nup.diagnostics import (
    coord_check,
    coord_check_summary,
    hessian_vector_product,
    mse_loss,
    ntk_top_eigenvalue,
    plot_coord_check,
    sharpness,
)


class Quadratic(nn.Module):
    """A 'model' whose only parameter is x; its loss is ½ xᵀAx."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(torch.randn(a.shape[0], dtype=a.dtype))


def quad_loss(model, _batch):
    return 0.5 * model.x @ model.a @ model.x


def spd(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


class TinyMLP(nn.Module):
    """ReLU MLP with nn.Linear layers; hidden weights N(0, gain²·2/n_in) (gain = 1 is the EOC)."""

    def __init__(self, widths: list[int], gain: float = 1.0, act=torch.relu):
        super().__init__()
        self.act = act
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        for i, layer in enumerate(self.layers):
            std = (gain * math.sqrt(2.0) if i < len(self.layers) - 1 else 1.0) / math.sqrt(layer.in_features)
            nn.init.normal_(layer.weight, std=std)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


def explicit_hessian(model, loss_fn, batch) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v):
        parts = torch.split(v, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return loss_fn(lambda x: functional_call(model, params, (x,)), batch)

    return torch.autograd.functional.hessian(f, flat)


def snapshot(model):
    return [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, (p0, g0) in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), p0)
        assert (p.grad is None and g0 is None) or torch.equal(p.grad, g0)


# ------------------------------------------------------------------------------------------ sharpness


def test_sharpness_of_quadratic_is_top_eigenvalue():
    eigs = torch.cat([torch.linspace(0.1, 3.0, 39), torch.tensor([7.5])]).double()
    model = Quadratic(spd(eigs))
    lam = sharpness(model, quad_loss, None)
    assert lam == pytest.approx(7.5, rel=1e-6)


def test_sharpness_is_largest_algebraic_not_largest_magnitude():
    eigs = torch.tensor([-20.0, -3.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    assert sharpness(Quadratic(spd(eigs, seed=3)), quad_loss, None) == pytest.approx(4.0, rel=1e-6)


def test_hvp_matches_explicit_hessian():
    torch.manual_seed(1)
    model = TinyMLP([3, 6, 5, 2], act=torch.tanh).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    h = explicit_hessian(model, lambda f, b: 0.5 * (f(b[0]) - b[1]).pow(2).sum() / 10, (x, y))
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = torch.cat([t.reshape(-1) for t in hessian_vector_product(model, mse_loss, (x, y), v)])
    torch.testing.assert_close(hv, h @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-10, atol=1e-10)


def test_sharpness_of_mlp_matches_explicit_hessian_and_leaves_model_alone():
    torch.manual_seed(2)
    model = TinyMLP([4, 8, 8, 1], act=torch.tanh).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    mse_loss(model, (x, y)).backward()  # a .grad the diagnostic must not touch
    model.layers[0].weight.grad = None  # ... and a missing one it must not create
    snap = snapshot(model)
    h = explicit_hessian(model, lambda f, b: 0.5 * (f(b[0]) - b[1]).pow(2).sum() / 16, (x, y))
    top = float(torch.linalg.eigvalsh(h)[-1])
    lam = sharpness(model, mse_loss, (x, y))
    assert lam == pytest.approx(top, rel=1e-3)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ NTK


def explicit_ntk(model, x) -> torch.Tensor:
    """J Jᵀ with J from torch.func.jacrev over the whole batch: (n·k) × (n·k)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    j = torch.cat([t.reshape(t.shape[0] * t.shape[1], -1) for t in jac.values()], dim=1)
    return j @ j.T


@pytest.mark.parametrize("method", ["full", "matfree"])
def test_ntk_top_eigenvalue_matches_explicit(method):
    torch.manual_seed(3)
    model = TinyMLP([5, 12, 12, 3]).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    want = float(torch.linalg.eigvalsh(explicit_ntk(model, x))[-1]) / 20
    snap = snapshot(model)
    assert ntk_top_eigenvalue(model, x, method=method) == pytest.approx(want, rel=1e-4)
    assert_unchanged(model, snap)


def test_ntk_auto_switches_to_matrix_free():
    torch.manual_seed(4)
    model = TinyMLP([5, 10, 1]).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    full = ntk_top_eigenvalue(model, x)
    free = ntk_top_eigenvalue(model, x, max_jacobian_entries=1)
    assert free == pytest.approx(full, rel=1e-6)


def test_ntk_equals_mse_sharpness_for_multi_output_linear_model():
    """f(x) = Wx: ∇²L = JᵀJ/n exactly, so λ_0 is the MSE sharpness; a kernel summed over the k
    outputs would give k·λ_0."""
    torch.manual_seed(5)
    model = nn.Linear(6, 3, bias=False).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    lam0 = ntk_top_eigenvalue(model, x)
    assert lam0 == pytest.approx(sharpness(model, mse_loss, (x, y)), rel=1e-6)
    assert lam0 == pytest.approx(float(torch.linalg.eigvalsh(x.T @ x / 30)[-1]), rel=1e-10)


@pytest.mark.parametrize("factor, grows", [(0.95, False), (1.05, True)])
def test_gd_stability_threshold_is_two_over_lambda0(factor, grows):
    """Plain GD on (1/2n)Σ(w·x − y)²: the loss falls for η < 2/λ_0 and blows up for η > 2/λ_0."""
    torch.manual_seed(6)
    x = torch.randn(40, 8, dtype=torch.float64) * torch.linspace(0.3, 2.0, 8, dtype=torch.float64)
    y = x @ torch.randn(8, dtype=torch.float64)
    model = nn.Linear(8, 1, bias=False).double()
    lr = factor * 2.0 / ntk_top_eigenvalue(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(60):
        loss = mse_loss(model, (x, y))
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    if grows:
        assert losses[-1] > 10 * losses[0]
    else:
        assert losses[-1] < losses[0] and all(b <= a for a, b in zip(losses, losses[1:], strict=False))


class OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * (1 - y * y)


def test_once_differentiable_backward_is_refused_for_hessians_and_differenced_for_ntk():
    torch.manual_seed(9)
    plain = TinyMLP([4, 10, 10, 2], act=torch.tanh)
    once = TinyMLP([4, 10, 10, 2], act=OnceTanh.apply)
    once.load_state_dict(plain.state_dict())
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        sharpness(once, mse_loss, (x, y))
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        hessian_vector_product(once, mse_loss, (x, y), [torch.ones_like(p) for p in once.parameters()])
    with pytest.raises(RuntimeError, match="twice-differentiable"):
        ntk_top_eigenvalue(once, x, method="matfree", jvp="autograd")
    exact = ntk_top_eigenvalue(plain, x, method="matfree", jvp="autograd")
    with pytest.warns(UserWarning, match="central differences"):
        assert ntk_top_eigenvalue(once, x, method="matfree") == pytest.approx(exact, rel=1e-4)
    assert ntk_top_eigenvalue(plain, x, method="matfree", jvp="fd") == pytest.approx(exact, rel=1e-4)


# ------------------------------------------------------------------------------------- coord check


def tiny_factory(gain: float, width: int = 64):
    return lambda depth, seed: TinyMLP([10] + [width] * (depth - 1) + [1], gain=gain)


def sgd(lr):
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 10, generator=g), torch.randn(32, 1, generator=g)


def test_coord_check_records_structure(batch):
    x, y = batch
    recs = coord_check(tiny_factory(1.0), sgd(0.05), x, y, mse_loss, depths=[2, 3], steps=2, seeds=(0, 1))
    assert len(recs) == (2 + 3) * 2 * 3  # layers x seeds x (steps + 1)
    keys = {"axis", "size", "depth", "seed", "t", "layer", "rel_layer", "output", "h_rms", "dh_rms"}
    assert all(set(r) == keys for r in recs)
    r3 = [r for r in recs if r["size"] == 3 and r["seed"] == 1 and r["t"] == 2]
    assert [r["layer"] for r in r3] == [1, 2, 3]
    assert [r["rel_layer"] for r in r3] == pytest.approx([1 / 3, 2 / 3, 1])
    assert [r["output"] for r in r3] == [False, False, True]
    assert all(r["dh_rms"] == 0 for r in recs if r["t"] == 0)
    assert all(r["dh_rms"] > 0 for r in recs if r["t"] > 0)
    # the measured h_rms is the RMS of that layer's real pre-activation
    torch.manual_seed(0)
    model = tiny_factory(1.0)(3, 0)
    h1 = model.layers[0](x)
    first = next(r for r in recs if r["size"] == 3 and r["seed"] == 0 and r["t"] == 0 and r["layer"] == 1)
    assert first["h_rms"] == pytest.approx(float(h1.detach().pow(2).mean().sqrt()), rel=1e-6)


def test_coord_check_detects_a_planted_wrong_parameterization(batch, tmp_path):
    x, y = batch
    depths = [2, 4, 8, 16]
    good = coord_check(tiny_factory(1.0), sgd(0.01), x, y, mse_loss, depths, steps=2, seeds=(0, 1))
    bad = coord_check(tiny_factory(2.0), sgd(0.0), x, y, mse_loss, depths, steps=0)
    s_good, s_bad = coord_check_summary(good), coord_check_summary(bad)
    assert s_good["sizes"] == depths and set(s_good["slopes"]) == {0, 1, 2}
    assert abs(s_good["slopes"][0]["h_last"]) < 0.3
    assert s_bad["slopes"][0]["h_last"] > 3.0  # RMS doubles per layer
    assert math.isnan(s_good["slopes"][0]["dh_last"]) and math.isfinite(s_good["slopes"][2]["dh_last"])
    plot_coord_check(good, tmp_path / "cc.png")
    assert (tmp_path / "cc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coord_check_across_width(batch):
    x, y = batch
    make = lambda width, seed: TinyMLP([10, width, width, 1])
    recs = coord_check(make, sgd(0.05), x, y, mse_loss, [32, 128, 512], steps=1, axis="width")
    summary = coord_check_summary(recs)
    assert summary["axis"] == "width" and summary["sizes"] == [32, 128, 512]
    assert abs(summary["slopes"][0]["h_mean"]) < 0.15  # standard init keeps h O(1) in width
    with pytest.raises(ValueError, match="axis"):
        coord_check(make, sgd(0.05), x, y, mse_loss, [32], axis="length")


# ------------------------------------------------------------------------------------------ NuMLP


class PlainTwin(nn.Module):
    """NuMLP's forward in plain torch ops on copies of its weights: an oracle for torch.func."""

    def __init__(self, model: NuMLP):
        super().__init__()
        self.specs = [(layer.alpha, layer.activation) for layer in model.layers]
        self.weights = nn.ParameterList(nn.Parameter(layer.weight.detach().clone()) for layer in model.layers)

    def forward(self, x):
        for (alpha, act), w in zip(self.specs, self.weights, strict=True):
            x = act(alpha * x @ w.T)
        return x


@pytest.mark.filterwarnings("ignore:ntk_top_eigenvalue")
def test_ntk_of_numlp_matches_a_plain_torch_twin():
    """NuMLP's layers are custom autograd Functions: the full Jacobian (first order) is exact; the
    matrix-free path may fall back to central differences across ReLU kinks (FD_STEP: ~1e-2)."""
    torch.manual_seed(7)
    model = NuMLP(5, 2, 4, 3)
    twin = PlainTwin(model).double()
    x = torch.randn(16, 5)
    torch.testing.assert_close(model(x).double(), twin(x.double()), rtol=1e-5, atol=1e-6)
    want = float(torch.linalg.eigvalsh(explicit_ntk(twin, x.double()))[-1]) / 16
    assert ntk_top_eigenvalue(model, x, method="full") == pytest.approx(want, rel=1e-5)
    assert ntk_top_eigenvalue(model, x, method="matfree") == pytest.approx(want, rel=2e-2)


def test_sharpness_of_numlp_is_right_or_refused():
    """Never a silent wrong value: the exact top eigenvalue, or a RuntimeError saying why not."""
    torch.manual_seed(8)
    model = NuMLP(5, 2, 3, 3, activation="tanh")
    twin = PlainTwin(model).double()
    x, y = torch.randn(12, 5), torch.randn(12, 2)
    h = explicit_hessian(twin, lambda f, b: 0.5 * (f(b[0]) - b[1]).pow(2).sum() / 12, (x.double(), y.double()))
    try:
        lam = sharpness(model, mse_loss, (x, y))
    except RuntimeError as err:
        assert "not twice differentiable" in str(err)
        pytest.xfail("NuMLP's layers are @once_differentiable: sharpness refuses them")
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-3)


def numlp_factory(scale_hidden: float = 1.0):
    def make(depth, seed):
        model = NuMLP(16, 1, depth, 4)
        with torch.no_grad():
            for layer in model.layers[1:-1]:
                layer.weight.mul_(scale_hidden)
        return model

    return make


def test_coord_check_on_numlp_is_flat_at_init_and_catches_a_planted_scale():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 16, generator=g), torch.randn(48, 1, generator=g)
    depths = [2, 4, 8, 16]
    make_opt = lambda model: NuP(model.named_parameters(), lr=0.1)
    recs = coord_check(numlp_factory(), make_opt, x, y, mse_loss, depths, steps=2)
    assert len(recs) == sum(depths) * 3
    assert {r["depth"] for r in recs if r["size"] == 8} == {8}  # model.preactivations: L entries
    h0 = [r["h_rms"] for r in recs if r["t"] == 0 and not r["output"]]
    assert max(h0) / min(h0) < 3.0
    summary = coord_check_summary(recs)
    assert abs(summary["slopes"][0]["h_last"]) < 0.3 and abs(summary["slopes"][2]["h_last"]) < 0.3
    assert all(r["dh_rms"] > 0 and math.isfinite(r["dh_rms"]) for r in recs if r["t"] > 0)
    planted = coord_check(numlp_factory(2.0), make_opt, x, y, mse_loss, depths, steps=0)
    assert coord_check_summary(planted)["slopes"][0]["h_last"] > 3.0
