"""The fused update kernels against the reference, through Triton's interpreter on CPU."""

import pytest
import torch

from nup_kernels import reference
from nup_kernels.apply_update import apply_update, choose_update_path

# fp32 tolerances: elementwise values and the ⟨ΔW, C_old⟩ reduction
TOL = {"rtol": 1e-5, "atol": 1e-5}
# matrix outputs: relative RMS error ‖ref − out‖ / ‖ref‖
RMS_TOL = 1e-6
# (n_out, n_in): every size 1, 16, 17, 33, 64 appears in each dimension
SHAPES = [(1, 64), (16, 17), (17, 1), (33, 33), (64, 16)]
ALPHA = 0.7


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")


def _rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref.float() - out.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _problem(n_out, n_in, batch):
    w, c = torch.randn(n_out, n_in), torch.randn(n_out, n_in)
    x, delta = torch.randn(batch, n_in), torch.randn(batch, n_out)
    return w, c, x, delta, torch.tensor(-0.3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _run_both(w, c, coef, update, **kwargs):
    """(kernel W, C, dot) and (reference W, C, dot) for the same inputs."""
    w1, c1, w2, c2 = w.clone(), c.clone(), w.clone(), c.clone()
    dot = apply_update(w1, c1, coef, **update, **kwargs)
    ref = reference.apply_update(w2, c2, coef, **update, **kwargs)
    return (w1, c1, dot), (w2, c2, ref)


def _assert_matches(out, ref):
    for o, r in zip(out[:2], ref[:2], strict=True):
        torch.testing.assert_close(o, r, **TOL)
        assert _rel_rms(r, o) < RMS_TOL
    assert out[2].shape == () and out[2].dtype == torch.float32
    torch.testing.assert_close(out[2], ref[2], **TOL)


@pytest.mark.parametrize("batch", [1, 3, 17, 33])
@pytest.mark.parametrize(("n_out", "n_in"), SHAPES)
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_small_batch_matches_reference(n_out, n_in, batch, init, poison_empty):
    w, c, x, delta, coef = _problem(n_out, n_in, batch)
    out, ref = _run_both(w, c, coef, {"x": x, "delta": delta, "alpha": ALPHA}, cumulative_is_init=init)
    _assert_matches(out, ref)


@pytest.mark.parametrize(("n_out", "n_in"), [*SHAPES, (70, 150)])
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_materialized_matches_reference_and_small_batch(n_out, n_in, init, poison_empty):
    w, c, x, delta, coef = _problem(n_out, n_in, 17)
    grad = reference.linear_act_backward_dw(delta, x, ALPHA)[0]
    out, ref = _run_both(w, c, coef, {"grad": grad}, cumulative_is_init=init)
    _assert_matches(out, ref)
    small, _ = _run_both(w, c, coef, {"x": x, "delta": delta, "alpha": ALPHA}, cumulative_is_init=init)
    _assert_matches(small, out)


def test_multi_tile_small_batch_and_dot_value():
    w, c, x, delta, coef = _problem(70, 150, 70)  # several tiles each way, two K steps
    w0, c0 = w.clone(), c.clone()
    out, ref = _run_both(w, c, coef, {"x": x, "delta": delta, "alpha": ALPHA})
    _assert_matches(out, ref)
    step = coef * ALPHA * (delta.t() @ x)  # ΔW, formed by hand
    torch.testing.assert_close(out[2], (step * c0).sum(), **TOL)
    torch.testing.assert_close(out[0], w0 + step, **TOL)
    torch.testing.assert_close(out[1], c0 + step, **TOL)


def test_cumulative_is_init_reads_p0_and_leaves_it():
    w, p0, x, delta, coef = _problem(33, 17, 3)
    p0_bits = _bits(p0).clone()
    w0 = w.clone()
    dot = apply_update(w, p0, coef, x=x, delta=delta, alpha=ALPHA, cumulative_is_init=True)
    step = coef * ALPHA * (delta.t() @ x)
    torch.testing.assert_close(dot, (step * (w0 - p0)).sum(), **TOL)
    torch.testing.assert_close(w, w0 + step, **TOL)
    assert torch.equal(_bits(p0), p0_bits)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's matmul
@pytest.mark.parametrize("poison", ["grad_nan", "grad_inf", "delta_nan", "x_inf"])
@pytest.mark.parametrize("init", [False, True], ids=["C", "P0"])
def test_zero_coef_leaves_weights_bit_identical(poison, init):
    w, c, x, delta, _ = _problem(33, 17, 3)
    grad = reference.linear_act_backward_dw(delta, x, ALPHA)[0]
    if poison == "grad_nan":
        grad[3, 5] = float("nan")
    elif poison == "grad_inf":
        grad[0, 0] = float("inf")
    elif poison == "delta_nan":
        delta[1, 2] = float("nan")
    else:
        x[0, 4] = float("inf")
    update = {"grad": grad} if poison.startswith("grad") else {"x": x, "delta": delta, "alpha": ALPHA}
    w_bits, c_bits = _bits(w).clone(), _bits(c).clone()
    dot = apply_update(w, c, torch.tensor(0.0), cumulative_is_init=init, **update)
    assert torch.equal(_bits(w), w_bits) and torch.equal(_bits(c), c_bits)
    assert dot.item() == 0.0


def test_non_contiguous_inputs_update_in_place():
    w_store = torch.randn(17, 33)
    w, c = w_store.t(), torch.randn(17, 66)[:, ::2].t()  # (33, 17), both strided views
    x, delta = torch.randn(34, 5).t()[:, ::2], torch.randn(5, 66)[:, ::2]  # (5, 17), (5, 33)
    assert not (w.is_contiguous() or c.is_contiguous() or x.is_contiguous() or delta.is_contiguous())
    grad = torch.randn(17, 33).t()
    coef = torch.tensor(-0.25)  # a descent coefficient (−η·s/‖G‖): a positive one reads as a bad rate and skips
    for update in ({"grad": grad}, {"x": x, "delta": delta, "alpha": ALPHA}):
        w_ref, c_ref = w.contiguous(), c.contiguous()
        ref = reference.apply_update(w_ref, c_ref, coef, **update)
        dot = apply_update(w, c, coef, **update)
        torch.testing.assert_close(w, w_ref, **TOL)
        torch.testing.assert_close(c, c_ref, **TOL)
        torch.testing.assert_close(dot, ref, **TOL)
    torch.testing.assert_close(w_store.t(), w)  # the update landed in the original storage


def test_bitwise_repeatable():
    w, c, x, delta, coef = _problem(70, 150, 33)
    outs = [_run_both(w, c, coef, {"x": x, "delta": delta, "alpha": ALPHA})[0] for _ in range(2)]
    for a, b in zip(*outs, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_bf16_weight_within_one_ulp():
    # The interpreter rounds fp32 -> bf16 by truncation, torch to nearest even: allow one bf16 ulp.
    w, c, x, delta, coef = _problem(33, 17, 3)
    w = w.bfloat16()
    grad = reference.linear_act_backward_dw(delta, x, ALPHA)[0]
    for update in ({"grad": grad}, {"x": x.bfloat16(), "delta": delta.bfloat16(), "alpha": ALPHA}):
        out, ref = _run_both(w, c, coef, update)
        torch.testing.assert_close(out[0].float(), ref[0].float(), rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=1e-4)


def test_choose_update_path(monkeypatch):
    monkeypatch.delenv("NUP_UPDATE_PATH", raising=False)
    assert choose_update_path(256, 1024, 1024, torch.bfloat16) == "small_batch"
    assert choose_update_path(257, 1024, 1024, torch.float16) == "materialized"
    assert choose_update_path(64, 1024, 1024, torch.float32) == "small_batch"
    assert choose_update_path(65, 1024, 1024, torch.float32) == "materialized"
    monkeypatch.setenv("NUP_UPDATE_PATH", "materialized")
    assert choose_update_path(1, 8, 8, torch.bfloat16) == "materialized"
    monkeypatch.setenv("NUP_UPDATE_PATH", "small_batch")
    assert choose_update_path(4096, 8, 8, torch.float32) == "small_batch"
    monkeypatch.setenv("NUP_UPDATE_PATH", "fastest")
    with pytest.raises(ValueError, match="NUP_UPDATE_PATH"):
        choose_update_path(1, 8, 8, torch.float32)


def test_clear_errors():
    w, c, x, delta, coef = _problem(4, 3, 2)
    with pytest.raises(ValueError, match="fp32 weights"):
        apply_update(w.bfloat16(), c, coef, x=x, delta=delta, cumulative_is_init=True)
    with pytest.raises(ValueError, match="grad .* or both x and delta"):
        apply_update(w, c, coef, x=x)
    with pytest.raises(ValueError, match="do not match"):
        apply_update(w, c, coef, x=delta, delta=x)
    with pytest.raises(ValueError, match="grad"):
        apply_update(w, c, coef, grad=torch.randn(3, 4))
    with pytest.raises(ValueError, match="cumulative"):
        apply_update(w, c.t(), coef, grad=torch.randn(4, 3))
    with pytest.raises(TypeError, match="coef"):
        apply_update(w, c, 0.5, x=x, delta=delta)
    with pytest.raises(TypeError, match="coef"):
        apply_update(w, c, torch.tensor(0.5, dtype=torch.float64), x=x, delta=delta)
    with pytest.raises(ValueError, match="different devices"):
        apply_update(w, c, coef, grad=torch.randn(4, 3, device="meta"))
