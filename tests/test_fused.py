"""The fused path (updates inside backward) against the drop-in path, on both backends."""

import copy

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP, make_schedule

STAT_KEYS = ("update_norm", "cos", "c_norm", "coherence", "lr", "multiplier", "skipped")


def _pair(activation="relu", depth=4, m=2, bias=False, sigma_b2=0.0, cumulative="delta", schedule="geometry"):
    torch.manual_seed(0)
    model = NuMLP(7, 3, depth, m, activation=activation, bias=bias, sigma_b2=sigma_b2)
    twin = copy.deepcopy(model)
    drop_in = NuP(
        model.named_parameters(), lr=0.1, schedule=make_schedule(schedule), cumulative=cumulative, recompute_every=3
    )
    fused = NuP(
        twin.named_parameters(),
        lr=0.1,
        schedule=make_schedule(schedule),
        cumulative=cumulative,
        recompute_every=3,
        fused=True,
    )
    return (model, drop_in), (twin, fused)


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _data(batch=17):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 7, generator=g), torch.randint(0, 3, (batch,), generator=g)


def _assert_same(a, b, rtol=2e-5, atol=2e-6):
    (m1, o1), (m2, o2) = a, b
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in STAT_KEYS:
        torch.testing.assert_close(v1[key], v2[key], rtol=rtol * 10, atol=atol * 10, msg=key)
    assert v1["step"] == v2["step"]


CASES = [
    dict(activation="relu"),
    dict(activation="tanh", bias=True, sigma_b2=0.3),
    dict(activation="abs", cumulative="init"),
    dict(activation="gelu", schedule="geometry_per_layer"),
]


@pytest.mark.parametrize("path", ["small_batch", "materialized"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fused_equals_drop_in_over_five_steps_reference(case, path, monkeypatch):
    monkeypatch.setenv("NUP_UPDATE_PATH", path)
    monkeypatch.setenv("NUP_BACKEND", "reference")
    a, b = _pair(**case)
    x, y = _data()
    for _ in range(5):
        _step(*a, x, y)
        _step(*b, x, y)
        _assert_same(a, b)
    assert all(p.grad is None for p in b[0].parameters())  # the fused path never writes .grad


@pytest.mark.parametrize("path", ["small_batch", "materialized"])
@pytest.mark.parametrize("case", CASES[:2], ids=["relu", "tanh-bias"])
def test_fused_equals_drop_in_over_five_steps_triton(case, path, monkeypatch):
    monkeypatch.setenv("NUP_UPDATE_PATH", path)
    monkeypatch.setenv("NUP_BACKEND", "triton")
    a, b = _pair(depth=3, **case)
    x, y = _data()
    for _ in range(5):
        _step(*a, x, y)
        _step(*b, x, y)
    _assert_same(a, b)


def test_fused_triton_runs_are_bitwise_equal(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    x, y = _data()
    runs = []
    for _ in range(2):
        _, (model, opt) = _pair(depth=3)
        for _ in range(3):
            _step(model, opt, x, y)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.stat_vectors()))
    for p, q in zip(runs[0][0], runs[1][0]):
        assert torch.equal(p, q)
    for key in STAT_KEYS:
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key


def test_fused_skips_non_finite_updates(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "reference")
    _, (model, opt) = _pair()
    x, y = _data()
    _step(model, opt, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    _step(model, opt, x_bad, y)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach().view(torch.int32), q.view(torch.int32))
    v = opt.stat_vectors()
    assert v["skipped"].tolist() == [1, 1, 1, 1]
    assert all(torch.isfinite(v[k]).all() for k in ("cos", "c_norm", "update_norm", "multiplier"))


def test_fused_refuses_what_it_cannot_honour():
    torch.manual_seed(0)
    model = NuMLP(7, 3, 3, 2)
    with pytest.raises(ValueError, match="base optimizer"):
        NuP(model.parameters(), lr=0.1, fused=True, base=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="NuMLP layer"):
        NuP(nn.Linear(3, 3).parameters(), lr=0.1, fused=True)
    with_bias = NuMLP(7, 3, 3, 2, activation="tanh", bias=True, sigma_b2=0.3)
    with pytest.raises(ValueError, match="same optimizer"):
        NuP([with_bias.layers[0].weight], lr=0.1, fused=True)
    opt = NuP(model.parameters(), lr=0.1, fused=True)
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        nn.functional.cross_entropy(model(x), y).backward()
    del opt


def test_fused_triton_path_change_between_steps_keeps_the_dots_exact(monkeypatch):
    # batch 17 runs the small-batch kernel (64×64 tiles), batch 80 the materialized one (32×128):
    # partials a previous path left in the per-step dot buffer must not count.
    monkeypatch.setenv("NUP_BACKEND", "triton")
    monkeypatch.delenv("NUP_UPDATE_PATH", raising=False)
    a, b = _pair(depth=4, m=6)  # the (54, 24) layer: 1 small-batch program, 2 materialized ones
    g = torch.Generator().manual_seed(4)
    for batch in (80, 80, 17):  # C is 0 at the first step: its partials are 0
        x, y = torch.randn(batch, 7, generator=g), torch.randint(0, 3, (batch,), generator=g)
        _step(*a, x, y)
        _step(*b, x, y)
        _assert_same(a, b)
