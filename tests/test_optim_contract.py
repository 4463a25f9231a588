"""NuP's optimizer contract: weight decay, tensor lr, momentum/betas for cyclic schedulers, named
parameters, add_param_group and several bases in wrapper mode, sparse gradients, __repr__, the
public scales, and how vectors move in wrapper mode (a BatchNorm CNN and a LayerNorm transformer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nup
from nup import NuP


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batch(n: int = 32, d: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _backward(model: nn.Module, x=None, y=None) -> None:
    if x is None:
        x, y = _batch()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


# --- weight decay ---------------------------------------------------------------------------

def test_weight_decay_matches_a_hand_written_reference():
    model = _mlp()
    lr, wd = 0.1, 0.3
    opt = NuP([{"params": [model[0].weight, model[0].bias], "weight_decay": wd},
               {"params": [model[2].weight, model[2].bias], "weight_decay": 0.0}], lr=lr,
              schedule=nup.make_schedule("geometry"))
    ref = {id(p): p.detach().clone() for p in model.parameters()}
    for _ in range(4):
        lam = opt.schedule.multiplier(4, "cpu").clone()
        _backward(model)
        expected = {}
        for i, (p, decay) in enumerate(zip(model.parameters(), (wd, wd, 0.0, 0.0))):
            eta = lr * float(lam[i])
            g = p.grad
            step = -eta * math.sqrt(p.shape[0] / p.shape[1]) * g / g.norm() if p.dim() == 2 else -eta * g
            expected[id(p)] = ref[id(p)] * (1 - eta * decay) + step  # AdamW order: decay P_t, then step
        opt.step()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-6, atol=1e-7)
            ref[id(p)] = p.detach().clone()


@pytest.mark.parametrize("path", ["cpu_rebase", "init", "no_host_branch"])
def test_weight_decay_in_wrapper_mode_matches_a_hand_written_reference(path, monkeypatch):
    """Wrapper mode, base SGD(lr=0.5): matrices P·(1 − η·wd) − η·s·g/‖g‖, vectors P·(1 − η·wd) − 0.5·g,
    on each of the step's code paths (no_host_branch: the one CUDA and compiled steps take)."""
    model = _mlp()
    params = list(model.parameters())
    lr, wd = 0.1, 0.3
    opt = NuP(params, lr=lr, base=torch.optim.SGD(params, lr=0.5), weight_decay=wd,
              cumulative="init" if path == "init" else "delta")
    for step in range(3):
        if step == 1 and path == "no_host_branch":  # after the eager first step that makes the state
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        _backward(model)
        expected = []
        for p in params:
            g = p.grad
            step = -lr * math.sqrt(p.shape[0] / p.shape[1]) * g / g.norm() if p.dim() == 2 else -0.5 * g
            expected.append(p.detach() * (1 - lr * wd) + step)
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def test_weight_decay_stays_outside_the_update_geometry():
    """The normalized step keeps ‖ΔP‖ = η·s; C holds only the normalized updates, in both cumulative modes."""
    outs = {}
    for mode in ("delta", "init"):
        model = _mlp()
        p0 = [p.detach().clone() for p in model.parameters()]
        opt = NuP(model.parameters(), lr=0.1, weight_decay=0.5, cumulative=mode)
        for _ in range(3):
            _backward(model)
            opt.step()
        v = opt.stat_vectors()
        torch.testing.assert_close(v["update_norm"][0], torch.tensor(0.1 * math.sqrt(12 / 6)))
        outs[mode] = v["c_norm"].clone()
        if mode == "init":
            c = [p.detach() - opt.state[p]["cumulative"] for p in model.parameters()]
        else:
            c = [opt.state[p]["cumulative"] for p in model.parameters()]
            decayed = [(p.detach() - q).norm() for p, q in zip(model.parameters(), p0)]
            assert not torch.allclose(torch.stack([x.norm() for x in c]), torch.stack(decayed))  # P − P₀ has the decay
        torch.testing.assert_close(torch.stack([x.norm() for x in c]), v["c_norm"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs["delta"], outs["init"], rtol=1e-5, atol=1e-7)


def test_weight_decay_skips_with_the_step_and_refuses_fused():
    model = _mlp()
    opt = NuP(model.parameters(), lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # a zero-gradient step is harmless: no decay either
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="weight_decay needs fused=False"):
        NuP(nup.NuMLP(4, 2, depth=3, m=2).parameters(), lr=0.1, fused=True, weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay must be"):
        NuP(model.parameters(), lr=0.1, weight_decay=-1.0)


# --- lr, momentum and schedulers -----------------------------------------------------------

def test_tensor_lr_equals_float_lr_and_follows_in_place_changes():
    a, b = _mlp(), _mlp()
    lr = torch.tensor(0.1)
    opt_a, opt_b = NuP(a.parameters(), lr=0.1), NuP(b.parameters(), lr=lr)
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            _backward(model)
            opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        lr.fill_(0.05 if step == 0 else 0.02)  # schedulers fill a tensor lr in place
        opt_a.param_groups[0]["lr"] = 0.05 if step == 0 else 0.02
    with pytest.raises(ValueError, match="one finite number"):
        NuP(a.parameters(), lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("base", [None, "sgd", "adam"])
def test_one_cycle_lr_with_its_defaults(base):
    model = _mlp()
    params = list(model.parameters())
    base_opt = {None: None, "sgd": lambda: torch.optim.SGD(params, lr=1.0, momentum=0.9),
                "adam": lambda: torch.optim.AdamW(params, lr=1e-3)}[base]
    base_opt = base_opt() if base_opt else None
    opt = NuP(params, lr=0.1, base=base_opt)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)  # cycle_momentum=True
    seen = []
    key = "betas" if base == "adam" else "momentum"
    for _ in range(10):
        _backward(model)
        ours = opt.param_groups[0][key]
        opt.step()
        sched.step()
        if base_opt is not None:
            theirs = base_opt.param_groups[0][key]
            assert ours == theirs  # passed through before the base step
            seen.append(theirs[0] if key == "betas" else theirs)
    if seen:
        assert min(seen) < 0.9 < max(seen) + 1e-9 and len(set(seen)) > 3  # the base's momentum really cycles


# --- names ----------------------------------------------------------------------------------

def test_names_survive_add_param_group_state_dict_and_compile():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    named = list(model.named_parameters())
    opt = NuP(named[:4], lr=0.1)
    opt.add_param_group({"params": named[4:]})
    assert opt.param_names == [n for n, _ in named]
    sd = opt.state_dict()
    assert [n for g in sd["param_groups"] for n in g["param_names"]] == [n for n, _ in named]
    other = NuP([{"params": named[:4]}, {"params": named[4:]}], lr=0.1)
    other.load_state_dict(sd)
    assert other.param_names == opt.param_names

    compiled = torch.compile(model)
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    opt = NuP(compiled.named_parameters(), lr=0.1)
    assert opt.param_names == [n for n, _ in named]
    x = torch.randn(3, 4)
    opt.zero_grad()
    compiled(x).sum().backward()
    opt.step()
    assert set(opt.stats()["params"]) == {n for n, _ in named}


def test_a_module_as_params_is_named_and_read_by_layout():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))
    opt = NuP(model, lr=0.1)
    assert opt.scales() == pytest.approx({"0.weight": math.sqrt(8 / 50), "1.weight": math.sqrt(4 / 8),
                                          "1.bias": None})


def test_scale_overrides_by_name_pattern_and_rule():
    model = _mlp()
    opt = NuP(model, lr=0.1, scales={"0.weight": 2.0, "*.bias": 0.5}, normalize_vectors=True)
    assert opt.scales() == {"0.weight": 2.0, "0.bias": 0.5, "2.weight": pytest.approx(math.sqrt(3 / 12)),
                            "2.bias": 0.5}
    _backward(model)
    before = model[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close((model[0].weight - before).norm(), torch.tensor(0.1 * 2.0))
    rule = NuP(_mlp(), lr=0.1, scales=lambda name, p, layout: 1.0 if layout is not None else None)
    assert rule.scales()["2.weight"] == 1.0 and rule.scales()["2.bias"] is None
    with pytest.raises(ValueError, match="matches no parameter"):
        NuP(_mlp(), lr=0.1, scales={"layers.0.weight": 1.0})


# --- wrapper mode: groups, several bases, sparse ------------------------------------------

def test_add_param_group_reaches_the_base():
    model = _mlp()
    first = list(model[0].parameters())
    base = torch.optim.Adam(first, lr=1e-2)
    opt = NuP(first, lr=0.1, base=base)
    opt.add_param_group({"params": list(model[2].parameters())})
    assert {id(p) for g in base.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    before = model[2].weight.detach().clone()
    _backward(model)
    opt.step()
    moved = (model[2].weight - before).norm()
    torch.testing.assert_close(moved, torch.tensor(0.1 * math.sqrt(3 / 12)))  # trained, at its normalized rate


def test_several_bases_each_over_its_own_parameters():
    torch.manual_seed(0)
    emb, head = nn.Embedding(20, 8, sparse=True), nn.Linear(8, 3)
    sparse_base = torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2)
    dense_base = torch.optim.AdamW(list(head.parameters()), lr=1e-2)
    params = [*emb.parameters(), *head.parameters()]
    opt = NuP(params, lr=0.1, base=[sparse_base, dense_base])
    ids, y = torch.randint(0, 20, (16,)), torch.randint(0, 3, (16,))
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(head(emb(ids)), y).backward()
        assert emb.weight.grad.is_sparse
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
    assert int(opt.stat_vectors()["skipped"].sum()) == 0
    model = nn.Sequential(emb, head)  # a module with a sparse embedding is accepted once it has a base
    other = NuP(model, lr=0.1, base=[torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2),
                                     torch.optim.AdamW(list(head.parameters()), lr=1e-2)])
    other.load_state_dict(opt.state_dict())
    assert other.bases[0].state_dict()["state"][0]["step"] == 3
    with pytest.raises(ValueError, match="several bases"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="its own parameters"):
        NuP(params, lr=0.1, base=[torch.optim.SGD(params, lr=1.0), torch.optim.SGD(params, lr=1.0)])


def test_sparse_gradients_without_a_base_are_refused_clearly():
    emb = nn.Embedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="sparse gradients.*SparseAdam"):
        NuP(emb, lr=0.1)
    opt = NuP(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient.*SparseAdam"):
        opt.step()


def test_repr_shows_the_base_and_the_schedule():
    model = _mlp()
    text = repr(NuP(list(model.parameters()), lr=0.1, base=torch.optim.AdamW(model.parameters(), lr=1e-3),
                    schedule=nup.make_schedule("geometry")))
    assert text.startswith("NuP (")
    assert "base: AdamW(lr=0.001)" in text and "schedule: RandomWalkLR(" in text and "lr: 0.1" in text


# --- vectors in wrapper mode ----------------------------------------------------------------

def _check_every_tensor_at_its_documented_rate(model, loss_fn, lr=0.1, base_lr=1e-3, steps=3):
    """Wrapper mode with AdamW: every matrix moves by exactly lr·s_P, every vector exactly as AdamW
    alone would move it (rate base_lr), and the loss falls."""
    params = list(model.parameters())
    twin = {id(p): nn.Parameter(p.detach().clone()) for p in params}
    adamw = torch.optim.AdamW([twin[id(p)] for p in params], lr=base_lr)
    opt = NuP(model, lr=lr, base=torch.optim.AdamW(params, lr=base_lr))
    scales, names = opt.scales(), opt.param_names
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        losses.append(loss.item())
        for p in params:
            twin[id(p)].data.copy_(p.detach())
            twin[id(p)].grad = p.grad.clone()
        adamw.step()
        before = [p.detach().clone() for p in params]
        opt.step()
        for name, p, p_before in zip(names, params, before):
            if scales[name] is None:  # a vector: AdamW's own step
                torch.testing.assert_close(p.detach(), twin[id(p)].detach(), rtol=1e-6, atol=1e-9)
            else:
                torch.testing.assert_close((p - p_before).norm(), torch.tensor(lr * scales[name]), rtol=1e-5, atol=0)
    opt.zero_grad()
    with torch.no_grad():
        assert loss_fn(model).item() < losses[0]
    return scales


def test_batchnorm_cnn_in_wrapper_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    scales = _check_every_tensor_at_its_documented_rate(model, lambda m: nn.functional.cross_entropy(m(x), y))
    bn = [n for n in scales if n.startswith(("1.", "4."))]
    assert len(bn) == 4 and all(scales[n] is None for n in bn)  # BatchNorm weights and biases: AdamW's rate
    assert scales["0.weight"] == pytest.approx(math.sqrt(8 / 27))


def test_layernorm_transformer_in_wrapper_mode():
    torch.manual_seed(0)
    d = 16
    layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Embedding(30, d), layer, nn.Flatten(), nn.Linear(5 * d, 3))
    ids, y = torch.randint(0, 30, (8, 5)), torch.randint(0, 3, (8,))
    scales = _check_every_tensor_at_its_documented_rate(model, lambda m: nn.functional.cross_entropy(m(ids), y))
    norms = [n for n in scales if "norm" in n]
    assert len(norms) == 4 and all(scales[n] is None for n in norms)
    assert scales["1.self_attn.in_proj_weight"] == pytest.approx(math.sqrt(3))
    assert scales["0.weight"] == pytest.approx(math.sqrt(d / 30))  # Embedding read as (in, out)


def test_vectors_in_wrapper_mode_follow_lr_schedules_as_a_ratio():
    model = _mlp()
    params = list(model.parameters())
    opt = NuP(params, lr=0.1, base=torch.optim.SGD(params, lr=0.01))
    opt.param_groups[0]["lr"] = 0.05  # half the lr it was built with
    _backward(model)
    grad, before = model[0].bias.grad.clone(), model[0].bias.detach().clone()
    opt.step()
    torch.testing.assert_close(model[0].bias.detach(), before - 0.5 * 0.01 * grad)
