"""Report presentation: figures in reading order, the per-layer end-of-training table, colour and
axis scales taken from the data, grid-edge optima flagged, shared y-axes across compared panels."""

from __future__ import annotations

import re

import pytest
from matplotlib.figure import Figure

import nup.train
from nup import plots, report


@pytest.fixture()
def saved(monkeypatch):
    """Every matplotlib Figure saved during the test, in order."""
    figures = []
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_run_report_reads_loss_first_and_ends_with_a_layer_table(tmp_path):
    config = nup.train.TrainConfig(data="teacher", depth=3, m=2, steps=20, eval_every=10, batch_size=32)
    summary = nup.train.run_training(config, tmp_path, progress=False)
    md_path, _ = report.write_report(tmp_path)
    md = md_path.read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert figures == list(plots.PLOT_FILES.values())  # loss, lr, cos heatmap, ‖C‖
    assert figures[0] == "loss.png"
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings.index("Final metrics") < headings.index("Figures") < headings.index(
        "Per layer at the end of training") < headings.index("Summary")
    table = md.split("## Per layer at the end of training")[1].split("##")[0]
    last = plots.load_metrics(tmp_path / "metrics.jsonl")[-1]
    for i, name in enumerate(summary["names"]):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{last['cos'][i]:.4g}" and cells[5] == f"{last['c_norm'][i]:.4g}"


def test_cos_heatmap_colour_scale_is_symmetric_from_the_data(tmp_path, saved):
    records = [{"step": t, "cos": [0.12 * (t % 3 - 1), 0.05, -0.03]} for t in range(6)]
    plots.plot_cos_heatmap(records, tmp_path / "cos.png")
    assert saved[-1].axes[0].images[0].get_clim() == pytest.approx((-0.12, 0.12))


def test_c_norm_is_on_a_log_scale(tmp_path, saved):
    records = [{"step": t, "c_norm": [140.0 + t, 15.0 + t, 20.0]} for t in range(5)]
    plots.plot_c_norm(records, tmp_path / "c.png")
    assert saved[-1].axes[0].get_yscale() == "log"


def _rows(losses: dict[tuple[str, float], float]) -> list[dict[str, str]]:
    return [{"parameterization": p, "lr": str(lr), "seed": "0", "train_loss": str(loss)}
            for (p, lr), loss in losses.items()]


def test_grid_edge_optima_are_flagged(tmp_path, saved):
    rows = _rows({("nup", 0.01): 2.0, ("nup", 0.1): 1.0, ("nup", 1.0): 1.5,
                  ("sp", 0.01): 0.5, ("sp", 0.1): 1.0, ("sp", 1.0): 1.5,
                  ("sp_inv_depth", 0.01): 3.0, ("sp_inv_depth", 0.1): 2.0, ("sp_inv_depth", 1.0): 0.2})
    best = {row[0]: row for row in report._best_lr(rows, ["parameterization"])}
    assert best["nup"][1] == 0.1 and best["nup"][-1] == ""
    assert best["sp"][1] == 0.01 and "lowest lr tried" in best["sp"][-1]
    assert best["sp_inv_depth"][1] == 1.0 and "highest lr tried" in best["sp_inv_depth"][-1]
    assert report._plot_loss_vs_lr(rows, [], tmp_path / "l.png")
    axes = saved[-1].axes
    assert len(axes) == 3 and all(axes[0].get_shared_y_axes().joined(axes[0], ax) for ax in axes[1:])
