"""The fast CPU path (nup_kernels.cpu): the one-loop updates against the oracle, with and without the
compiled loop, the α-folded layer's gradients (first and second order), and the host coefficient."""

import copy
import math

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP
from nup import step_core as core
from nup_kernels import cpu, reference
from nup_kernels.activations import NAMED

SHAPES = [(1, 1), (1, 17), (17, 33), (33, 16)]


@pytest.fixture(params=["1", "0"], ids=["loop", "eager"])
def loop(request, monkeypatch):
    monkeypatch.setenv("NUP_CPU_LOOP", request.param)
    if request.param == "1":
        assert cpu.loop_available(), "the C loop did not build (no C compiler?)"
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_update_and_dot_matches_the_oracle(loop, shape, init):
    w, c, g = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    w_ref, c_ref = w.clone(), c.clone()
    coef = -0.37
    dot = cpu.update_and_dot(w, c, g, coef, init)
    ref = reference.apply_update(w_ref, c_ref, torch.tensor(coef), grad=g, cumulative_is_init=init)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(coef * dot), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_update_and_dot_many_equals_one_call_per_tensor(loop, init):
    """The batched call: fp32 tensors through one C call, the others (float64, non-contiguous) through
    torch one by one, a zero coefficient leaving its tensor untouched; the same bits as one call each."""
    shapes = [(17, 33), (5,), (33, 16), (1, 1), (8, 6)]
    ws = [torch.randn(s) for s in shapes]
    ws[1] = ws[1].double()
    ws[4] = torch.randn(6, 8).t()  # non-contiguous
    cs, gs = [torch.randn_like(w) for w in ws], [torch.randn_like(w) for w in ws]
    coefs = [-0.37, 0.25, 0.0, 1e-3, -0.5]
    w_ref, c_ref = [w.clone() for w in ws], [c.clone() for c in cs]
    dots = cpu.update_and_dot_many(ws, cs, gs, coefs, init)
    for i, cf in enumerate(coefs):
        ref = cpu.update_and_dot(w_ref[i], c_ref[i], gs[i], cf, init) if cf != 0.0 else 0.0
        assert dots[i] == ref
        assert torch.equal(ws[i], w_ref[i]) and torch.equal(cs[i], c_ref[i])
    assert torch.equal(ws[2], w_ref[2]) and dots[2] == 0.0


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1031])
def test_sum_squares_matches_a_float64_sum(n):
    """The lane loop behind the fused path's read of G: every tail length, against a float64 sum."""
    t = torch.randn(n)
    assert cpu.loop_ready(t)
    assert cpu.sum_squares(t) == pytest.approx(float(t.double().square().sum()), rel=1e-6, abs=1e-30)
    assert cpu.sum_squares(torch.full((100,), 2.0)) == 400.0
    for n_big in (3, 100):  # beyond fp32's range: exact from the double tail or inf from the lanes, never in range
        assert cpu.sum_squares(torch.full((n_big,), 3e38)) > 1e38  # the caller redoes it (fused._NORM_SQ_EXACT)


@pytest.mark.parametrize("shape", SHAPES)
def test_dist_sq_and_rebase_update(loop, shape):
    old, p, c = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    assert cpu.dist_sq(old, p) == pytest.approx(float((old - p).square().sum()), rel=1e-5, abs=1e-6)
    d = old - p
    p_ref, c_ref = old + 0.25 * d, c + 0.25 * d
    dot = cpu.rebase_update(p, old, c, 0.25)
    torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-6)
    assert dot == pytest.approx(float((d * (c_ref - 0.25 * d)).sum()), rel=1e-4, abs=1e-5)


def test_non_contiguous_and_16_bit_tensors_take_the_eager_loop():
    w = torch.randn(8, 6).t()  # non-contiguous
    c, g = torch.randn(6, 8), torch.randn(6, 8)
    assert not cpu.loop_ready(w, c, g) and not cpu.loop_ready(c.bfloat16())
    w_ref, c_ref = w.clone(), c.clone()
    cpu.update_and_dot(w, c, g, -0.5)
    torch.testing.assert_close(w, w_ref - 0.5 * g)
    torch.testing.assert_close(c, c_ref - 0.5 * g)


@pytest.mark.parametrize("name", ["relu", "tanh", "identity", "leaky_relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_linear_act_first_and_second_derivatives(name, bias):
    act = NAMED[name]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if bias else None
    args = (x, w, b) if bias else (x, w)

    def f(*t):
        return cpu.ScaledLinearAct.apply(t[0], t[1], t[2] if bias else None, 0.7, 0.3, act)

    ref_h = 0.7 * x @ w.t() + (0.3 * b if bias else 0)
    torch.testing.assert_close(f(*args), act(ref_h))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_host_coefficient_equals_the_vector_formula():
    d = torch.tensor([0.0, float("nan"), float("inf"), 1.5, 2e-30, 3.0])
    eta, scales = torch.full((6,), 0.1), torch.linspace(0.5, 2.0, 6)
    for normalize in (True, False):
        mask = torch.full((6,), normalize)
        _, coef, _ = core.coefficients(d, eta, scales, mask)
        host = [core.host_coefficient(float(v), 0.1, float(s), normalize) for v, s in zip(d, scales)]
        torch.testing.assert_close(torch.tensor(host), coef, rtol=1e-6, atol=0.0)
        assert all(h == 0.0 for h, v in zip(host, d.tolist()) if not (math.isfinite(v) and v > 0))


@pytest.mark.parametrize("kw", [{}, {"activation": "tanh", "bias": True, "sigma_b2": 0.3}, {"activation": "gelu"}],
                         ids=["relu", "tanh-bias", "gelu"])  # fmt: skip
@pytest.mark.parametrize("route", ["autograd", "function"])
def test_cpu_fused_step_equals_drop_in(loop, kw, route, monkeypatch):
    """Both CPU routes of the fused step (small inputs: autograd's ops and a pre-hook; larger: the
    in-backward Function), and the drop-in step on either forward, take the same steps."""
    import nup.model

    monkeypatch.delenv("NUP_BACKEND", raising=False)
    monkeypatch.delenv("NUP_UPDATE_PATH", raising=False)
    if route == "function":
        monkeypatch.setattr(nup.model, "NATIVE_MAX_INPUT", 0)
    torch.manual_seed(0)
    model = NuMLP(7, 3, 4, 3, **kw)
    twin = copy.deepcopy(model)
    a = NuP(model.named_parameters(), lr=0.1, recompute_every=3)
    b = NuP(twin.named_parameters(), lr=0.1, recompute_every=3, fused=True)
    g = torch.Generator().manual_seed(5)
    for batch in (1, 17, 40, 17, 1):  # Gram norm at small batch, norm of G at large
        x, y = torch.randn(batch, 7, generator=g), torch.randint(0, 3, (batch,), generator=g)
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    va, vb = a.stat_vectors(), b.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "coherence", "skipped"):
        torch.testing.assert_close(va[key], vb[key], rtol=2e-4, atol=2e-5, msg=key)


def test_fused_autograd_route_sums_the_gradient_of_a_layer_applied_twice(monkeypatch):
    """A layer used twice in one forward (the autograd route captures two (x, δ) pairs): its update is
    along the sum of both gradients, as drop-in's is."""
    monkeypatch.delenv("NUP_BACKEND", raising=False)
    torch.manual_seed(0)
    model = NuMLP(6, 3, 4, 9, width_schedule="constant")
    twin = copy.deepcopy(model)
    a, b = NuP(model.named_parameters(), lr=0.1), NuP(twin.named_parameters(), lr=0.1, fused=True)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def loss_of(m):
        h = m.layers[1](m.layers[1](m.layers[0](x)))  # layers[1] twice, layers[2] never: no gradient
        return nn.functional.cross_entropy(m.layers[3](h), y)

    for m, opt in ((model, a), (twin, b)):
        for _ in range(2):
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(a.stat_vectors()["cos"], b.stat_vectors()["cos"], rtol=2e-4, atol=2e-5)


def test_fused_autograd_route_drops_each_gradient_and_refuses_a_second_backward(monkeypatch):
    monkeypatch.delenv("NUP_BACKEND", raising=False)
    torch.manual_seed(0)
    model = NuMLP(7, 3, 4, 3, activation="tanh", bias=True, sigma_b2=0.3)
    opt = NuP(model.named_parameters(), lr=0.1, fused=True)
    x, y = torch.randn(5, 7), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    names, node = [], loss.grad_fn
    while node is not None:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert not any("LinearActUpdate" in n for n in names)  # the autograd route: no Python Function
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # each consumed by its update, then dropped
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # updated inside backward
    opt.step()
    assert opt.stat_vectors()["update_norm"].gt(0).all()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="call opt.step\\(\\) after every backward"):
        nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_norm_from_the_grams_equals_the_norm_of_the_materialized_grad(dtype):
    from nup.fused import _grad_norm_sq

    x, delta, alpha = torch.randn(5, 7), torch.randn(5, 6), 0.3
    g = delta.t() @ x  # G/α
    by_read = _grad_norm_sq(x, delta, alpha, g, alpha, False, dtype)
    assert _grad_norm_sq(x, delta, alpha, g, alpha, True, dtype) == pytest.approx(by_read, rel=1e-5)
    assert by_read == pytest.approx(float((alpha * g.double()).square().sum()), rel=1e-5)


def test_the_grams_are_chosen_only_where_they_beat_a_read_of_g():
    from nup.fused import grams_beat_a_read

    assert grams_beat_a_read(32, 841, 900)  # G of 3 MB, out of cache: two 32×32 Grams are cheaper
    assert not grams_beat_a_read(32, 441, 484)  # G still in cache: its read is cheaper
    assert not grams_beat_a_read(256, 841, 900)  # large batch: the Grams cost more than the read


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_snapshot_copies_and_reports_a_non_finite_gradient(loop, bad):
    src, grads = [torch.randn(17, 33), torch.randn(5)], [torch.randn(17, 33), torch.full((5,), 3e38)]
    if bad is not None:
        grads[0][16, 32] = bad
    dst = [torch.empty_like(s) for s in src]
    assert cpu.snapshot_if_finite(dst, src, grads) is (bad is None)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert cpu.all_finite(grads) is (bad is None)
