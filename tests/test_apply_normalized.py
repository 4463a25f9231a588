"""apply_normalized_update and apply_bias_update (coefficient formed in-kernel from ‖G‖² partials and the
rate table) through Triton's interpreter against their reference branch."""

import pytest
import torch

from nup_kernels.apply_update import apply_bias_update, apply_normalized_update, max_programs

SHAPES = [(1, 17), (17, 1), (33, 33), (70, 20)]


def _run(backend, monkeypatch, w, c, g_sq, rates, index, init=False, **kw):
    monkeypatch.setenv("NUP_BACKEND", backend)
    w, c = w.clone(), c.clone()
    n = rates.shape[0]
    d_norm = torch.full((n,), -1.0)
    dots = torch.zeros(max_programs(*w.shape))
    apply_normalized_update(w, c, g_sq, index, rates=rates, d_norm_out=d_norm, dot_out=dots,
                            cumulative_is_init=init, **kw)  # fmt: skip
    return w, c, d_norm, dots.sum()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["grad", "small_batch"])
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(monkeypatch, shape, path, init, normalize):
    n_out, n_in = shape
    w, c = torch.randn(shape), torch.randn(shape)
    x, delta = torch.randn(5, n_in), torch.randn(5, n_out)
    kw = {"grad": 0.7 * delta.t() @ x} if path == "grad" else {"x": x, "delta": delta, "alpha": 0.7}
    g = 0.7 * delta.t() @ x
    g_sq = torch.stack([g.square().sum() * 0.25, g.square().sum() * 0.75, torch.tensor(0.0)])  # any length
    rates = torch.tensor([[0.0, 0.0], [0.3, 0.0] if normalize else [0.0, 0.05]])
    out = _run("triton", monkeypatch, w, c, g_sq, rates, 1, init, **kw)
    ref = _run("reference", monkeypatch, w, c, g_sq, rates, 1, init, **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert out[2][0] == -1.0  # only this tensor's entry written
    expected = 0.3 * g / g.norm() if normalize else 0.05 * g
    torch.testing.assert_close(w - out[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_norm_keeps_bits(monkeypatch, bad):
    w, c = torch.randn(17, 33), torch.randn(17, 33)
    rates = torch.tensor([[0.3, 0.0]])
    for backend in ("triton", "reference"):
        out = _run(backend, monkeypatch, w, c, torch.tensor([bad]), rates, 0, grad=torch.randn(17, 33))
        assert torch.equal(out[0].view(torch.int32), w.view(torch.int32))
        assert torch.equal(out[1].view(torch.int32), c.view(torch.int32))
        assert out[3] == 0.0


@pytest.mark.parametrize("n_out,batch", [(1, 1), (17, 3), (200, 33)])
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_bias_update_matches_reference(monkeypatch, n_out, batch, init):
    b, c, delta = torch.randn(n_out), torch.randn(n_out), torch.randn(batch, n_out)
    rates = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.0]])
    outs = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("NUP_BACKEND", backend)
        bb, cc, d_norm, dot = b.clone(), c.clone(), torch.zeros(3), torch.zeros(1)
        apply_bias_update(bb, cc, delta, 0.5, 1, rates=rates, d_norm_out=d_norm, dot_out=dot, cumulative_is_init=init)
        outs.append((bb, cc, d_norm, dot))
    for o, r in zip(*outs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    db = 0.5 * delta.sum(0)
    torch.testing.assert_close(b - outs[0][0], 0.2 * db / db.norm(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[0][2][1], db.norm())
