"""Multi-tensor reduce and apply against the reference, through Triton's interpreter on CPU."""

import pytest
import torch

from nup_kernels import multi_tensor, reference
from nup_kernels.multi_tensor import CHUNK, multi_tensor_apply, multi_tensor_reduce

# fp32 tolerances for the per-tensor sums
TOL = {"rtol": 1e-5, "atol": 1e-5}
# odd sizes: a scalar-like tensor, primes, a 3-D tensor, an empty one, and chunk boundaries
SHAPES = [(1,), (17,), (33, 17), (64, 64), (3, 1, 7), (0,), (CHUNK + 1,), (2 * CHUNK,)]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


def _lists(dtypes=None):
    dtypes = dtypes or [torch.float32] * len(SHAPES)
    make = lambda: [torch.randn(s).to(dt) for s, dt in zip(SHAPES, dtypes, strict=True)]
    return make(), make(), make()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_reduce_matches_reference(poison_empty):
    _, d, c = _lists()
    out = multi_tensor_reduce(d, c)
    for o, r in zip(out, reference.multi_tensor_reduce(d, c), strict=True):
        assert o.shape == (len(SHAPES),) and o.dtype == torch.float64  # accumulated in fp64 (issue #13)
        torch.testing.assert_close(o, r, **TOL)
    assert out[0][SHAPES.index((0,))].item() == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0·inf in the interpreter
def test_apply_matches_reference_and_skips_zero_coef(poison_empty):
    p, d, c = _lists()
    coefs = torch.randn(len(SHAPES))
    coefs[2] = 0.0
    d[2][0, 0] = float("nan")  # a skipped tensor's NaN must not leak
    d[4][0, 0, 3] = float("inf")
    coefs[4] = 0.0
    p_ref, c_ref = [t.clone() for t in p], [t.clone() for t in c]
    kept = [(_bits(p[i]).clone(), _bits(c[i]).clone()) for i in (2, 4)]
    multi_tensor_apply(p, d, c, coefs)
    reference.multi_tensor_apply(p_ref, d, c_ref, coefs)
    for a, b in zip(p + c, p_ref + c_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for i, (p_bits, c_bits) in zip((2, 4), kept, strict=True):
        assert torch.equal(_bits(p[i]), p_bits) and torch.equal(_bits(c[i]), c_bits)


def test_mixed_dtypes_are_grouped():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16,
              torch.float32, torch.float16, torch.float32]  # fmt: skip
    p, d, c = _lists(dtypes)
    d[0] = d[0].bfloat16()  # a tensor whose D and C dtypes differ
    out = multi_tensor_reduce(d, c)
    for o, r in zip(out, reference.multi_tensor_reduce(d, c), strict=True):
        torch.testing.assert_close(o, r, **TOL)
    coefs = torch.randn(len(SHAPES))
    p_ref, c_ref = [t.clone() for t in p], [t.clone() for t in c]
    multi_tensor_apply(p, d, c, coefs)
    reference.multi_tensor_apply(p_ref, d, c_ref, coefs)
    # The interpreter rounds fp32 -> 16-bit by truncation, torch to nearest: allow one 16-bit ulp.
    for a, b in zip(p + c, p_ref + c_ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)


def test_non_contiguous_directions_are_accepted():
    p, d, c = _lists()
    d_t = [t.t() if t.dim() == 2 else t for t in d]
    c_t = [t.t().contiguous() if t.dim() == 2 else t for t in c]
    out = multi_tensor_reduce(d_t, c_t)
    for o, r in zip(out, reference.multi_tensor_reduce(d_t, c_t), strict=True):
        torch.testing.assert_close(o, r, **TOL)
    p_t = [t.t().contiguous() if t.dim() == 2 else t for t in p]
    p_ref, c_ref = [t.clone() for t in p_t], [t.clone() for t in c_t]
    coefs = torch.randn(len(SHAPES))
    multi_tensor_apply(p_t, d_t, c_t, coefs)
    reference.multi_tensor_apply(p_ref, d_t, c_ref, coefs)
    for a, b in zip(p_t + c_t, p_ref + c_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_bitwise_repeatable_and_tables_cached():
    p, d, c = _lists()
    first = multi_tensor_reduce(d, c)
    plan = multi_tensor._plan((d, c))
    second = multi_tensor_reduce(d, c)
    assert multi_tensor._plan((d, c)) is plan  # steady state: no rebuild
    for a, b in zip(first, second, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    coefs = torch.randn(len(SHAPES))
    p2, c2 = [t.clone() for t in p], [t.clone() for t in c]
    multi_tensor_apply(p, d, c, coefs)
    multi_tensor_apply(p2, d, c2, coefs)
    for a, b in zip(p + c, p2 + c2, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_empty_lists():
    d_sq, dc, c_sq = multi_tensor_reduce([], [])
    assert d_sq.numel() == dc.numel() == c_sq.numel() == 0
    multi_tensor_apply([], [], [], torch.zeros(0))


def test_clear_errors():
    p, d, c = _lists()
    coefs = torch.randn(len(SHAPES))
    with pytest.raises(ValueError, match="differ in length"):
        multi_tensor_reduce(d, c[:-1])
    with pytest.raises(ValueError, match="differ in length"):
        multi_tensor_apply(p, d[:-1], c, coefs)
    with pytest.raises(ValueError, match="differs in shape"):
        multi_tensor_reduce(d, [c[1], c[0], *c[2:]])
    with pytest.raises(ValueError, match="different devices"):
        multi_tensor_reduce(d, [*c[:-1], c[-1].to("meta")])
    with pytest.raises(TypeError, match="dtype"):
        multi_tensor_reduce([*d[:-1], d[-1].to(torch.int32)], c)
    with pytest.raises(ValueError, match="coefs"):
        multi_tensor_apply(p, d, c, coefs[:-1])
    with pytest.raises(ValueError, match="coefs"):
        multi_tensor_apply(p, d, c, coefs.half())  # fp32 or float64 only
    p_strided = [*p[:2], torch.randn(17, 33).t(), *p[3:]]
    with pytest.raises(ValueError, match="contiguous"):
        multi_tensor_apply(p_strided, d, c, coefs)
