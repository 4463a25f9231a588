"""Shared plumbing of the studies: output folders, a twice-differentiable NuMLP forward, fits, figures.

Every study writes ``results.json`` (atomically, via :mod:`nup.io`), PNG figures and a short
``README.md`` rendered with :mod:`nup.report`'s blocks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from torch import Tensor, nn

from nup.io import write_json_atomic, write_text_atomic
from nup.report import Block, Figure, Paragraph, render_markdown


@dataclass(frozen=True)
class Flag:
    """A study option: config field ``field`` is the flag ``--field-name``.

    ``kind``: int, float, str, ints / floats / strs (comma-separated), width (an int; 0 = None) or bool
    (yes/no, true/false, 1/0).
    """

    field: str
    kind: str
    help: str


def prepare_out(out: str | Path) -> Path:
    """Create ``out`` and check that it is writable (OSError with one line if not)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"output directory {str(path)!r} is not writable: {err.strerror or err}") from None
    return path


def plain_forward(model: nn.Module, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
    """NuMLP's forward in plain torch ops, so that Hessian-vector products can run through it.

    On CUDA, NuMLP's layers run the Triton kernels, whose backward is first-order only; this
    computes the same function in torch ops,
    ``x_k = φ(α_k·x_{k−1} W_kᵀ + σ_b·b_k)``, layer by layer. ``params`` maps
    ``layers.{k}.weight`` / ``layers.{k}.bias`` to tensors used instead of the model's own.
    x: ``(batch, n_0)`` → ``(batch, n_L)``.
    """
    params = params or {}
    for k, layer in enumerate(model.layers):
        w = params.get(f"layers.{k}.weight", layer.weight)
        h = layer.alpha * nn.functional.linear(x, w)
        if layer.bias is not None:
            h = h + layer.bias_scale * params.get(f"layers.{k}.bias", layer.bias)
        x = layer.activation(h)
    return x


def half_mse(out: Tensor, target: Tensor) -> Tensor:
    """``(1/2n)·Σ_i ‖out_i − target_i‖²`` for ``(n, k)`` tensors (the catapult convention)."""
    return 0.5 * (out - target).pow(2).sum() / out.shape[0]


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``; NaN unless every y is finite and > 0."""
    y = np.asarray(ys, dtype=np.float64)
    if len(y) < 2 or not np.all(np.isfinite(y) & (y > 0)):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(xs, dtype=np.float64)), np.log(y), 1)[0])


def finite_or_none(value: float) -> float | None:
    """A float for JSON: None when it is NaN or infinite."""
    return float(value) if value is not None and math.isfinite(value) else None


def figure(width: float = 6.4, height: float = 4.0) -> MplFigure:
    """A pyplot-free figure on the Agg canvas."""
    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


QUICK_NOTE = "QUICK MODE: tiny settings, not a result"
_QUICK: ContextVar[bool] = ContextVar("nup_study_quick", default=False)


@contextmanager
def quick_mode(on: bool) -> Iterator[None]:
    """Within the block, figures and READMEs carry :data:`QUICK_NOTE` when ``on``."""
    token = _QUICK.set(bool(on))
    try:
        yield
    finally:
        _QUICK.reset(token)


def save_figure(fig: MplFigure, path: Path) -> str:
    """Save ``fig`` as a PNG at ``path`` (titled quick mode inside :func:`quick_mode`); returns the file name."""
    if _QUICK.get():
        fig.suptitle(QUICK_NOTE, color="tab:red", fontsize="medium")
    fig.savefig(path, format="png")
    return path.name


def environment(device: str | torch.device, seconds: float) -> dict[str, Any]:
    """Where and how long a study ran: versions, device, torch threads, wall time."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "wall_time_s": round(seconds, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def config_dict(config: Any) -> dict[str, Any]:
    """A study config dataclass as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def write_outputs(out: Path, results: dict[str, Any], blocks: Iterable[Block]) -> None:
    """``results.json`` and ``README.md`` (from report blocks; relative figure paths are in ``out``)."""
    blocks = [Figure(out / b.path, b.caption) if isinstance(b, Figure) and not b.path.is_absolute() else b
              for b in blocks]
    if _QUICK.get():
        results = {**results, "quick": True}
        blocks = [*blocks[:1], Paragraph(f"**{QUICK_NOTE}** (`--quick`)."), *blocks[1:]]
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "README.md", render_markdown(blocks, out))


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for prose: ``digits`` significant digits, "n/a" for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"
