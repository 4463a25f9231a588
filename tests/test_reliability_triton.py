"""Issue #13 on the CUDA code path (Triton kernels, run on CPU through the interpreter): extreme but finite
gradients take the same normalized step as the unscaled gradient, on the drop-in multi-tensor path and on
both fused update paths; non-finite ones still skip, bit-identically; float64 parameters step in float64.
The kernels are checked against exact float64 arithmetic and against the oracle (``reference.py``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup_kernels import multi_tensor, reference
from nup_kernels.apply_update import apply_bias_update, apply_normalized_update, max_programs
from nup_kernels.gram_norm import grad_norm_sq_gram, grad_norm_sq_partials
from nup_kernels.linear_act import linear_act_backward_dw, linear_act_forward

#: loss scales: G stays finite in fp32 for each (at 1e30 the δ entries are near 1e29)
SCALES = [1e19, 1e30, 1e-23, 1e-30]
#: models: weights only (ReLU), and normalized biases (tanh at σ_b² = 0.3), which exercise the bias kernel
MODELS = {"relu": {}, "tanh-bias": {"activation": "tanh", "bias": True, "sigma_b2": 0.3}}
# fp32 tolerances for parameters after normalized steps of size η·s ≈ 0.1–1: the scaled gradient
# is the unscaled one rounded entry by entry, so the steps agree to a few fp32 ulps
RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    monkeypatch.delenv("NUP_UPDATE_PATH", raising=False)


def _data(batch=64):  # a summed loss over 64 rows: some ‖G‖ > 1.84, so ‖1e19·G‖² overflows fp32
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 8, generator=g), torch.randint(0, 3, (batch,), generator=g)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _train(model, opt, scale, steps=2, x=None):
    xb, yb = _data()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(xb if x is None else x), yb, reduction="sum") * scale).backward()
        opt.step()


def _pair(fused: bool, model_kw: dict):
    torch.manual_seed(0)
    model = NuMLP(8, 3, 3, 2, **model_kw)
    twin = copy.deepcopy(model)
    return [(m, NuP(m.named_parameters(), lr=0.1, fused=fused)) for m in (model, twin)]


def _assert_same_steps(unscaled, scaled):
    (m1, o1), (m2, o2) = unscaled, scaled
    assert o2.stat_vectors()["skipped"].tolist() == [0] * len(list(m2.parameters()))
    for (name, p), q in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL, msg=name)
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in ("update_norm", "cos", "c_norm"):
        torch.testing.assert_close(v2[key], v1[key], rtol=1e-4, atol=1e-5, msg=key)


# ---- the optimizer: the drop-in multi-tensor path and both fused update paths -------------------------
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("model", MODELS)
def test_drop_in_multi_tensor_path_takes_the_unscaled_step(scale, model):
    unscaled, scaled = _pair(False, MODELS[model])
    _train(*unscaled, 1.0)
    _train(*scaled, scale)
    _assert_same_steps(unscaled, scaled)


@pytest.mark.parametrize("path", ["small_batch", "materialized"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("model", MODELS)
def test_fused_path_takes_the_unscaled_step(scale, model, path, monkeypatch):
    monkeypatch.setenv("NUP_UPDATE_PATH", path)
    unscaled, scaled = _pair(True, MODELS[model])
    _train(*unscaled, 1.0)
    _train(*scaled, scale)
    _assert_same_steps(unscaled, scaled)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf·0 in the interpreter
@pytest.mark.parametrize("path", ["small_batch", "materialized", "drop-in"])
@pytest.mark.parametrize("bad", ["nan-input", "inf-loss"])
def test_non_finite_gradients_still_skip_bit_identically(path, bad, monkeypatch):
    if path != "drop-in":
        monkeypatch.setenv("NUP_UPDATE_PATH", path)
    (model, opt), _ = _pair(path != "drop-in", MODELS["tanh-bias"])
    _train(model, opt, 1.0, steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    x, _ = _data()
    if bad == "nan-input":
        x[0, 0] = float("nan")
    _train(model, opt, math.inf if bad == "inf-loss" else 1.0, steps=1, x=x)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(_bits(p), _bits(b))
    v = opt.stat_vectors()
    assert v["skipped"].tolist() == [1] * len(before)
    assert all(torch.isfinite(v[k]).all() for k in ("cos", "c_norm", "update_norm"))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_drop_in_skips_only_the_non_finite_tensor():
    torch.manual_seed(0)
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.1)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for p, value in zip(params, (float("nan"), float("inf"), 1e30), strict=True):
        p.grad = torch.randn_like(p)
        p.grad.view(-1)[0] = value
    opt.step()
    assert opt.stat_vectors()["skipped"].tolist() == [1, 1, 0]
    assert torch.equal(_bits(params[0]), _bits(before[0])) and torch.equal(_bits(params[1]), _bits(before[1]))
    assert (params[2] != before[2]).any()


# ---- float64 parameters on the Triton code path ----------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_float64_steps_in_float64_and_a_nan_step_keeps_every_bit(fused):
    torch.manual_seed(0)
    model = NuMLP(8, 3, 3, 2).double()
    twin = copy.deepcopy(model)  # plain autograd: the float64 gradient
    opt = NuP(model.named_parameters(), lr=0.1, fused=fused)
    x, y = _data()
    x = x.double()
    F.cross_entropy(twin(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.stat_vectors()["skipped"].tolist() == [0, 0, 0]
    for p, b, t in zip(model.parameters(), before, twin.parameters(), strict=True):
        assert p.dtype == torch.float64
        step = (p - b).detach()
        u = 0.1 * p._nup_meta.scale
        # the direction is the float64 gradient's, to float64 accuracy (a G formed in fp32 is off by ~1e-8);
        # its length is η·s, where η and s_P are fp32 numbers
        torch.testing.assert_close(step / step.norm(), -t.grad / t.grad.norm(), rtol=0, atol=1e-13)
        assert step.norm().item() == pytest.approx(u, rel=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    x[0, 0] = float("nan")
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.stat_vectors()["skipped"].tolist() == [1, 1, 1]
    assert all(torch.equal(_bits(p), _bits(b)) for p, b in zip(model.parameters(), before, strict=True))


# ---- the kernels against exact float64 arithmetic and the oracle ------------------------------------------
@pytest.mark.parametrize("scale", [1e19, 1e30, 3e38, 1e-23, 1e-30, 1e-44])
def test_multi_tensor_reduce_of_extreme_directions(scale):
    d = [torch.randn(33, 17), torch.randn(4 * multi_tensor.CHUNK + 5)]  # one chunk and several
    d = [(t * scale).clamp(-3.4e38, 3.4e38) for t in d]  # finite fp32 entries, some subnormal at 1e-44
    c = [torch.randn_like(t) for t in d]
    d64, c64 = [t.double() for t in d], [t.double() for t in c]
    exact = (torch.stack([t.square().sum() for t in d64]), torch.stack([(a * b).sum() for a, b in zip(d64, c64)]),
             torch.stack([t.square().sum() for t in c64]))  # ‖D‖², ⟨D, C⟩, ‖C‖²  # fmt: skip
    size = torch.stack([a.norm() * b.norm() for a, b in zip(d64, c64)])  # ⟨D, C⟩ may cancel: an absolute bound
    out = multi_tensor.multi_tensor_reduce(d, c)
    oracle = reference.multi_tensor_reduce(d, c)
    for o, r, e in zip(out, oracle, exact, strict=True):
        assert o.dtype == r.dtype == torch.float64
        for got in (o, r):
            assert ((got - e).abs() <= 1e-12 * (e.abs() + size)).all(), (got, e)
    assert (out[0] > 0).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("coef", [-1e-42, -3e-45, -1e40, -1e45, -0.3])
def test_multi_tensor_apply_of_a_coefficient_beyond_fp32(coef):
    """``coef·D`` for an fp64 coefficient outside fp32's range, D scaled so the step is O(1)."""
    d_scale = 1.0 / abs(coef)  # ≤ 3.4e38 where coef ≥ 3e-39; beyond that the D entries are capped
    d = [(torch.randn(17, 5) * d_scale).clamp(-3.4e38, 3.4e38), (torch.randn(70) * d_scale).clamp(-3.4e38, 3.4e38)]
    p = [torch.randn_like(t) for t in d]
    c = [torch.randn_like(t) for t in d]
    coefs = torch.tensor([coef, 0.0], dtype=torch.float64)
    want_p = (p[0].double() + coef * d[0].double()).float()
    want_c = (c[0].double() + coef * d[0].double()).float()
    runs = []
    for apply in (multi_tensor.multi_tensor_apply, reference.multi_tensor_apply):
        pp, cc = [t.clone() for t in p], [t.clone() for t in c]
        apply(pp, d, cc, coefs)
        runs.append((pp, cc))
        assert torch.equal(_bits(pp[1]), _bits(p[1])) and torch.equal(_bits(cc[1]), _bits(c[1]))  # coef 0
        torch.testing.assert_close(pp[0], want_p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cc[0], want_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-23, 1e-30])
def test_gram_norm_and_dw_partials_of_extreme_gradients(scale):
    x, delta = torch.randn(20, 70), torch.randn(20, 33) * scale  # G = α·δᵀx: entries up to ~1e31, or ~1e-30
    g = 0.5 * (delta.double().t() @ x.double())
    exact = g.square().sum()
    # the kernel: fp32 tiles of exactly scaled operands (fp32 accuracy), fp64 partials; the oracle: float64
    for out, rtol in ((grad_norm_sq_partials(x, delta, 0.5).sum(), 1e-5), (grad_norm_sq_gram(x, delta, 0.5), 1e-5),
                      (reference.grad_norm_sq_gram(x, delta, 0.5), 1e-10)):  # fmt: skip
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, exact, rtol=rtol, atol=0)
    # the materialized dW kernel: δ given, its ‖G‖² from fp64 partials of the fp32 G
    y, saved = linear_act_forward(x, torch.randn(33, 70), None, 0.5, 1.0, "identity")
    gk, g_sq = linear_act_backward_dw(delta, saved, x, 0.5, "identity", delta=delta)
    assert g_sq.dtype == torch.float64 and torch.isfinite(gk).all()
    torch.testing.assert_close(g_sq, exact, rtol=1e-5, atol=0)  # the fp32 G rounds each entry
    _, ref_sq = reference.linear_act_backward_dw(delta, x, 0.5)
    torch.testing.assert_close(ref_sq, exact, rtol=1e-5, atol=0)


def test_gram_norm_rescales_across_feature_blocks_and_row_tiles():
    """The Gram tiles' running power-of-two scale: feature blocks 1e40 apart (more than one 2^126 shift), and
    row tiles (batch 96: two 64-row tiles) 1e48 apart, over several feature chunks; G stays finite in fp32."""
    x, delta = torch.randn(96, 900), torch.randn(96, 130)
    x[:, :64] *= 1e-30  # the first K block of the first chunk is tiny, later ones are large
    x[:, 600:] *= 1e10
    delta[:64] *= 1e20
    delta[64:] *= 1e-28
    exact = (0.5 * (delta.double().t() @ x.double())).square().sum()
    torch.testing.assert_close(grad_norm_sq_partials(x, delta, 0.5).sum(), exact, rtol=1e-5, atol=0)
    # and a tile whose only non-zero block comes last, after all-zero ones
    x0 = torch.zeros(20, 300)
    x0[:, 250:] = torch.randn(20, 50) * 1e20
    d0 = torch.randn(20, 130)
    exact0 = (d0.double().t() @ x0.double()).square().sum()
    torch.testing.assert_close(grad_norm_sq_gram(x0, d0, 1.0), exact0, rtol=1e-5, atol=0)


def _apply(backend, monkeypatch, w, c, g_sq, rates, **kw):
    monkeypatch.setenv("NUP_BACKEND", backend)
    w, c = w.clone(), c.clone()
    d_norm, dots = torch.full((1,), -1.0), torch.zeros(max_programs(*w.shape))
    apply_normalized_update(w, c, g_sq, 0, rates=rates, d_norm_out=d_norm, dot_out=dots, **kw)
    return w, c, d_norm, dots.sum()


@pytest.mark.parametrize("path", ["grad", "small_batch"])
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-23, 1e-30])
def test_apply_normalized_update_of_extreme_gradients(monkeypatch, path, scale):
    w, c = torch.randn(33, 70), torch.randn(33, 70)
    x, delta = torch.randn(5, 70), torch.randn(5, 33) * scale
    g = 0.7 * (delta.t() @ x)
    g64 = 0.7 * (delta.double().t() @ x.double())
    g_sq = torch.stack([g64.square().sum() * 0.25, g64.square().sum() * 0.75])  # fp64 partials
    kw = {"grad": g} if path == "grad" else {"x": x, "delta": delta, "alpha": 0.7}
    rates = torch.tensor([[0.3, 0.0]])
    want = w.double() - 0.3 * g64 / g64.norm()
    for backend in ("triton", "reference"):
        wo, co, d_norm, dot = _apply(backend, monkeypatch, w, c, g_sq, rates, **kw)
        torch.testing.assert_close(wo.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(co - c, wo - w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_norm[0].double(), g64.norm().clamp_max(3.4028234663852886e38), rtol=1e-6, atol=0)
        torch.testing.assert_close(dot.double(), ((wo - w).double() * c.double()).sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", [3e38, 1.4e-45])
def test_apply_of_a_norm_beyond_fp32_is_recorded_as_a_taken_step(monkeypatch, entry):
    """Every entry of G at fp32's max (‖G‖ ≈ 7e39 > fp32's max) or at its least subnormal (‖G‖ ≈ 3e-44, coef ≈
    1e43): the step is taken, and ‖G‖ is recorded finite and positive, so the optimizer counts it as taken."""
    w, c = torch.randn(17, 33), torch.randn(17, 33)
    g = torch.randn(17, 33).sign() * entry
    g64 = g.double()
    rates = torch.tensor([[0.3, 0.0]])
    for backend in ("triton", "reference"):
        wo, co, d_norm, _ = _apply(backend, monkeypatch, w, c, g64.square().sum().reshape(1), rates, grad=g)
        assert 0 < d_norm.item() < math.inf
        torch.testing.assert_close((wo - w).double(), -0.3 * g64 / g64.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-23, 1e-30])
def test_bias_update_of_extreme_gradients(monkeypatch, scale):
    b, c, delta = torch.randn(70), torch.randn(70), torch.randn(9, 70) * scale
    rates = torch.tensor([[0.2, 0.0]])
    db = 0.5 * delta.double().sum(0)
    for backend in ("triton", "reference"):
        monkeypatch.setenv("NUP_BACKEND", backend)
        bb, cc, d_norm, dot = b.clone(), c.clone(), torch.zeros(1), torch.zeros(1)
        apply_bias_update(bb, cc, delta, 0.5, 0, rates=rates, d_norm_out=d_norm, dot_out=dot)
        torch.testing.assert_close(bb.double(), b.double() - 0.2 * db / db.norm(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_norm[0].double(), db.norm(), rtol=1e-5, atol=0)
