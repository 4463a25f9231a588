"""Arguments and parameter groups of :class:`nup.NuP`: validation, torch-style groups, names and kinds.

Pure functions of their inputs; the optimizer calls them from its constructor, ``add_param_group``
and ``load_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nup.scales import tag_layouts


def check_group_values(values: dict[str, Any]) -> None:
    """ValueError for a group's lr, weight_decay, scale or normalize_vectors that no step can use."""
    lr, scale, normalize = values.get("lr"), values.get("scale"), values.get("normalize_vectors", False)
    if torch.is_tensor(lr):
        check_lr(lr)
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    wd = values.get("weight_decay", 0.0)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not (math.isfinite(scale) and scale > 0)):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize_vectors must be True or False, got {normalize!r}")


def kind(obj: Any) -> str:
    """A schedule's name or the base optimizers' class names, as stored in checkpoints ("" for none)."""
    if obj is None:
        return ""
    if isinstance(obj, (list, tuple)):
        return ",".join(type(b).__name__ for b in obj)
    return type(obj).__name__ if isinstance(obj, torch.optim.Optimizer) else str(obj.name)


def groups(params: Any, has_base: bool) -> list[dict[str, Any]]:
    """Tensors, ``(name, tensor)`` pairs, group dicts or an ``nn.Module`` as torch-style groups.

    Names stay as torch keeps them (``group['param_names']``). A module's parameters come named,
    with their layouts recorded for :mod:`nup.scales`; without a base, a module that makes sparse
    gradients is refused here.
    """
    if isinstance(params, nn.Module):
        sparse = [n for n, m in params.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
        if sparse and not has_base:
            raise ValueError(f"NuP: {sparse[0]!r} makes sparse gradients; νP-SGD cannot normalize them: pass "
                             "base=torch.optim.SparseAdam(...) over its parameters, or use sparse=False")
        params = tag_layouts(params).named_parameters()
    params = list(params)
    if not params:
        raise ValueError("NuP got an empty parameter list (a generator of parameters can be used only once: "
                         "pass list(model.parameters()) when a base optimizer needs them too)")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    return [{**g, "params": [g["params"]] if torch.is_tensor(g["params"]) else list(g["params"])} for g in groups]


def display_name(name: str) -> str:
    """A parameter name without the ``_orig_mod.`` that ``torch.compile`` puts in its modules' names."""
    return name.replace("_orig_mod.", "")


def check_lr(lr: Any) -> float | torch.Tensor:
    if torch.is_tensor(lr):
        if lr.numel() != 1 or not bool(torch.isfinite(lr).all()) or float(lr) < 0:
            raise ValueError(f"a tensor lr must hold one finite number >= 0, got {lr!r}")
        return lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0 (or a one-element tensor), got {lr!r}")
    return float(lr)


def describe(obj: Any) -> str:
    """``Name(key=value, ...)`` from an object's public number and string attributes."""
    fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in vars(obj).items()
                       if not k.startswith("_") and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    return f"{type(obj).__name__}({fields})"
