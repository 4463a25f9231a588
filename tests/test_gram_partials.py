"""``grad_norm_sq_partials``: the Gram-norm kernel split over feature chunks, one launch, deterministic."""

import pytest
import torch

from nup_kernels import reference
from nup_kernels.gram_norm import grad_norm_sq_gram, grad_norm_sq_partials, grad_norm_sq_partials_size

# (batch, n_in, n_out): several feature chunks per side (chunks are >= 64 wide), and batches past one tile
SHAPES = [(1, 200, 33), (17, 64, 777), (33, 431, 130), (70, 129, 65)]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


@pytest.mark.parametrize(("batch", "n_in", "n_out"), SHAPES)
def test_partials_sum_to_the_norm(batch, n_in, n_out, poison_empty):
    x, delta = torch.randn(batch, n_in), torch.randn(batch, n_out)
    partials = grad_norm_sq_partials(x, delta, 0.37)
    assert partials.shape == (grad_norm_sq_partials_size(batch, n_in, n_out),) and partials.numel() > 1
    want = reference.grad_norm_sq_gram(x, delta, 0.37)
    torch.testing.assert_close(partials.sum(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_norm_sq_gram(x, delta, 0.37), want, rtol=1e-5, atol=1e-5)


def test_out_is_written_in_place_and_checked():
    x, delta = torch.randn(20, 300), torch.randn(20, 90)
    out = torch.full((grad_norm_sq_partials_size(20, 300, 90),), float("nan"), dtype=torch.float64)
    assert grad_norm_sq_partials(x, delta, 2.0, out=out) is out
    torch.testing.assert_close(out.sum(), reference.grad_norm_sq_gram(x, delta, 2.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad_norm_sq_partials_size"):
        grad_norm_sq_partials(x, delta, 2.0, out=torch.empty(3))


def test_deterministic_and_clamped_at_zero():
    x, delta = torch.randn(70, 431), torch.randn(70, 130)
    a, b = grad_norm_sq_partials(x, delta, 1.0), grad_norm_sq_partials(x, delta, 1.0)
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))
    # G = δᵀx vanishes (paired rows cancel): the result is 0 or a rounding-sized positive number, never negative
    x1, d1 = torch.randn(8, 300), torch.randn(8, 200)
    out = grad_norm_sq_gram(torch.cat([x1, x1]), torch.cat([d1, -d1]), 1.0)
    assert 0.0 <= out.item() <= 1e-6 * (x1.norm() * d1.norm()).item() ** 2


def test_cpu_without_the_triton_backend_is_refused(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "reference")
    with pytest.raises(ValueError, match="grad_norm_sq_gram"):
        grad_norm_sq_partials(torch.randn(3, 4), torch.randn(3, 5), 1.0)
