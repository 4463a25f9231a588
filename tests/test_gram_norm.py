"""The Gram-matrix ``‖G‖²`` kernel against the reference, through Triton's interpreter on CPU."""

import pytest
import torch

from nup_kernels import reference
from nup_kernels.gram_norm import grad_norm_sq_gram

# fp32 tolerances (the kernel and the reference accumulate in fp64; only the summation order differs)
TOL = {"rtol": 1e-5, "atol": 1e-5}
# (n_in, n_out): every size 1, 16, 17, 33, 64 appears in each dimension
FEATURES = [(1, 64), (16, 17), (17, 1), (33, 33), (64, 16)]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


@pytest.mark.parametrize("batch", [1, 3, 17, 33, 70])
@pytest.mark.parametrize(("n_in", "n_out"), FEATURES)
def test_matches_reference(batch, n_in, n_out, poison_empty):
    x, delta = torch.randn(batch, n_in), torch.randn(batch, n_out)
    out = grad_norm_sq_gram(x, delta, 0.37)
    assert out.shape == () and out.dtype == torch.float64  # accumulated in fp64 (issue #13)
    torch.testing.assert_close(out, reference.grad_norm_sq_gram(x, delta, 0.37), **TOL)
    # the Gram identity itself: the same number as ‖G‖² of the materialized G
    _, g_sq = reference.linear_act_backward_dw(delta, x, 0.37)
    torch.testing.assert_close(out, g_sq, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs():
    x = torch.randn(40, 33).t()  # (33, 40) with strides (1, 33)
    delta = torch.randn(33, 34)[:, ::2]  # (33, 17), stride 2 along features
    assert not x.is_contiguous() and not delta.is_contiguous()
    out = grad_norm_sq_gram(x, delta, 1.5)
    ref = reference.grad_norm_sq_gram(x.contiguous(), delta.contiguous(), 1.5)
    torch.testing.assert_close(out, ref, **TOL)


def test_deterministic_and_zero_batch():
    x, delta = torch.randn(70, 33), torch.randn(70, 17)
    a, b = grad_norm_sq_gram(x, delta, 1.0), grad_norm_sq_gram(x, delta, 1.0)
    assert a.view(torch.int64) == b.view(torch.int64)
    assert grad_norm_sq_gram(torch.randn(0, 5), torch.randn(0, 3), 1.0).item() == 0.0


def test_reference_backend_is_used_when_forced(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "reference")
    x, delta = torch.randn(5, 7), torch.randn(5, 3)
    assert torch.equal(grad_norm_sq_gram(x, delta, 2.0), reference.grad_norm_sq_gram(x, delta, 2.0))


def test_clear_errors():
    with pytest.raises(ValueError, match="batch"):
        grad_norm_sq_gram(torch.randn(3, 4), torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="different devices"):
        grad_norm_sq_gram(torch.randn(3, 4), torch.randn(3, 4, device="meta"), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        grad_norm_sq_gram(torch.ones(3, 4, dtype=torch.int32), torch.randn(3, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        grad_norm_sq_gram(torch.randn(3), torch.randn(3, 4), 1.0)
