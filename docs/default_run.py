"""Compose README's figure from a finished ``nup train`` run: loss, lr and cosine panels side by side.

    python -m nup train --out runs/default
    python docs/default_run.py runs/default --out docs/default_run.png --summary docs/default_run_summary.json

Both outputs are written only where named.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

PANELS = ("loss.png", "lr.png", "cos_heatmap.png")


def compose(run_dir: Path, out: Path) -> None:
    """``out``: the run's PANELS in one row, at their own resolution."""
    images = [imread(run_dir / name) for name in PANELS]
    height = max(im.shape[0] for im in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=1.0) for im in images]
    row = np.concatenate(padded, axis=1)
    fig = Figure(figsize=(row.shape[1] / 100, row.shape[0] / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(row)
    ax.axis("off")
    fig.savefig(out, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the composed PNG")
    parser.add_argument("--summary", type=Path, help="also copy the run's summary.json here")
    args = parser.parse_args()
    if not (args.run_dir / "summary.json").is_file():
        parser.error(f"{args.run_dir} holds no summary.json: run `python -m nup train --out {args.run_dir}` first")
    compose(args.run_dir, args.out)
    if args.summary:
        shutil.copyfile(args.run_dir / "summary.json", args.summary)


if __name__ == "__main__":
    main()
