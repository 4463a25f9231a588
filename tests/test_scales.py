"""Layout-aware step scales for any model (nup.scales), overrides, and reading the applied scale."""

import math

import pytest
import torch
from torch import nn

from nup import NuMLP
from nup.scales import Layout, default_scale, model_layouts, resolve_scale, tag_layouts


class Conv1D(nn.Module):
    """GPT-2's layout, as transformers.pytorch_utils.Conv1D: weight (in, out), y = x W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_linear_and_conv_read_out_in_kernel():
    model = nn.Sequential(nn.Linear(8, 32), nn.Conv2d(4, 16, 3))
    layouts = model_layouts(model)
    assert layouts["0.weight"] == Layout("linear", 32, 8)
    assert layouts["1.weight"] == Layout("conv", 16, 4 * 9)
    assert layouts["1.weight"].scale == pytest.approx(math.sqrt(16 / 36))
    assert "0.bias" not in layouts  # vectors have no layout


def test_transposed_layouts_are_read_the_right_way_round():
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 64), "up": nn.ConvTranspose2d(32, 8, 4), "c": Conv1D(96, 32)})
    layouts = model_layouts(model)
    assert layouts["emb.weight"] == Layout("embedding", 64, 1000)
    assert layouts["emb.weight"].scale == pytest.approx(math.sqrt(64 / 1000))
    # the example: 0.5 by the plain shape[0] rule, 0.125 read as (in, out, k, k)
    assert math.sqrt(32 / (8 * 16)) == pytest.approx(0.5)
    assert layouts["up.weight"].scale == pytest.approx(0.125)
    assert layouts["c.weight"] == Layout("conv1d_hf", 96, 32)


def test_grouped_conv_transpose():
    layouts = model_layouts(nn.ConvTranspose1d(8, 12, 3, groups=2))
    # weight (8, 6, 3): each output sees in/groups · k = 4·3 inputs
    assert layouts["weight"] == Layout("conv_transpose", 12, 12)


def test_packed_qkv_moves_like_three_separate_tensors():
    d = 16
    mha = nn.MultiheadAttention(d, 4)
    layouts = model_layouts(mha)
    assert layouts["in_proj_weight"].pieces == 3 and layouts["in_proj_weight"].kind == "packed_qkv"
    # three separate d×d tensors of scale 1 take steps of total norm √3·η: the packed one does too
    assert layouts["in_proj_weight"].scale == pytest.approx(math.sqrt(3))
    gpt = nn.ModuleDict({"c_attn": Conv1D(3 * d, d)})
    assert model_layouts(gpt)["c_attn.weight"] == Layout("packed_qkv", 3 * d, d, 3)
    # a plain shape[0] rule reads GPT-2's (d, 3d) as fan_out d: 1/√3, transposed
    assert model_layouts(gpt)["c_attn.weight"].scale == pytest.approx(math.sqrt(3))


def test_tagged_tensors_and_numlp_metadata():
    model = nn.Sequential(nn.Embedding(100, 4))
    w = model[0].weight
    assert default_scale(w) == pytest.approx(math.sqrt(100 / 4))  # untagged: (out, in) reading
    tag_layouts(model)
    assert default_scale(w) == pytest.approx(math.sqrt(4 / 100))
    numlp = NuMLP(8, 3, depth=3, m=2)
    for p in numlp.parameters():
        assert default_scale(p) == p._nup_meta.scale


def test_overrides_by_name_pattern_and_rule():
    model = tag_layouts(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    w0, w1 = model[0].weight, model[1].weight
    assert resolve_scale("0.weight", w0, {"0.weight": 3.0}) == 3.0
    assert resolve_scale("1.weight", w1, {"0.weight": 3.0}) == pytest.approx(math.sqrt(2 / 4))
    assert resolve_scale("1.bias", model[1].bias, {"*.bias": 0.5}) == 0.5

    def rule(name, p, layout):
        return 2.0 * layout.scale if layout is not None and layout.fan_out < layout.fan_in else None

    assert resolve_scale("1.weight", w1, rule) == pytest.approx(2 * math.sqrt(2 / 4))
    assert resolve_scale("0.weight", w0, rule) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive finite"):
        resolve_scale("0.weight", w0, {"0.weight": -1.0})


def test_gpt2_layouts_from_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    layouts = model_layouts(transformers.GPT2Model(cfg))
    assert layouts["wte.weight"] == Layout("embedding", 16, 50)
    assert layouts["h.0.mlp.c_fc.weight"] == Layout("conv1d_hf", 64, 16)
    assert layouts["h.0.attn.c_attn.weight"] == Layout("packed_qkv", 48, 16, 3)
