"""Issue #13, optimizer failures and decided deviations: float64 parameters, bit-identical skips,
group-level values wherever they enter, extreme but finite gradients, DCP's initialization step,
and checkpoints loaded into an optimizer of another kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup.schedule import GeometryAwareLR, make_schedule
from nup_kernels import multi_tensor


def _batch(dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _backward(model, dtype=torch.float32, x=None):
    xb, yb = _batch(dtype)
    F.cross_entropy(model(xb if x is None else x), yb).backward()


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _expected_step(p: torch.Tensor, d: torch.Tensor, eta_s: float) -> torch.Tensor:
    """``P − η·s·D/‖D‖`` in float64."""
    d64 = d.double()
    return p.double() - eta_s * d64 / torch.linalg.vector_norm(d64)


# ---- failures 1 and 2: float64 parameters ----------------------------------------------------------
@pytest.mark.parametrize("base", [None, "sgd", "momentum"])
def test_float64_parameters_step_in_float64(base):
    torch.manual_seed(0)
    model = NuMLP(8, 3, 3, 2).double()
    params = list(model.parameters())
    opt_base = None
    if base is not None:
        opt_base = torch.optim.SGD(params, lr=1.0, momentum=0.9 if base == "momentum" else 0.0)
    opt = NuP(model.named_parameters(), lr=0.1, base=opt_base)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        _backward(model, torch.float64)
        grads = [p.grad.clone() for p in params]
        opt.step()
        if base is None:  # the direction is the gradient: check the step against float64 arithmetic
            for p, b, g, s in zip(params, before, grads, [p._nup_meta.scale for p in params], strict=True):
                assert p.dtype == torch.float64  # η and s_P are fp32 numbers, the rest is float64 arithmetic
                eta_s = _fp32(0.1) * _fp32(s)
                torch.testing.assert_close(p.detach(), _expected_step(b, g, eta_s), rtol=0, atol=1e-14)
    v = opt.stat_vectors()
    assert torch.isfinite(v["c_norm"]).all() and (v["update_norm"] > 0).all() and (v["skipped"] == 0).all()


def test_float64_on_the_multi_tensor_path(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    d = [torch.randn(33, dtype=torch.float64), torch.randn(17, 5, dtype=torch.float64)]
    c = [torch.randn_like(t) for t in d]
    d_sq, dc, c_sq = multi_tensor.multi_tensor_reduce(d, c)
    for i in range(2):  # accumulated and returned in float64
        for out, want in ((d_sq, d[i].square().sum()), (c_sq, c[i].square().sum()), (dc, (d[i] * c[i]).sum())):
            assert out.dtype == torch.float64
            torch.testing.assert_close(out[i], want, rtol=1e-14, atol=0)
    p = [torch.randn_like(t) for t in d]
    p0, c0 = [t.clone() for t in p], [t.clone() for t in c]
    coefs = torch.tensor([-1e-3, 0.0])
    multi_tensor.multi_tensor_apply(p, d, c, coefs)
    assert torch.equal(p[1], p0[1]) and torch.equal(c[1], c0[1])  # coefficient 0: bit-identical
    torch.testing.assert_close(p[0], p0[0] + coefs[0].double() * d[0], rtol=0, atol=1e-15)
    model = NuMLP(8, 3, 3, 2).double()
    opt = NuP(model.named_parameters(), lr=0.1)
    _backward(model, torch.float64)
    opt.step()
    assert (opt.stat_vectors()["update_norm"] > 0).all()


def test_fused_float64_skip_is_bit_identical():
    model = NuMLP(8, 3, 3, 2).double()
    with torch.no_grad():
        for p in model.parameters():  # float64 values that fp32 cannot hold
            p.copy_(torch.randn(p.shape, dtype=torch.float64))
    opt = NuP(model.named_parameters(), lr=0.1, fused=True)
    _backward(model, torch.float64)
    opt.step()
    assert all(not torch.equal(p, p.float().double()) for p in model.parameters())  # updated in float64
    before = [p.detach().clone() for p in model.parameters()]
    x, _ = _batch(torch.float64)
    x[0, 0] = float("nan")
    _backward(model, torch.float64, x=x)
    opt.step()
    assert opt.stat_vectors()["skipped"].tolist() == [1, 1, 1]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ---- failure 9: group-level values --------------------------------------------------------------------
BAD_GROUP_VALUES = [
    ({"lr": float("nan")}, "lr must be a finite number >= 0"),
    ({"lr": -0.1}, "lr must be a finite number >= 0"),
    ({"lr": True}, "lr must be a finite number >= 0"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0"),
    ({"scale": float("nan")}, "scale must be None or a finite number > 0"),
    ({"scale": -1.0}, "scale must be None or a finite number > 0"),
    ({"normalize_vectors": "no"}, "normalize_vectors must be True or False"),
]


@pytest.mark.parametrize(("values", "pattern"), BAD_GROUP_VALUES)
def test_group_values_are_checked_in_every_group(values, pattern):
    model = NuMLP(8, 3, 3, 2)
    w = [p for p in model.parameters()]
    with pytest.raises(ValueError, match=pattern):
        NuP([{"params": w[:1]}, {"params": w[1:], **values}], lr=0.1)
    opt = NuP([w[0]], lr=0.1)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": w[1:], **values})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("values", "pattern"), BAD_GROUP_VALUES[:5])
def test_load_state_dict_checks_group_values(values, pattern):
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.1)
    _backward(model)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0].update(values)
    with pytest.raises(ValueError, match=f"checkpoint: param group 0: {pattern}"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"lr": True}, "lr must be a finite number >= 0, got True"),
    ({"lr": 0.1, "recompute_every": 1.5}, "recompute_every must be an integer >= 1, got 1.5"),
    ({"lr": 0.1, "recompute_every": True}, "recompute_every must be an integer >= 1"),
    ({"lr": 0.1, "scale": float("nan")}, "scale must be None or a finite number > 0"),
])
def test_constructor_refuses_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NuP(NuMLP(8, 3, 3, 2).parameters(), **kwargs)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("lr", [float("nan"), -0.1, float("inf"), 1e38])
def test_a_mutated_group_lr_never_reaches_the_parameters(fused, lr):
    """A scheduler may set group['lr'] between steps; NaN, negative, infinite or overflowing rates are
    skipped on device (no host sync) and counted."""
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.1, fused=fused)
    _backward(model)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = lr
    for _ in range(3):
        opt.zero_grad()
        _backward(model)
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.stat_vectors()["skipped"].tolist() == [3, 3, 3]


@pytest.mark.parametrize("schedule", [
    lambda: GeometryAwareLR(target=float("nan")),
    lambda: GeometryAwareLR(gain=float("nan")),
    lambda: GeometryAwareLR(max_change=float("nan")),
    lambda: GeometryAwareLR(max_change=float("inf")),
    lambda: make_schedule("warmup_cosine", total_steps=2, min_mult=float("nan")),
    lambda: make_schedule("warmup_cosine", total_steps=2, min_mult=-1.0),
    lambda: make_schedule("warmup_cosine", total_steps=2.5),
])
def test_schedule_constructors_refuse_values_that_are_not_finite(schedule):
    with pytest.raises(ValueError, match="must be"):
        schedule()


# ---- deviation: finite but extreme gradients take their step ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1e19, 1e30, 3e38, 1e-23, 1e-30, 1e-44, "huge", "tiny"])
def test_finite_extreme_directions_take_their_step(dtype, value):
    if value == "huge":
        value = 1e300 if dtype == torch.float64 else 3.4e38
    if value == "tiny":
        value = 1e-320 if dtype == torch.float64 else 1e-45
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=dtype))
    opt = NuP([p], lr=0.5, scale=2.0)
    grad = torch.zeros(4, 3, dtype=dtype)
    grad[:, 0] = value
    grad[0, 1] = -value
    p.grad = grad
    opt.step()
    scaled = grad.double() / value  # exact: the entries are ±value and 0
    expected = -1.0 * scaled / torch.linalg.vector_norm(scaled)
    assert opt.stat_vectors()["skipped"].item() == 0
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=0)
    assert opt.stat_vectors()["update_norm"].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("value", [1e19, 3e38, 1e-30])
def test_wrapper_mode_does_not_mistake_an_extreme_gradient_for_a_non_finite_one(value):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = NuP([p], lr=0.5, scale=2.0, base=torch.optim.SGD([p], lr=1.0))
    p.grad = torch.full((4, 3), value)
    opt.step()
    assert opt.stat_vectors()["skipped"].item() == 0
    torch.testing.assert_close(p.detach(), torch.full((4, 3), -1.0 / math.sqrt(12)), rtol=1e-6, atol=0)


def test_zero_and_non_finite_directions_are_still_skipped():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = NuP([p], lr=0.5)
    for bad in (torch.zeros(3, 3), torch.full((3, 3), float("nan")), torch.tensor([[math.inf] + [0.0] * 8]).view(3, 3)):
        p.grad = bad
        opt.step()
        assert torch.equal(p, torch.ones(3, 3))
    assert opt.stat_vectors()["skipped"].item() == 3


# ---- failure 3 and the deviation "DCP's zero-grad init step is counted" -------------------------------
def _dcp_roundtrip(tmp_path, make_opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = NuMLP(8, 3, 3, 2)
    opt = make_opt(model)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        _backward(model)
        opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    fresh_model = NuMLP(8, 3, 3, 2)
    fresh_model.load_state_dict(saved)
    fresh = make_opt(fresh_model)
    state = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
    v = fresh.stat_vectors()  # the initialization step DCP ran is not counted
    assert v["step"] == 0 and v["skipped"].tolist() == [0, 0, 0] and fresh.schedule.steps_done == 0
    assert all(p.grad is None for p in fresh_model.parameters())
    assert all(torch.equal(p, saved[k]) for k, p in fresh_model.state_dict().items())
    dcp.load(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    set_optimizer_state_dict(fresh_model, fresh, state["optim"])
    return model, opt, fresh_model, fresh


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("kind", ["fused", "dropin-geometry", "adam"])
def test_dcp_load_into_a_fresh_optimizer_resumes_exactly(tmp_path, kind):
    def make_opt(model):
        if kind == "fused":
            return NuP(model.named_parameters(), lr=0.1, fused=True, schedule=GeometryAwareLR())
        if kind == "adam":
            return NuP(model.named_parameters(), lr=0.1, base=torch.optim.Adam(model.parameters(), lr=1.0))
        return NuP(model.named_parameters(), lr=0.1, schedule=GeometryAwareLR())

    model, opt, fresh_model, fresh = _dcp_roundtrip(tmp_path, make_opt)
    assert fresh.stat_vectors()["step"] == 3
    for m, o in ((model, opt), (fresh_model, fresh)):
        o.zero_grad(set_to_none=True)
        _backward(m)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True))
    assert torch.equal(opt.stat_vectors()["c_norm"], fresh.stat_vectors()["c_norm"])


def test_a_first_step_at_lr_zero_with_real_gradients_is_counted():
    """A warm-up scheduler may start at lr 0: only all-zero gradients make it DCP's initialization."""
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.0)
    _backward(model)
    opt.step()
    assert opt.stat_vectors()["step"] == 1


def test_a_real_zero_gradient_step_at_lr_zero_after_training_is_counted():
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.1)
    _backward(model)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.stat_vectors()["step"] == 2


# ---- deviation: checkpoints of another kind ---------------------------------------------------------
def _trained_state(**kwargs):
    model = NuMLP(8, 3, 3, 2)
    opt = NuP(model.named_parameters(), lr=0.1, **kwargs)
    _backward(model)
    opt.step()
    return model, opt.state_dict()


def test_load_refuses_a_checkpoint_of_another_schedule():
    model, sd = _trained_state(schedule=GeometryAwareLR())
    opt = NuP(model.named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="checkpoint: saved with schedule 'geometry_cosine', this NuP has 'constant'"):
        opt.load_state_dict(sd)
    model, sd = _trained_state()
    with pytest.raises(ValueError, match="saved with schedule 'constant', this NuP has 'geometry_cosine'"):
        NuP(model.named_parameters(), lr=0.1, schedule=GeometryAwareLR()).load_state_dict(sd)


def test_load_refuses_a_checkpoint_with_another_base():
    model, sd = _trained_state()
    opt = NuP(model.named_parameters(), lr=0.1, base=torch.optim.Adam(model.parameters(), lr=1.0))
    with pytest.raises(ValueError, match="checkpoint: saved without a base optimizer, this NuP wraps Adam"):
        opt.load_state_dict(sd)
    model = NuMLP(8, 3, 3, 2)
    base = torch.optim.Adam(model.parameters(), lr=1.0)
    opt = NuP(model.named_parameters(), lr=0.1, base=base)
    _backward(model)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="checkpoint: saved with base optimizer Adam, this NuP has none"):
        NuP(model.named_parameters(), lr=0.1).load_state_dict(sd)




@pytest.mark.filterwarnings("ignore")
def test_dcp_init_step_on_fsdp2_shards_is_not_counted(tmp_path):
    """One gloo process: parameters and gradients are DTensors; the ranks' decision is all-reduced."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from nup.distributed import fully_shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = fully_shard_model(NuMLP(8, 3, 3, 2))
        opt = NuP(model.named_parameters(), lr=0.1, schedule=GeometryAwareLR())
        state = get_optimizer_state_dict(model, opt)
        assert opt.stat_vectors()["step"] == 0 and opt.schedule.steps_done == 0
        assert "lam" in state["param_groups"][0]["nup"]["schedule"]
        assert len(state["state"]) == 3  # a cumulative buffer per tensor
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [1e19, 1e30, 1e-23, 1e-30])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fused_cpu_step_does_not_care_about_the_gradients_scale(value, bias, monkeypatch):
    """The fused CPU path (BLAS + one loop): a loss scaled by ``value`` scales every G by it; the normalized
    step, the statistics and the skip count are those of the unscaled loss."""
    monkeypatch.setenv("NUP_BACKEND", "reference")
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3

    def one_step(scale: float) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = NuMLP(8, 3, 3, 2, bias=bias, **({"activation": "tanh", "sigma_b2": 0.3} if bias else {}))
        opt = NuP(model.named_parameters(), lr=0.1, fused=True)
        (scale * torch.nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()], opt.stat_vectors()

    ref, ref_stats = one_step(1.0)
    got, stats = one_step(value)
    assert stats["skipped"].sum().item() == 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["update_norm"], ref_stats["update_norm"], rtol=1e-5, atol=0)


def test_fused_cpu_float64_agrees_with_the_float64_drop_in_step(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "reference")
    x, y = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 3
    params = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = NuMLP(8, 3, 3, 2).double()
        opt = NuP(model.named_parameters(), lr=0.1, fused=fused)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.stat_vectors()["skipped"].sum().item() == 0
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64 arithmetic on both paths


@pytest.mark.parametrize("value", [1e200, 1e-200])
def test_fused_cpu_float64_step_does_not_care_about_the_gradients_scale(value, monkeypatch):
    """float64 on the fused CPU path: a G beyond the float64 sum of squares' range takes its step."""
    monkeypatch.setenv("NUP_BACKEND", "reference")
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 3
    params = []
    for scale in (1.0, value):
        torch.manual_seed(0)
        model = NuMLP(8, 3, 3, 2).double()
        opt = NuP(model.named_parameters(), lr=0.1, fused=True)
        (scale * F.cross_entropy(model(x), y)).backward()
        opt.step()
        assert opt.stat_vectors()["skipped"].sum().item() == 0
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
