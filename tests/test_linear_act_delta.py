"""δ read instead of recomputed (``delta=``), the one-launch ``(δ, dx)``, and the bias-grad second stage.

Interpreter tests on CPU (fp32 and bf16) against the reference oracle, with NaN-poisoned outputs.
"""

import pytest
import torch

from nup_kernels import linear_act as la
from nup_kernels import reference as ref
from nup_kernels.activations import get_activation

SHAPES = [(1, 16, 17), (17, 33, 1), (33, 17, 64), (70, 1, 33)]  # (B, n_in, n_out)
ALPHA = 0.7


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


def _layer(shape, act, dtype=torch.float32):
    b, n_in, n_out = shape
    x = torch.randn(b, n_in).to(dtype)
    w = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    y, saved = la.linear_act_forward(x, w, None, ALPHA, 1.0, act)
    dy = torch.randn_like(y)
    want_delta = ref.activation_delta(dy.float(), saved.float(), get_activation(act),
                                      get_activation(act).grad_from_output)  # fmt: skip
    return x, w, dy, saved, want_delta


def _close(out, want, tol=1e-5):
    assert out.shape == want.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("shape", SHAPES)
def test_delta_dx_is_one_launch_of_delta_and_dx(shape, act, poison_empty):
    x, w, dy, saved, want_delta = _layer(shape, act)
    delta, dx = la.linear_act_backward_delta_dx(dy, saved, w, ALPHA, act)
    assert delta.dtype == torch.float32 and delta.is_contiguous()
    _close(delta, want_delta)
    _close(dx, ref.linear_act_backward_dx(want_delta, w, ALPHA))
    # dx agrees with the two-launch path bit for bit up to fp32 rounding of the same sums
    _close(dx, la.linear_act_backward_dx(dy, saved, w, ALPHA, act))


def test_delta_dx_writes_each_delta_tile_once_with_many_dx_columns(monkeypatch):
    # n_in = 100 > the interpreter's 32-wide dx tile: several programs share each δ tile; one stores it
    x, w, dy, saved, want_delta = _layer((40, 100, 70), "gelu")
    delta, dx = la.linear_act_backward_delta_dx(dy, saved, w, ALPHA, "gelu")
    _close(delta, want_delta)
    _close(dx, ref.linear_act_backward_dx(want_delta, w, ALPHA))


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_given_delta_is_read_not_recomputed(shape, act, poison_empty):
    x, w, dy, saved, want_delta = _layer(shape, act)
    # a δ that differs from dy ⊙ φ': the kernels must use it as given
    delta = want_delta * 2.0 + 1.0
    dx = la.linear_act_backward_dx(dy, saved, w, ALPHA, act, delta=delta)
    _close(dx, ref.linear_act_backward_dx(delta, w, ALPHA))
    g, g_sq = la.linear_act_backward_dw(dy, saved, x, ALPHA, act, delta=delta)
    want_g, want_sq = ref.linear_act_backward_dw(delta, x, ALPHA)
    _close(g, want_g)
    torch.testing.assert_close(g_sq, want_sq, rtol=1e-5, atol=1e-5)


def test_bf16_weights_with_fp32_delta():
    x, w, dy, saved, want_delta = _layer((33, 17, 40), "relu", torch.bfloat16)
    dx = la.linear_act_backward_dx(dy, saved, w, ALPHA, "relu", out_dtype=torch.float32, delta=want_delta)
    want = ref.linear_act_backward_dx(want_delta.bfloat16().float(), w.float(), ALPHA)
    assert ((dx - want).norm() / want.norm()).item() < 2e-2
    g, _ = la.linear_act_backward_dw(dy, saved, x, ALPHA, "relu", delta=want_delta)
    want_g, _ = ref.linear_act_backward_dw(want_delta.bfloat16().float(), x.float(), ALPHA)
    assert ((g - want_g).norm() / want_g.norm()).item() < 2e-2


def test_bias_grad_sums_several_row_blocks(monkeypatch, poison_empty):
    monkeypatch.setattr(la, "_BIAS_ROWS", 32)  # 70 rows -> 3 partial rows summed in the second stage
    _, _, dy, saved, want_delta = _layer((70, 16, 33), "gelu")
    _close(la.linear_act_bias_grad(dy, saved, 1.3, "gelu"), ref.bias_grad(want_delta, 1.3))


def test_clear_errors():
    x, w, dy, saved, want_delta = _layer((5, 6, 7), "relu")
    with pytest.raises(ValueError, match="delta has shape"):
        la.linear_act_backward_dx(dy, saved, w, ALPHA, "relu", delta=want_delta[:, :3])
    with pytest.raises(ValueError, match="delta has shape"):
        la.linear_act_backward_dw(dy, saved, x, ALPHA, "relu", delta=want_delta.t())
    with pytest.raises(ValueError, match="rows"):
        la.linear_act_backward_delta_dx(dy, saved, w.t(), ALPHA, "relu")
    huge = torch.empty_strided((2, 3), (2**24, 1))
    with pytest.raises(ValueError, match="int32 tile offsets"):
        la.linear_act_forward(huge, torch.randn(4, 3), None, 1.0, 1.0, "relu")
