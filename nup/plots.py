"""PNG plots of a training run, from its ``metrics.jsonl`` records (one dict per step).

Figures are built with :class:`matplotlib.figure.Figure` and saved through the Agg canvas, so
no pyplot state or GUI backend is touched. Each ``plot_*`` function takes the loaded records
and a path, writes one PNG and returns the path; :func:`plot_run` draws them all for a run
directory (the report module reuses these functions).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nup.io import write_bytes_atomic

PLOT_FILES = {  # in reading order: the loss first
    "loss": "loss.png",
    "lr": "lr.png",
    "cos": "cos_heatmap.png",
    "c_norm": "c_norm.png",
}


def load_metrics(path: str | Path) -> list[dict]:
    """Read a ``metrics.jsonl`` file: one dict per line, blank lines ignored."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _figure(width: float = 6.4, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path, buf = Path(path), io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())  # replaces a planted symlink instead of writing through it
    return path


def _layer_labels(names: Sequence[str] | None, n: int) -> list[str]:
    return list(names) if names is not None and len(names) == n else [f"layer {i + 1}" for i in range(n)]


def _matrix(records: Sequence[dict], key: str) -> np.ndarray:
    """Per-layer lists of ``key`` stacked as (layers, steps), float, NaN where absent."""
    rows = [r[key] for r in records if key in r]
    if not rows:
        return np.zeros((0, 0))
    return np.asarray(rows, dtype=float).T


def _positive_log_scale(ax, values: np.ndarray) -> None:
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")


def plot_loss(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Train loss per step (minibatch) and test loss at the eval points, against step."""
    fig = _figure()
    ax = fig.add_subplot()
    steps = np.array([r["step"] for r in records], dtype=float)
    train = np.array([r["loss"] for r in records], dtype=float)
    ax.plot(steps, train, lw=0.8, alpha=0.6, label="train (minibatch)")
    evals = [r for r in records if "test_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", ms=3, label="test")
    _positive_log_scale(ax, np.concatenate([train, [r["test_loss"] for r in evals]]))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.legend()
    return _save(fig, path)


def plot_lr(records: Sequence[dict], path: str | Path, names: Sequence[str] | None = None,
            title: str = "") -> Path:
    """Effective learning rate per layer (``lr``) against step, log scale."""
    fig = _figure()
    ax = fig.add_subplot()
    lr = _matrix(records, "lr")
    steps = [r["step"] for r in records if "lr" in r]
    labels = _layer_labels(names, lr.shape[0])
    if lr.size and np.allclose(lr, lr[:1]):  # one shared rate: draw it once
        ax.plot(steps, lr[0], label="all layers")
    else:
        for row, label in zip(lr, labels, strict=True):
            ax.plot(steps, row, lw=1.0, label=label)
    _positive_log_scale(ax, lr)
    ax.set_xlabel("step")
    ax.set_ylabel("effective lr  η·λ")
    ax.set_title(title or "effective learning rate")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def plot_cos_heatmap(records: Sequence[dict], path: str | Path, names: Sequence[str] | None = None,
                     title: str = "") -> Path:
    """Layer × step heatmap of cos(ΔP_t, C_t); the colour range is ``±max|cos|`` of the data (symmetric
    about 0, so white is 0), not ±1, so that values around 0.1 do not fade into noise."""
    cos = _matrix(records, "cos")
    finite = np.abs(cos[np.isfinite(cos)])
    vlim = float(min(1.0, max(finite.max(), 1e-3))) if finite.size else 1.0
    steps = [r["step"] for r in records if "cos" in r]
    fig = _figure(7.2, max(2.5, 0.35 * cos.shape[0] + 1.5))
    ax = fig.add_subplot()
    extent = (steps[0] - 0.5, steps[-1] + 0.5, cos.shape[0] - 0.5, -0.5) if steps else None
    im = ax.imshow(cos, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-vlim, vmax=vlim, extent=extent)
    ax.set_yticks(range(cos.shape[0]), _layer_labels(names, cos.shape[0]), fontsize="small")
    ax.set_xlabel("step")
    ax.set_title(title or "cos(new update, cumulative update)")
    fig.colorbar(im, ax=ax, label="cos")
    return _save(fig, path)


def plot_c_norm(records: Sequence[dict], path: str | Path, names: Sequence[str] | None = None,
                title: str = "") -> Path:
    """‖C_t‖ = ‖P_t − P_0‖_F per layer against step, on a log scale (the readout's ‖C‖ is often ~10× the
    hidden layers')."""
    fig = _figure()
    ax = fig.add_subplot()
    c = _matrix(records, "c_norm")
    steps = [r["step"] for r in records if "c_norm" in r]
    for row, label in zip(c, _layer_labels(names, c.shape[0]), strict=True):
        ax.plot(steps, row, lw=1.0, label=label)
    if (c[np.isfinite(c)] > 0).any():
        ax.set_yscale("log")  # zeros (steps before a tensor first moved) are left out of the curve
    ax.set_xlabel("step")
    ax.set_ylabel("‖C‖ = ‖P − P₀‖")
    ax.set_title(title or "cumulative update norm")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def plot_run(run_dir: str | Path, records: Sequence[dict] | None = None, names: Sequence[str] | None = None,
             title: str = "") -> dict[str, Path]:
    """Draw every plot of a run into ``run_dir``; returns ``{kind: path}`` (see :data:`PLOT_FILES`).

    ``records`` default to ``run_dir/metrics.jsonl`` and ``names`` to the ``names`` of
    ``run_dir/summary.json`` when it exists.
    """
    run_dir = Path(run_dir)
    if records is None:
        records = load_metrics(run_dir / "metrics.jsonl")
    if names is None and (run_dir / "summary.json").exists():
        names = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("names")
    if not records:
        raise ValueError(f"no metrics to plot in {run_dir}")
    return {
        "loss": plot_loss(records, run_dir / PLOT_FILES["loss"], title=title),
        "lr": plot_lr(records, run_dir / PLOT_FILES["lr"], names, title=title),
        "cos": plot_cos_heatmap(records, run_dir / PLOT_FILES["cos"], names, title=title),
        "c_norm": plot_c_norm(records, run_dir / PLOT_FILES["c_norm"], names, title=title),
    }

