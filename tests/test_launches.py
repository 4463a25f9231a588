"""The launch budget of the fused step on the CUDA code path, counted on CPU (DESIGN.md "Launches")."""

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP, make_schedule
from nup.launches import count_launches, per_layer

#: DESIGN.md's budget: per layer per step, and per step independent of depth
PER_LAYER, CONSTANT = 6, 40


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    monkeypatch.delenv("NUP_UPDATE_PATH", raising=False)


def _fused_step(depth: int, schedule: str = "constant", **model_kw):
    torch.manual_seed(0)
    model = NuMLP(8, 3, depth, 1, **model_kw)
    sched = make_schedule(schedule, total_steps=100)
    opt = NuP(model.named_parameters(), lr=0.1, fused=True, recompute_every=1000, schedule=sched)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


@pytest.mark.parametrize(
    "model_kw", [{}, {"activation": "tanh", "bias": True, "sigma_b2": 0.3}], ids=["relu", "tanh-bias"]
)
@pytest.mark.parametrize("schedule", ["constant", "geometry"])  # geometry: the default of nup.train
def test_fused_step_is_within_the_launch_budget(model_kw, schedule):
    counts = per_layer(lambda d: _fused_step(d, schedule, **model_kw))
    assert counts["per_layer"] <= PER_LAYER, counts
    assert counts["constant"] <= CONSTANT, counts


@pytest.mark.parametrize("schedule", ["geometry_per_layer", "geometry_cosine", "warmup_cosine"])
def test_the_schedule_costs_no_launch_of_its_own(schedule):
    """Every schedule's update runs inside the one step-tail launch: the same count as the constant λ."""
    assert per_layer(lambda d: _fused_step(d, schedule)) == per_layer(lambda d: _fused_step(d))


def test_counter_sees_torch_ops_and_triton_launches_but_not_views():
    from nup_kernels.linear_act import linear_act_forward

    x, w = torch.randn(4, 5), torch.randn(3, 5)
    with count_launches() as c:
        x.t().unsqueeze(0)[0].view(5, 4)  # views: nothing
        torch.mm(x, w.t())  # one torch op
        linear_act_forward(x, w, None, 1.0, 0.0, "relu")  # one Triton launch
    assert c.torch_ops == ["mm"]
    assert len(c.triton) == 1
