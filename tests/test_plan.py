"""``nup plan`` against the real allocation of small configurations on CPU (weights, C / P₀, .grad, base
optimizer state and the tensors autograd saves for the backward)."""

import pytest
import torch
import torch.nn.functional as F

from nup import NuMLP, NuP
from nup.cli import main
from nup.plan import plan


def _allocated(model: NuMLP, opt: NuP, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes of W, C / P₀, .grad, base state and saved activations (storages that are not the model's own:
    not a parameter, and not a layer's 0-dim α, which the multiply saves and every step reuses)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    own = [*model.parameters(), *(layer.alpha_like(layer.weight) for layer in model.layers)]
    for t in own:
        saved.pop(t.untyped_storage().data_ptr(), None)
    F.cross_entropy(out.float(), y).backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    opt.step()
    params_list = list(model.parameters())
    base_state = 0
    if opt.base is not None:
        base_state = sum(v.untyped_storage().nbytes() for p in params_list for v in opt.base.state[p].values()
                         if torch.is_tensor(v) and v.numel() > 1)
    return {"weights": sum(p.untyped_storage().nbytes() for p in params_list),
            "cumulative": sum(opt.state[p]["cumulative"].untyped_storage().nbytes() for p in params_list),
            "grads": grads, "activations": sum(saved.values()), "optimizer_state": base_state}


CASES = {
    "relu, drop-in": (dict(), "dropin", {}),
    "relu, fused": (dict(), "fused", dict(fused=True)),
    "relu, P0": (dict(cumulative="init"), "dropin", dict(cumulative="init")),
    "tanh + bias, drop-in": (dict(activation="tanh", bias=True), "dropin", {}),
    "relu, momentum base": (dict(base="momentum"), "dropin", "momentum"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_the_real_allocation(case, monkeypatch):
    import nup.model

    kw, path, opt_kw = CASES[case]
    if path == "fused":  # the in-backward route the CUDA path takes (small CPU batches run autograd's own ops)
        monkeypatch.setattr(nup.model, "NATIVE_MAX_INPUT", 0)
    depth, m, k0, batch = 5, 4, 1, 8
    torch.manual_seed(0)
    act = kw.get("activation", "relu")
    model = NuMLP(16, 3, depth, m, width_offset=k0, activation=act, bias=kw.get("bias", False),
                  sigma_b2=0.3 if kw.get("bias") else 0.0)
    if opt_kw == "momentum":
        opt = NuP(model.named_parameters(), lr=0.1, base=torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    else:
        opt = NuP(model.named_parameters(), lr=0.1, **opt_kw)
    real = _allocated(model, opt, torch.randn(batch, 16), torch.randint(0, 3, (batch,)))
    p = plan(depth, m, width_offset=k0, batch=batch, in_features=16, out_features=3, **kw)
    assert p["params"] == sum(q.numel() for q in model.parameters())
    assert p["widths"] == model.widths
    got = p["paths"][path]
    for key, value in real.items():
        assert getattr(got, key) == value, key
    assert got.total == sum(real.values())


def test_bf16_halves_the_bytes_and_p0_needs_fp32():
    a, b = plan(16, 2, width_offset=3), plan(16, 2, width_offset=3, dtype="bf16")
    for path in ("dropin", "fused"):
        assert 2 * b["paths"][path].weights == a["paths"][path].weights
        assert 2 * b["paths"][path].total == a["paths"][path].total
    with pytest.raises(ValueError, match="needs fp32"):
        plan(8, 2, dtype="bf16", cumulative="init")
    with pytest.raises(ValueError, match="unknown dtype"):
        plan(8, 2, dtype="fp8")


def test_shard_count_is_the_least_that_fits():
    p = plan(64, 1, width_offset=3, gpu_gb=0.5, reserve=0.0)  # 250 M parameters do not fit 0.5 GB
    for path in p["paths"].values():
        assert not path.fits and path.shards is not None and path.shards > 2
        tighter = plan(64, 1, width_offset=3, gpu_gb=0.5 * (path.shards - 1) / path.shards, reserve=0.0)
        assert tighter["paths"][path.path].shards >= path.shards
    assert plan(8, 2)["paths"]["dropin"].shards == 1
    assert plan(64, 1, width_offset=3, gpu_gb=1e-3)["paths"]["dropin"].shards is None  # one layer alone is too big


def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "plan.md"
    assert main(["plan", "--depth", "4,8", "--m", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text() and text.count("\n") == 2 + 2 * 2
    assert "| dropin |" in text and "| fused |" in text
    assert main(["plan", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype 'fp8'" in err and "\n" not in err.strip()
