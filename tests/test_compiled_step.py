"""The drop-in step has no data-dependent Python branch: torch.compile(opt.step, fullgraph=True) works
after one eager step has made the state (made inside a graph, two zero vectors came back aliased); the
model's forward compiles with fullgraph=True too."""

import copy

import pytest
import torch
from torch import nn

from nup import NuMLP, NuP


def _setup():
    torch.manual_seed(0)
    model = NuMLP(6, 3, 3, 2)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    return model, x, y


def test_compiled_step_fullgraph_matches_eager():
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    eager = NuP(model.named_parameters(), lr=0.05)
    compiled_opt = NuP(twin.named_parameters(), lr=0.05)
    compiled = torch.compile(compiled_opt.step, fullgraph=True)
    for i in range(4):  # the first step eager (it makes the state), then compiled
        twin_step = compiled_opt.step if i == 0 else compiled
        for m, step, opt in ((model, eager.step, eager), (twin, twin_step, compiled_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    a, b = eager.stat_vectors(), compiled_opt.stat_vectors()
    for key in ("update_norm", "cos", "c_norm", "skipped"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_compiled_step_skips_a_non_finite_gradient():
    model, x, y = _setup()
    opt = NuP(model.named_parameters(), lr=0.05)
    step = torch.compile(opt.step, fullgraph=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # eager: makes the state
    nn.functional.cross_entropy(model(x), y).backward()
    model.layers[1].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    step()
    after = list(model.parameters())
    assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])
    assert opt.stat_vectors()["skipped"].tolist() == [0, 1, 0]


def test_compiling_the_first_step_is_refused_with_a_clear_error():
    model, x, y = _setup()
    opt = NuP(model.named_parameters(), lr=0.05)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(Exception, match="run one eager opt.step"):
        torch.compile(opt.step, fullgraph=True)()


def test_compiled_model_fullgraph_matches_eager():
    """NuMLP's forward (α kept as a tensor, made again only for a new dtype or device) has no graph break:
    torch.compile(model, fullgraph=True) gives eager's outputs and gradients."""
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    for m in (model, compiled):
        nn.functional.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
