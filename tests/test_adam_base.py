"""Wrapper mode's fast CPU path for a torch Adam/AdamW base (:mod:`nup.adam_base`) against the generic
wrapper step (the base steps P, NuP reads what it moved) and against torch's Adam formulas."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from nup import NuP, adam_base
from nup_kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.loop_available(), reason="needs the compiled CPU loops (a C compiler)")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 3))


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(11, 7, generator=gen), torch.randint(0, 3, (11,), generator=gen)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


BASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam_l2_maximize": lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.1, maximize=True, eps=1e-6),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.3, betas=(0.8, 0.95)),
    "adamw_tensor_lr": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(0.01), weight_decay=0.05),
    "two_groups": lambda ps: torch.optim.Adam([{"params": ps[:2], "betas": (0.5, 0.9)}, {"params": ps[2:]}],
                                              lr=0.03),
}


def _run(base_name, steps, fast, monkeypatch, lr=0.05):
    model = _mlp()
    params = list(model.parameters())
    base = BASES[base_name](params)
    opt = NuP(params, lr=lr, base=base, schedule=None)
    calls = []
    moments = cpu.adam_moments
    with monkeypatch.context() as m:
        m.setattr(cpu, "adam_moments", lambda *a: calls.append(1) or moments(*a))
        if not fast:
            m.setattr(adam_base, "takes", lambda *a: False)
        for t in range(steps):
            _backward(model, t)
            opt.step()
    return model, base, opt, len(calls)


@pytest.mark.parametrize("base_name", list(BASES))
def test_fast_path_takes_the_generic_wrapper_step(base_name, monkeypatch):
    fast, fast_base, fast_opt, calls = _run(base_name, 5, True, monkeypatch)
    slow, slow_base, slow_opt, none = _run(base_name, 5, False, monkeypatch)
    n = len(list(fast.parameters()))
    assert calls == 4 * n and none == 0  # the first step is torch's own (it makes the state), then every tensor
    for p, q in zip(fast.parameters(), slow.parameters()):
        # the generic D = P_t − P_base loses the low bits of P; the fast path forms D itself
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        for key, value in slow_base.state[q].items():
            torch.testing.assert_close(fast_base.state[p][key], value, rtol=2e-5, atol=1e-8)  # P differs a little
    a, b = fast_opt.stat_vectors(), slow_opt.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "lr", "skipped"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert a["step"] == b["step"] == 5


def test_moment_loop_is_torchs_adam_step(monkeypatch):
    """One loop per tensor: the moments torch's Adam leaves and ‖D‖² of what it subtracts, awkward sizes."""
    for n in (1, 7, 1031):
        gen = torch.Generator().manual_seed(n)
        p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        ref = p.clone().requires_grad_()
        base = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.2, betas=(0.8, 0.9))
        ref.grad = torch.randn(n, generator=gen)
        base.step()  # a state at step 1
        state = {k: v.clone() for k, v in base.state[ref].items()}
        before = ref.detach().clone()
        ref.grad = g.clone()
        base.step()
        moved = before - ref.detach()
        h = adam_base.hyper(base.param_groups[0], 2.0, True)
        m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        d_sq = cpu.adam_moments(before.clone(), g, m, v, h)
        torch.testing.assert_close(m, base.state[ref]["exp_avg"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v, base.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-10)
        assert d_sq == pytest.approx(float(moved.double().square().sum()), rel=1e-4)
        c = torch.randn(n, generator=gen)
        q, c0 = before.clone(), c.clone()
        dot = cpu.adam_apply(q, m, v, c, h, -0.5)
        d = m / (v.sqrt() / h[6] + h[7]) * h[5] + h[8] * before
        torch.testing.assert_close(q, before - 0.5 * d)
        torch.testing.assert_close(c, c0 - 0.5 * d)
        assert dot == pytest.approx(float(torch.dot(d, c0)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", ["amsgrad", "subclass", "hook", "nup_weight_decay", "no_loop", "sgd"])
def test_other_bases_and_options_take_the_generic_path(case, monkeypatch):
    model = _mlp()
    params = list(model.parameters())
    kwargs = {}
    if case == "amsgrad":
        base = torch.optim.Adam(params, lr=0.01, amsgrad=True)
    elif case == "subclass":
        base = type("MyAdam", (torch.optim.Adam,), {})(params, lr=0.01)
    elif case == "sgd":
        base = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        base = torch.optim.Adam(params, lr=0.01)
    if case == "hook":
        base.register_step_post_hook(lambda *a: None)
    if case == "nup_weight_decay":
        kwargs["weight_decay"] = 0.1
    if case == "no_loop":
        monkeypatch.setenv("NUP_CPU_LOOP", "0")
    opt = NuP(params, lr=0.05, base=base, **kwargs)
    calls = []
    monkeypatch.setattr(cpu, "adam_moments", lambda *a: calls.append(1))
    for t in range(3):
        _backward(model, t)
        opt.step()
    assert calls == [] and opt.stat_vectors()["step"] == 3


def test_a_non_finite_gradient_skips_the_base_too(monkeypatch):
    model = _mlp()
    params = list(model.parameters())
    base = torch.optim.Adam(params, lr=0.01)
    opt = NuP(params, lr=0.05, base=base)
    for t in range(2):
        _backward(model, t)
        opt.step()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(base.state_dict())
    _backward(model, 5)
    params[2].grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = base.state_dict()
    for k, v in state["state"].items():
        for key, t in v.items():
            assert torch.equal(after["state"][k][key], t), key  # the step count too
    assert opt.stat_vectors()["skipped"].tolist() == [1] * len(params)


def test_a_scheduler_on_the_base_sees_its_step_and_checkpoints_cross_paths(monkeypatch):
    model = _mlp()
    params = list(model.parameters())
    base = torch.optim.Adam(params, lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    opt = NuP(params, lr=0.05, base=base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for t in range(3):
            _backward(model, t)
            opt.step()
            sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    # the state the fast path leaves resumes on the generic path, and the other way round
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), base.state_dict()))
    runs = []
    for fast in (True, False):
        state = copy.deepcopy(saved)  # loading aliases the saved tensors, which a step then updates in place
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        base.load_state_dict(state[2])
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(adam_base, "takes", lambda *a: False)
            _backward(model, 9)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_a_base_step_too_small_for_fp32_still_moves_by_eta_s(monkeypatch):
    """Adam at lr 1e-30: P_t − P_base is 0 in fp32 (the generic path skips); the fast path has D itself."""
    model = _mlp()
    params = list(model.parameters())
    opt = NuP(params, lr=0.05, base=torch.optim.Adam(params, lr=1e-30))
    for t in range(3):
        before = [p.detach().clone() for p in params]
        _backward(model, t)
        opt.step()
    moved = torch.stack([(p.detach() - b).norm() for p, b in zip(params, before)])
    weights = torch.tensor([p.dim() == 2 for p in params])  # normalized; a bias steps by 1e-30·‖D‖ (lost in fp32)
    torch.testing.assert_close(moved[weights], opt.stat_vectors()["update_norm"][weights], rtol=1e-4, atol=0)
    assert (moved[weights] > 0).all()
    assert opt.stat_vectors()["skipped"].tolist() == [1] * len(params)  # the first, generic step only: D = 0
