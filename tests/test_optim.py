"""NuP on the reference path: normalization, geometry statistics, edge cases, checkpoints."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP, make_schedule
from nup.optim import default_scale


def _data(n=24, d=6, k=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _model(depth=4, m=2, **kw):
    torch.manual_seed(0)
    return NuMLP(6, 3, depth, m, **kw)


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _bits(t):
    return t.detach().contiguous().view(torch.int32).clone()


def test_first_step_has_norm_lr_times_scale():
    model, (x, y) = _model(), _data()
    opt = NuP(model.named_parameters(), lr=0.03)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, x, y)
    for p, p0 in zip(model.parameters(), before):
        torch.testing.assert_close((p - p0).norm(), torch.tensor(0.03 * p._nup_meta.scale), rtol=1e-5, atol=0)
    v = opt.stat_vectors()
    scales = torch.tensor([p._nup_meta.scale for p in model.parameters()])
    torch.testing.assert_close(v["update_norm"], 0.03 * scales)
    assert torch.equal(v["cos"], torch.zeros_like(v["cos"]))  # C_0 = 0: cos defined as 0


def _spec_reference(model, x, y, lr, steps):
    """SPEC §2–3 written out by hand, one tensor at a time, in float64."""
    params = [p.detach().double().clone() for p in model.parameters()]
    cum = [torch.zeros_like(p) for p in params]
    records = []
    shadow = copy.deepcopy(model).double()
    for _ in range(steps):
        for sp, p in zip(shadow.parameters(), params):
            sp.data.copy_(p)
        shadow.zero_grad()
        nn.functional.cross_entropy(shadow(x.double()), y).backward()
        step = []
        for i, sp in enumerate(shadow.parameters()):
            d = sp.grad
            delta = -lr * sp._nup_meta.scale * d / d.norm()
            u, cn = delta.norm(), cum[i].norm()
            cos = (delta * cum[i]).sum() / (u * cn) if cn > 0 else torch.tensor(0.0, dtype=torch.float64)
            params[i] += delta
            cum[i] += delta
            step.append((u.item(), cos.item(), cum[i].norm().item()))
        records.append(step)
    return params, records


def test_three_steps_match_a_hand_written_reference():
    model, (x, y) = _model(depth=5), _data()
    ref_params, records = _spec_reference(model, x, y, lr=0.05, steps=3)
    opt = NuP(model.parameters(), lr=0.05)
    for t in range(3):
        _train(model, opt, 1, x, y)
        v = opt.stat_vectors()
        exp = torch.tensor(records[t], dtype=torch.float32)
        torch.testing.assert_close(v["update_norm"], exp[:, 0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v["cos"], exp[:, 1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v["c_norm"], exp[:, 2], rtol=1e-5, atol=1e-6)
    for p, r in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cumulative", ["delta", "init"])
def test_c_norm_identity_tracks_the_exact_norm(cumulative):
    model, (x, y) = _model(depth=4, m=3), _data()
    p0 = [p.detach().clone() for p in model.parameters()]
    opt = NuP(
        model.parameters(), lr=0.2, cumulative=cumulative, recompute_every=10_000, schedule=make_schedule("geometry")
    )
    for _ in range(40):
        _train(model, opt, 1, x, y)
        v = opt.stat_vectors()
        assert (v["cos"].abs() <= 1).all()
        exact = torch.stack([(p - q).norm() for p, q in zip(model.parameters(), p0)])
        torch.testing.assert_close(v["c_norm"], exact, rtol=1e-4, atol=1e-5)
        assert ((v["coherence"] >= 0) & (v["coherence"] <= 1 + 1e-5)).all()


def test_recompute_every_resets_to_the_exact_norm():
    model, (x, y) = _model(), _data()
    opt = NuP(model.parameters(), lr=0.1, recompute_every=3)
    _train(model, opt, 3, x, y)
    exact = torch.stack([opt.state[p]["cumulative"].norm() for p in model.parameters()])
    assert torch.equal(opt.stat_vectors()["c_norm"], exact)


def test_cos_and_coherence_of_ballistic_and_reversing_motion():
    p = nn.Parameter(torch.zeros(4, 4))
    opt = NuP([p], lr=1.0)
    g = torch.randn(4, 4)
    for sign, expected_cos in ((1, 0.0), (1, 1.0), (1, 1.0), (-1, -1.0)):
        p.grad = sign * g
        opt.step()
        torch.testing.assert_close(opt.stat_vectors()["cos"][0], torch.tensor(expected_cos), atol=1e-6, rtol=0)
    # three steps forward, one back: |C| = 2u, path = 4u
    torch.testing.assert_close(opt.stat_vectors()["coherence"][0], torch.tensor(0.5), atol=1e-6, rtol=0)


def test_zero_gradient_step_leaves_parameters_bit_identical():
    model = _model()
    opt = NuP(model.parameters(), lr=0.1, schedule=make_schedule("geometry"))
    with torch.no_grad():
        model.layers[1].weight[0, 0] = -0.0
    before = [_bits(p) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(_bits(p), b)
    v = opt.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "coherence", "multiplier"):
        assert torch.isfinite(v[key]).all(), key
    assert v["skipped"].tolist() == [1] * len(before)
    assert torch.equal(v["multiplier"], torch.ones_like(v["multiplier"]))  # nothing moved: λ kept


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_only_that_tensor(bad):
    model, (x, y) = _model(), _data()
    opt = NuP(model.parameters(), lr=0.1)
    _train(model, opt, 2, x, y)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    params[1].grad[0, 0] = bad
    before = [_bits(p) for p in params]
    cum_before = _bits(opt.state[params[1]]["cumulative"])
    opt.step()
    assert torch.equal(_bits(params[1]), before[1])
    assert torch.equal(_bits(opt.state[params[1]]["cumulative"]), cum_before)
    assert not torch.equal(_bits(params[0]), before[0])
    v = opt.stat_vectors()
    assert v["skipped"].tolist() == [0, 1, 0, 0]
    for key in ("update_norm", "cos", "c_norm", "coherence", "lr", "multiplier"):
        assert torch.isfinite(v[key]).all(), key
    for p in params:
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["cumulative"]).all()


def _run(make_opt, steps, save_at=None):
    model, (x, y) = _model(depth=4), _data()
    opt = make_opt(model)
    for t in range(steps):
        if t == save_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=False)
            model = _model(depth=4)
            model.load_state_dict(ckpt["model"])
            opt = make_opt(model)
            opt.load_state_dict(ckpt["opt"])
        _train(model, opt, 1, x, y)
    return model, opt


@pytest.mark.parametrize("kind", ["sgd_geometry", "adam_wrapper", "momentum_per_layer"])
def test_resume_is_bit_exact(kind):
    def make_opt(model):
        if kind == "sgd_geometry":
            return NuP(model.named_parameters(), lr=0.1, schedule=make_schedule("geometry"), recompute_every=4)
        if kind == "adam_wrapper":
            base = torch.optim.Adam(model.parameters(), lr=1e-3)
            return NuP(model.parameters(), lr=0.1, base=base, schedule=make_schedule("geometry"))
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return NuP(model.parameters(), lr=0.1, base=base, schedule=make_schedule("geometry_per_layer"))

    m1, o1 = _run(make_opt, 7)
    m2, o2 = _run(make_opt, 7, save_at=4)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(_bits(p), _bits(q))
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "coherence", "lr", "multiplier", "skipped"):
        assert torch.equal(v1[key], v2[key]), key
    assert v1["step"] == v2["step"] == 7


@pytest.mark.parametrize("base_name", ["momentum", "adam"])
def test_wrapper_mode_normalizes_the_base_step_and_leaves_its_state_alone(base_name):
    model, (x, y) = _model(), _data()
    twin = copy.deepcopy(model)
    make = {
        "momentum": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }[base_name]
    base, twin_base = make(model.parameters()), make(twin.parameters())
    opt = NuP(model.parameters(), lr=0.07, base=base)
    for _ in range(3):
        before = [p.detach().clone() for p in twin.parameters()]
        # the twin runs the base optimizer alone from the same point
        for tp, p in zip(twin.parameters(), model.parameters()):
            tp.data.copy_(p.data)
        twin_base.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        twin_base.step()
        before = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, 1, x, y)
        for p, p0, tp in zip(model.parameters(), before, twin.parameters()):
            d = p0 - tp.detach()  # what the base alone moved
            expected = p0 - 0.07 * p._nup_meta.scale * d / d.norm()
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    # the base's state is the base's own (same as the twin's, which ran without NuP)
    for p, tp in zip(model.parameters(), twin.parameters()):
        for key, value in twin_base.state[tp].items():
            torch.testing.assert_close(base.state[p][key], value, rtol=1e-5, atol=1e-7)


def test_torch_lr_scheduler_composes_and_group_lr_stays_the_users():
    model, (x, y) = _model(), _data()
    opt = NuP(model.parameters(), lr=0.1, schedule=make_schedule("geometry"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        lam = opt.schedule.multiplier(4, "cpu").clone()
        _train(model, opt, 1, x, y)
        lrs.append(opt.param_groups[0]["lr"])
        # the effective lr is the scheduler's group lr times the multiplier of that step
        torch.testing.assert_close(opt.stat_vectors()["lr"], lrs[-1] * lam)
        sched.step()
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_step_closure_and_named_stats():
    model, (x, y) = _model(), _data()
    opt = NuP(model.named_parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and math.isfinite(loss.item())
    stats = opt.stats()
    assert list(stats["params"]) == [n for n, _ in model.named_parameters()]
    assert set(stats["params"]["layers.0.weight"]) == {"update_norm", "cos", "c_norm", "coherence", "lr", "skipped"}
    assert stats["global"]["step"] == 1


def test_step_never_syncs_with_the_host(monkeypatch):
    """On a device with a queue (CUDA) step() must not read any value back; emulated here on CPU."""
    import nup.optim

    monkeypatch.setattr(nup.optim, "host_readable", lambda t: False)
    model, (x, y) = _model(), _data()
    opt = NuP(model.parameters(), lr=0.1, schedule=make_schedule("geometry"), recompute_every=2)
    _train(model, opt, 1, x, y)
    nn.functional.cross_entropy(model(x), y).backward()

    def forbidden(*a, **k):
        raise AssertionError("host sync inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    opt.step()  # a recompute step too


def test_generic_model_uses_the_documented_default_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = NuP(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 8)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert default_scale(model[0].weight) == math.sqrt(32 / 8)
    for p, p0, g in zip(model.parameters(), before, grads):
        if p.dim() == 2:
            torch.testing.assert_close((p - p0).norm(), torch.tensor(0.1 * default_scale(p)), rtol=1e-5, atol=0)
        else:  # vectors: plain −η·g unless asked
            torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


def test_per_group_scale_override_and_add_param_group():
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(5))
    opt = NuP([{"params": [a], "scale": 2.0}], lr=0.5)
    opt.add_param_group({"params": [b], "scale": 3.0})
    a.grad, b.grad = torch.randn(3, 3), torch.randn(5)
    opt.step()
    torch.testing.assert_close(opt.stat_vectors()["update_norm"], torch.tensor([1.0, 1.5]))


def test_foreach_off_equals_foreach_on():
    (x, y) = _data()
    runs = []
    for foreach in (True, False):
        model = _model()
        opt = NuP(model.parameters(), lr=0.1, foreach=foreach, schedule=make_schedule("geometry"))
        _train(model, opt, 4, x, y)
        runs.append(([p.detach() for p in model.parameters()], opt.stat_vectors()))
    for p, q in zip(runs[0][0], runs[1][0]):
        assert torch.equal(p, q)
    assert torch.equal(runs[0][1]["cos"], runs[1][1]["cos"])


def test_bad_arguments_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="lr"):
        NuP(model.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="cumulative"):
        NuP(model.parameters(), lr=0.1, cumulative="sum")
    with pytest.raises(ValueError, match="same parameters"):
        NuP(model.parameters(), lr=0.1, base=torch.optim.SGD(list(model.parameters())[:1], lr=0.1))
    with pytest.raises(ValueError, match="fp32"):
        NuP(_model().to(torch.float64).parameters(), lr=0.1, cumulative="init")
    with pytest.raises(ValueError, match="empty"):
        NuP([], lr=0.1)


def test_tensors_without_gradients_are_left_alone_and_report_no_motion():
    model, (x, y) = _model(), _data()
    opt = NuP(model.parameters(), lr=0.1, schedule=make_schedule("geometry_per_layer"))
    _train(model, opt, 2, x, y)
    frozen = model.layers[1].weight
    before = frozen.detach().clone()
    c_norm = opt.stat_vectors()["c_norm"][1].clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    v = opt.stat_vectors()
    assert v["update_norm"][1] == 0 and v["cos"][1] == 0 and v["skipped"][1] == 0
    assert v["c_norm"][1] == c_norm  # its cumulative update is unchanged
    assert (v["update_norm"][[0, 2, 3]] > 0).all()


def test_wrapper_mode_skips_a_non_finite_gradient_and_keeps_the_base_state_finite():
    # Changed deliberately (issue #9/#13): a non-finite gradient now skips the whole step, the base's
    # included (GradScaler-like); before, only that tensor was skipped while the base stepped the others.
    model, (x, y) = _model(), _data()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = NuP(model.parameters(), lr=0.1, base=base)
    _train(model, opt, 1, x, y)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    params[2].grad[0, 0] = float("nan")
    before = [_bits(p) for p in params]
    base_before = copy.deepcopy(base.state_dict())
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(_bits(p), b)
    assert opt.stat_vectors()["skipped"].tolist() == [1, 1, 1, 1]
    for key, state in base.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(base_before["state"][key][name])), name
    for p in params:
        assert all(torch.isfinite(v).all() for v in base.state[p].values() if torch.is_tensor(v))
