"""The fused linear+activation kernels against the reference oracle and torch.autograd.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``);
every test forces the Triton path with ``NUP_BACKEND=triton``.
"""

import pytest
import torch

from nup_kernels import linear_act as la
from nup_kernels import reference as ref
from nup_kernels.activations import get_activation
from nup_kernels.linear_act_autograd import linear_act

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = ["relu", "abs", "leaky_relu:0.1", "linear_abs:0.3,0.7", "identity", "tanh", "gelu", "silu"]
# (B, n_in, n_out): every dimension takes 1, 16, 17, 33 and 64 somewhere.
SHAPES = [(1, 16, 17), (16, 17, 1), (17, 33, 64), (33, 64, 16), (64, 1, 33)]
# Tolerances, one row per dtype: (rtol, atol) elementwise, and relative RMS error for matmuls.
# bf16 is loose because the interpreter rounds fp32 -> bf16 by truncation (1 ulp = 2**-8).
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3, 1e-3),
    torch.bfloat16: (2e-2, 2e-2, 2e-2),
}
ALPHA, BIAS_SCALE = 0.7, 1.3


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


def rel_rms(out: torch.Tensor, want: torch.Tensor) -> float:
    """``‖want − out‖ / ‖want‖`` in fp64 (0 when both are zero)."""
    want, out = want.double(), out.double()
    return ((want - out).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(out, want, dtype=torch.float32):
    rtol, atol, rms = TOL[dtype]
    assert out.shape == want.shape
    assert torch.isfinite(out).all(), "kernel left non-finite values (unwritten output?)"
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(out.double(), want.double(), rtol=rtol, atol=atol * scale)
    assert rel_rms(out, want) <= rms


def make(shape, dtype=torch.float32, bias=True):
    b, n_in, n_out = shape
    x = torch.randn(b, n_in, device=DEVICE).to(dtype)
    w = (torch.randn(n_out, n_in, device=DEVICE) / n_in**0.5).to(dtype)
    bias_t = torch.randn(n_out, device=DEVICE).to(dtype) if bias else None
    return x, w, bias_t


def ref_all(x, w, bias, dy, act):
    """Reference forward and every backward quantity from the same δ."""
    y, h = ref.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    delta = ref.activation_delta(dy, h, act, saved_is_output=False)
    g, g_sq = ref.linear_act_backward_dw(delta, x, ALPHA)
    return {
        "y": y, "h": h, "delta": delta, "dx": ref.linear_act_backward_dx(delta, w, ALPHA),
        "g": g, "g_sq": g_sq, "db": ref.bias_grad(delta, BIAS_SCALE),
    }


@pytest.mark.parametrize("act_name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_launchers_match_reference(poison_empty, act_name, shape):
    act = get_activation(act_name)
    x, w, bias = make(shape, bias=shape[0] % 2 == 1)
    dy = torch.randn(shape[0], shape[2], device=DEVICE)
    want = ref_all(x, w, bias, dy, act)

    y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    assert_close(y, want["y"])
    if act.grad_from_output:
        assert saved is y
    else:
        assert_close(saved, want["h"])
    assert_close(la.activation_delta(dy, saved, act), want["delta"])
    dx = la.linear_act_backward_dx(dy, saved, w, ALPHA, act)
    assert dx.dtype == torch.float32
    assert_close(dx, want["dx"])
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act)
    assert_close(g, want["g"])
    assert_close(g_sq, want["g_sq"])
    assert_close(la.linear_act_bias_grad(dy, saved, BIAS_SCALE, act), want["db"])


@pytest.mark.parametrize("act_name", ["relu", "gelu"])
def test_grad_norm_partials_span_many_programs(poison_empty, act_name):
    """‖G‖² from per-tile partials (3×3 tiles here) equals the reference and the sum of G²."""
    act = get_activation(act_name)
    x, w, bias = make((33, 65, 70))
    dy = torch.randn(33, 70, device=DEVICE)
    want = ref_all(x, w, bias, dy, act)
    y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act)
    assert g_sq.shape == () and g_sq.dtype == torch.float64  # fp64 partials (issue #13)
    assert_close(g_sq, want["g_sq"])
    assert_close(g_sq, g.double().square().sum())


@pytest.mark.parametrize("act_name", ["leaky_relu:0.1", "silu"])
def test_noncontiguous_inputs(poison_empty, act_name):
    act = get_activation(act_name)
    B, n_in, n_out = 17, 33, 16
    x = torch.randn(n_in, B, device=DEVICE).t()  # transposed view
    w = torch.randn(n_out, 2 * n_in, device=DEVICE)[:, ::2]  # strided slice
    bias = torch.randn(2 * n_out, device=DEVICE)[::2]
    dy = torch.randn(n_out, B, device=DEVICE).t()
    assert not (x.is_contiguous() or w.is_contiguous() or bias.is_contiguous() or dy.is_contiguous())
    want = ref_all(x, w, bias, dy, act)

    y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    assert_close(y, want["y"])
    saved_t = saved.t().contiguous().t()  # a column-major saved tensor
    assert_close(la.activation_delta(dy, saved_t, act), want["delta"])
    assert_close(la.linear_act_backward_dx(dy, saved_t, w, ALPHA, act), want["dx"])
    g, g_sq = la.linear_act_backward_dw(dy, saved_t, x, ALPHA, act)
    assert_close(g, want["g"])
    assert_close(g_sq, want["g_sq"])
    assert_close(la.linear_act_bias_grad(dy, saved_t, BIAS_SCALE, act), want["db"])


def test_activation_delta_reads_h_on_request(poison_empty):
    act = get_activation("relu")
    x, w, bias = make((17, 16, 33))
    dy = torch.randn(17, 33, device=DEVICE)
    want = ref_all(x, w, bias, dy, act)
    assert_close(la.activation_delta(dy, want["h"], act, saved_is_output=False), want["delta"])
    with pytest.raises(ValueError, match="cannot be read from its output"):
        la.activation_delta(dy, want["h"], get_activation("gelu"), saved_is_output=True)


@pytest.mark.parametrize("act_name", ["relu", "abs", "tanh", "gelu", "linear_abs:0.3,0.7"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_autograd_matches_torch(act_name, bias):
    act = get_activation(act_name)
    x0, w0, b0 = make((17, 33, 16), bias=bias)
    x0 = x0.reshape(1, 17, 33).expand(2, 17, 33).contiguous()  # leading batch dims
    dy = torch.randn(2, 17, 16, device=DEVICE)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        y = fn(x, w, b)
        y.backward(dy)
        return y, x.grad, w.grad, None if b is None else b.grad

    def plain(x, w, b):
        h = ALPHA * torch.nn.functional.linear(x, w)
        return act(h + BIAS_SCALE * b if b is not None else h)

    got = run(lambda x, w, b: linear_act(x, w, b, ALPHA, BIAS_SCALE, act_name))
    want = run(plain)
    assert got[0].shape == (2, 17, 16)
    for out, exp in zip(got, want, strict=True):
        if exp is None:
            assert out is None
        else:
            assert out.dtype == exp.dtype
            assert_close(out, exp)


def test_linear_act_backward_from_broadcast_grad():
    """``y.sum().backward()`` hands the kernels a stride-0 ``dy``."""
    x, w, b = make((17, 33, 16))
    w.requires_grad_()
    b.requires_grad_()
    linear_act(x, w, b, ALPHA, BIAS_SCALE, "tanh").sum().backward()
    want = ref_all(x, w.detach(), b.detach(), torch.ones(17, 16, device=DEVICE), get_activation("tanh"))
    assert_close(w.grad, want["g"])
    assert_close(b.grad, want["db"])


def test_linear_act_reference_path_agrees(monkeypatch):
    x, w, b = make((16, 17, 33))
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    y = linear_act(*args, ALPHA, BIAS_SCALE, "silu")
    grads = torch.autograd.grad(y.square().sum(), args)
    monkeypatch.setenv("NUP_BACKEND", "reference")
    y_ref = linear_act(*args, ALPHA, BIAS_SCALE, "silu")
    grads_ref = torch.autograd.grad(y_ref.square().sum(), args)
    assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref)


def test_float64_takes_reference_path():
    x, w, b = make((4, 16, 8), dtype=torch.float64)
    x.requires_grad_()
    y = linear_act(x, w, b, ALPHA, BIAS_SCALE, "gelu")
    assert y.dtype == torch.float64
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.dtype == torch.float64
    xf = x.detach().float()
    yf, _ = ref.linear_act_forward(xf, w.float(), b.float(), ALPHA, BIAS_SCALE, get_activation("gelu"))
    assert_close(y, yf)


@pytest.mark.parametrize("act_name", ["relu", "gelu"])
def test_launchers_run_float64_operands_in_float64(act_name):
    """The kernels are 16/32-bit: float64 operands take each launcher's float64 route (torch ops), which the
    fused NuMLP step on the Triton code path relies on for a float64 model."""
    act = get_activation(act_name)
    x, w, b = make((5, 16, 8), dtype=torch.float64)
    dy = torch.randn(5, 8, device=DEVICE, dtype=torch.float64)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    hr = ALPHA * xr @ wr.t() + BIAS_SCALE * br
    yr = act(hr)
    dxr, gr, dbr, delta_r = torch.autograd.grad(yr, (xr, wr, br, hr), dy)
    y, saved = la.linear_act_forward(x, w, b, ALPHA, BIAS_SCALE, act)
    delta, dx = la.linear_act_backward_delta_dx(dy, saved, w, ALPHA, act, out_dtype=torch.float64)
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act, delta=delta)
    results = {
        "y": (y, yr), "delta": (delta, delta_r), "activation_delta": (la.activation_delta(dy, saved, act), delta_r),
        "dx": (dx, dxr), "dx_given_delta": (la.linear_act_backward_dx(dy, saved, w, ALPHA, act, torch.float64,
                                                                      delta=delta), dxr),
        "G": (g, gr), "G_recomputed": (la.linear_act_backward_dw(dy, saved, x, ALPHA, act)[0], gr),
        "g_sq": (g_sq, gr.square().sum()), "db": (la.linear_act_bias_grad(dy, saved, BIAS_SCALE, act), dbr),
    }  # fmt: skip
    for name, (out, want) in results.items():
        assert out.dtype == torch.float64, name
        torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12, msg=name)


def test_custom_activation_takes_reference_path():
    x, w, _ = make((4, 16, 8))
    x.requires_grad_()
    y = linear_act(x, w, activation=torch.sin)
    assert_close(y, torch.sin(x @ w.t()))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert_close(dx, torch.cos(x @ w.t()) @ w)
    with pytest.raises(ValueError, match="no Triton kernel"):
        la.linear_act_forward(x, w, None, 1.0, 1.0, get_activation(torch.sin))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(poison_empty, dtype):
    act = get_activation("gelu")
    x, w, bias = make((33, 17, 16), dtype=dtype)
    dy = torch.randn(33, 16, device=DEVICE).to(dtype)
    want = ref_all(x, w, bias, dy, act)
    y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    assert y.dtype == saved.dtype == dtype
    assert_close(y, want["y"], dtype)
    # The oracle's δ, from its own rounded h; the kernels read the kernel's h.
    delta = ref.activation_delta(dy, saved, act, saved_is_output=False)
    dx = la.linear_act_backward_dx(dy, saved, w, ALPHA, act, out_dtype=dtype)
    assert dx.dtype == dtype
    assert_close(dx, ref.linear_act_backward_dx(delta, w, ALPHA), dtype)
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act)
    g_want, g_sq_want = ref.linear_act_backward_dw(delta, x, ALPHA)
    assert_close(g, g_want, dtype)
    assert_close(g_sq, g_sq_want, dtype)
    assert_close(la.linear_act_bias_grad(dy, saved, BIAS_SCALE, act), ref.bias_grad(delta, BIAS_SCALE), dtype)


def test_runs_are_bitwise_equal():
    act = get_activation("gelu")
    x, w, bias = make((64, 65, 70))
    dy = torch.randn(64, 70, device=DEVICE)

    def once():
        y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
        g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act)
        return (y, saved, la.linear_act_backward_dx(dy, saved, w, ALPHA, act), g, g_sq,
                la.linear_act_bias_grad(dy, saved, BIAS_SCALE, act), la.activation_delta(dy, saved, act))

    for a, b in zip(once(), once(), strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    act = get_activation("relu")
    x, w, bias = make((0, 16, 8))
    y, saved = la.linear_act_forward(x, w, bias, ALPHA, BIAS_SCALE, act)
    assert y.shape == (0, 8)
    dy = torch.randn(0, 8, device=DEVICE)
    assert la.linear_act_backward_dx(dy, saved, w, ALPHA, act).shape == (0, 16)
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act)
    assert torch.equal(g, torch.zeros(8, 16, device=DEVICE)) and g_sq.item() == 0.0
    assert torch.equal(la.linear_act_bias_grad(dy, saved, BIAS_SCALE, act), torch.zeros(8, device=DEVICE))


def test_bad_inputs_raise_clear_errors():
    act = get_activation("relu")
    x, w, bias = make((4, 16, 8))
    with pytest.raises(ValueError, match="x has 17 features but weight"):
        linear_act(torch.randn(4, 17, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"bias has shape \(9,\)"):
        linear_act(x, w, torch.randn(9, device=DEVICE))
    with pytest.raises(TypeError, match="cast x to the weight's dtype"):
        linear_act(x.half(), w)
    with pytest.raises(TypeError, match="use float32, float16 or bfloat16"):
        linear_act(x.int(), w.int())
    with pytest.raises(ValueError, match="different devices"):
        linear_act(x, torch.empty(8, 16, device="meta"))
    with pytest.raises(ValueError, match="must be 2-D"):
        la.linear_act_forward(x[0], w, None, 1.0, 1.0, act)
    y, saved = la.linear_act_forward(x, w, bias, 1.0, 1.0, act)
    with pytest.raises(ValueError, match="saved activation"):
        la.linear_act_backward_dx(torch.randn(4, 9, device=DEVICE), saved, w, 1.0, act)
    with pytest.raises(ValueError, match="pass the weight used in the forward"):
        la.linear_act_backward_dx(y, saved, w.t(), 1.0, act)
    with pytest.raises(ValueError, match="pass the layer input x"):
        la.linear_act_backward_dw(y, saved, x[:3], 1.0, act)
    with pytest.raises(ValueError, match="unknown activation"):
        linear_act(x, w, activation="relu6")
