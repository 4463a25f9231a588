"""nup.graphed_step: one call per training step (a CUDA graph on GPU, eager on CPU), and what capture
needs from a warmed-up step: no host sync and no new persistent storage (state kept in place)."""

import copy

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP, graphed_step, make_schedule
from nup.launches import count_launches


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _setup(fused: bool, device="cpu", bias=False):
    torch.manual_seed(0)
    kw = {"activation": "tanh", "bias": True, "sigma_b2": 0.3} if bias else {}
    model = NuMLP(7, 3, 4, 2, **kw).to(device)
    opt = NuP(model.named_parameters(), lr=0.05, fused=fused, schedule=make_schedule("geometry"))
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(9, 7, generator=g).to(device), torch.randint(0, 3, (9,), generator=g).to(device))
    return model, opt, batch


def _storage(model, opt) -> dict:
    """data_ptr of every persistent tensor the step writes: parameters, optimizer state, statistics,
    the fused path's per-step buffers and the schedule's multiplier, clock and controller state."""
    out = {f"param{i}": p.data_ptr() for i, p in enumerate(model.parameters())}
    for i, p in enumerate(model.parameters()):
        out |= {f"state{i}.{k}": v.data_ptr() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    out |= {f"global.{k}": v.data_ptr() for k, v in opt.state["nup"].items() if torch.is_tensor(v)}
    if opt._fused is not None:
        out |= {f"fused.{k}": v.data_ptr() for k, v in opt._fused.buffers.items() if torch.is_tensor(v)}
    out["lam"] = opt.schedule.lam.data_ptr()
    out["clock"] = opt.schedule.clock.data_ptr()
    out |= {f"schedule.{k}": getattr(opt.schedule, k).data_ptr() for k in opt.schedule._state_names}
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "drop-in"])
def test_graphed_step_on_cpu_is_the_eager_step(fused):
    m1, o1, batch = _setup(fused)
    m2, o2 = copy.deepcopy(m1), None
    o2 = NuP(m2.named_parameters(), lr=0.05, fused=fused, schedule=make_schedule("geometry"))
    step = graphed_step(m2, o2, _loss, batch)
    for _ in range(3):
        o1.zero_grad()
        _loss(m1, batch).backward()
        o1.step()
        step(batch)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o1.stat_vectors()["step"] == o2.stat_vectors()["step"] == 3


@pytest.mark.parametrize("bias", [False, True], ids=["relu", "tanh-bias"])
def test_warmed_up_fused_step_on_the_cuda_code_path_keeps_storage_and_never_syncs(monkeypatch, bias):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    model, opt, batch = _setup(True, bias=bias)
    step = graphed_step(model, opt, _loss, batch)
    step(batch)
    step(batch)
    before = _storage(model, opt)
    with count_launches() as c:
        step(batch)
    assert _storage(model, opt) == before  # every persistent tensor written in place
    syncs = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero"}
    assert not syncs & set(c.torch_ops), c.torch_ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "drop-in"])
def test_graphed_step_on_gpu_equals_eager(fused):
    m1, o1, batch = _setup(fused, "cuda")
    m2 = copy.deepcopy(m1)
    o2 = NuP(m2.named_parameters(), lr=0.05, fused=fused, schedule=make_schedule("geometry"))
    warmup = 3
    step = graphed_step(m2, o2, _loss, batch, warmup=warmup)
    for _ in range(warmup + 4):
        o1.zero_grad()
        _loss(m1, batch).backward()
        o1.step()
    for _ in range(4):
        step(batch)
    torch.cuda.synchronize()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert o2.stat_vectors()["step"] == o1.stat_vectors()["step"] == warmup + 4
