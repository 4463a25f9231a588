"""Wrapper mode's CPU loop (copy, base step, one loop per tensor) against the generic clone/sub/copy path."""

import copy

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP


def _run(monkeypatch, loop: str, base_name: str, steps: int = 4, recompute_every: int = 3):
    monkeypatch.setenv("NUP_CPU_LOOP", loop)
    torch.manual_seed(0)
    model = NuMLP(7, 3, 4, 2, activation="tanh", bias=True, sigma_b2=0.3)
    make = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    }[base_name]
    opt = NuP(model.named_parameters(), lr=0.05, base=make(model.parameters()), recompute_every=recompute_every)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 7, generator=g), torch.randint(0, 3, (11,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("base_name", ["adam", "momentum"])
def test_cpu_loop_equals_generic_path(monkeypatch, base_name):
    m1, o1 = _run(monkeypatch, "1", base_name)
    m2, o2 = _run(monkeypatch, "0", base_name)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    v1, v2 = o1.stat_vectors(), o2.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "coherence", "skipped"):
        torch.testing.assert_close(v1[key], v2[key], rtol=1e-4, atol=1e-6, msg=key)
    for p, q in zip(m1.parameters(), m2.parameters()):  # the base's state is its own in both
        for key, value in o2.base.state[q].items():
            torch.testing.assert_close(o1.base.state[p][key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loop", ["1", "0"])
def test_zero_gradient_leaves_parameters_bit_identical(monkeypatch, loop):
    monkeypatch.setenv("NUP_CPU_LOOP", loop)
    torch.manual_seed(0)
    model = NuMLP(5, 2, 3, 2)
    opt = NuP(model.parameters(), lr=0.1, base=torch.optim.Adam(model.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # what checkpoint loaders do to create state: Adam does not move, so ‖D‖ = 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach().view(torch.int32), b.view(torch.int32))
    v = opt.stat_vectors()
    assert v["skipped"].tolist() == [1, 1, 1]
    assert all(torch.isfinite(v[k]).all() for k in ("update_norm", "cos", "c_norm", "coherence"))


def test_non_finite_gradient_skips_the_base_on_the_generic_path(monkeypatch):
    monkeypatch.setenv("NUP_CPU_LOOP", "0")
    torch.manual_seed(0)
    model = NuMLP(5, 2, 3, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = NuP(model.parameters(), lr=0.1, base=base)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = copy.deepcopy(base.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    for key, s in base.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], state["state"][key]["momentum_buffer"])
    assert opt.stat_vectors()["skipped"].tolist() == [1, 1, 1]
