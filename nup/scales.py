"""Step scales ``s_P`` for the tensors of any model (SPEC §2), read from each module's weight layout.

NuP's step moves a tensor by ``η·s_P`` in Frobenius norm. A NuMLP tensor carries its scale in its
metadata. Any other matrix gets ``s_P = √(k·(fan_out/k)/fan_in) = √(fan_out/fan_in)`` computed
from its module's *layout*, which is where a plain ``shape[0]`` rule goes wrong:

| module | weight layout | fan_out, fan_in |
|---|---|---|
| ``nn.Linear``, ``nn.Conv{1,2,3}d`` | ``(out, in/groups, *kernel)`` | ``out``, ``in/groups·∏kernel`` |
| ``nn.ConvTranspose{1,2,3}d`` | ``(in, out/groups, *kernel)`` | ``out/groups·groups``, ``in/groups·∏kernel`` |
| ``nn.Embedding``, ``nn.EmbeddingBag`` | ``(num_embeddings, dim)`` | ``dim``, ``num_embeddings`` |
| HF ``Conv1D`` (GPT-2) | ``(in, out)`` | ``out``, ``in`` |
| ``nn.MultiheadAttention.in_proj_weight`` | ``(3·d, d)`` | ``3·d``, ``d`` (3 packed pieces) |

A *packed* tensor (Q, K and V in one matrix: ``in_proj_weight``, names ending in ``qkv``,
``c_attn``, ``query_key_value``) is recorded with its piece count ``k``. Its scale is ``√k`` times
one piece's ``√(fan_out/k / fan_in)``: the packed step is as large as the ``k`` separate steps
together, so each piece moves as a separate Q, K or V tensor would.

Vectors (1-D: biases, norm weights) have no fan-in; they are not normalized unless asked
(:class:`nup.NuP`'s ``normalize_vectors``), and their scale is 1.

Overrides: ``overrides`` maps a parameter name (or an ``fnmatch`` pattern such as ``"*.bias"``) to
a scale, or is a callable ``(name, tensor, layout) -> float | None`` (None: keep the default).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

#: name suffixes of packed Q/K/V matrices, and their piece count
PACKED_SUFFIXES: dict[str, int] = {"in_proj_weight": 3, "qkv.weight": 3, "c_attn.weight": 3,
                                   "query_key_value.weight": 3, "Wqkv.weight": 3}


@dataclass(frozen=True)
class Layout:
    """How a tensor maps inputs to outputs: ``fan_out``, ``fan_in``, packed ``pieces`` and its ``kind``."""

    kind: str
    fan_out: int
    fan_in: int
    pieces: int = 1

    @property
    def scale(self) -> float:
        """``√pieces · √((fan_out/pieces)/fan_in)``, which equals ``√(fan_out/fan_in)``."""
        return math.sqrt(self.pieces) * math.sqrt(self.fan_out / self.pieces / self.fan_in)


ScaleRule = Callable[[str, torch.Tensor, "Layout | None"], "float | None"]
Overrides = Mapping[str, float] | ScaleRule


def _kernel(weight: torch.Tensor) -> int:
    return math.prod(weight.shape[2:])


def matrix_layout(p: torch.Tensor, kind: str = "matrix") -> Layout | None:
    """The ``(out, in, *kernel)`` layout of a tensor with 2+ dimensions; None for vectors and scalars."""
    if p.dim() < 2:
        return None
    return Layout(kind, p.shape[0], p.numel() // p.shape[0])


def _module_layouts(module: nn.Module) -> dict[str, Layout]:
    """Layouts of ``module``'s own (not its children's) matrix parameters, by local name."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and w is not None:
        fan_in = w.shape[0] // module.groups * _kernel(w)
        return {"weight": Layout("conv_transpose", w.shape[1] * module.groups, fan_in)}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and w is not None:
        return {"weight": Layout("embedding", w.shape[1], w.shape[0])}
    if type(module).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # transformers.pytorch_utils.Conv1D
        return {"weight": Layout("conv1d_hf", w.shape[1], w.shape[0])}
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        w = module.in_proj_weight
        return {"in_proj_weight": Layout("packed_qkv", w.shape[0], w.shape[1], pieces=3)}
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and w is not None:
        return {"weight": Layout("linear" if isinstance(module, nn.Linear) else "conv", w.shape[0],
                                 w.numel() // w.shape[0])}
    return {}


def _packed(name: str, layout: Layout) -> Layout:
    for suffix, pieces in PACKED_SUFFIXES.items():
        if (name == suffix or name.endswith("." + suffix)) and layout.pieces == 1 and layout.fan_out % pieces == 0:
            return Layout("packed_qkv", layout.fan_out, layout.fan_in, pieces)
    return layout


def model_layouts(model: nn.Module) -> dict[str, Layout]:
    """``{parameter name: Layout}`` for every matrix of ``model``, from its modules' types.

    Names are ``model.named_parameters()``'s; a matrix in an unknown module gets the
    ``(out, in, *kernel)`` layout.
    """
    known: dict[int, Layout] = {}
    for module in model.modules():
        for local, layout in _module_layouts(module).items():
            known[id(getattr(module, local))] = layout
    out = {}
    for name, p in model.named_parameters():
        layout = known.get(id(p)) or matrix_layout(p)
        if layout is not None:
            out[name] = _packed(name, layout)
    return out


def tag_layouts(model: nn.Module) -> nn.Module:
    """Record each matrix's layout on the tensor (``p._nup_layout``), so that NuP reads it from a
    plain ``model.parameters()``. Returns ``model``. ``NuP(model, ...)`` does this itself."""
    named = dict(model.named_parameters())
    for name, layout in model_layouts(model).items():
        named[name]._nup_layout = layout
    return model


def _override(overrides: Overrides | None, name: str, p: torch.Tensor, layout: Layout | None) -> float | None:
    if overrides is None:
        return None
    if callable(overrides):
        value = overrides(name, p, layout)
    else:
        value = overrides.get(name)
        if value is None:
            value = next((v for pattern, v in overrides.items() if fnmatch.fnmatchcase(name, pattern)), None)
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"scale override for {name!r} must be a positive finite number, got {value!r}")
    return None if value is None else float(value)


def default_scale(p: torch.Tensor) -> float:
    """``s_P`` of a tensor without an override: its NuMLP metadata, else its layout's (``p._nup_layout``,
    else ``(out, in, *kernel)``) ``√(fan_out/fan_in)``; 1 for vectors."""
    meta = getattr(p, "_nup_meta", None)
    if meta is not None:
        return float(meta.scale)
    layout = getattr(p, "_nup_layout", None) or matrix_layout(p)
    return 1.0 if layout is None else layout.scale


def resolve_scale(name: str, p: torch.Tensor, overrides: Overrides | None = None) -> float:
    """The scale NuP applies to tensor ``p`` called ``name``: the override, else :func:`default_scale`."""
    layout = getattr(p, "_nup_layout", None) or matrix_layout(p)
    value = _override(overrides, name, p, layout)
    return default_scale(p) if value is None else value


def check_overrides(overrides: Overrides | None, names: Iterable[str]) -> None:
    """Raise ValueError for a name or pattern in a Mapping of overrides that matches no parameter."""
    if overrides is None or callable(overrides):
        return
    names = list(names)
    for key in overrides:
        if key not in names and not fnmatch.filter(names, key):
            raise ValueError(f"scale override {key!r} matches no parameter name; names look like {names[:3]}")
