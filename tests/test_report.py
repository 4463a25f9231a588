"""``nup report``: a real run directory and a (fake-trained) sweep directory render as Markdown
with relative figure links and as one self-contained HTML page; anything else is refused."""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

import nup.train
from nup import report
from nup import sweep as nsweep
from nup.cli import CLIError
from nup.io import write_json_atomic


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.main(parser.parse_args(list(argv)))


def _check_links_and_embeds(md_path: Path, html_path: Path, pngs: list[Path]) -> str:
    """Every PNG is linked from the Markdown by a relative path that resolves, and embedded byte
    for byte in the HTML, which loads nothing else. Returns the HTML."""
    md, page = md_path.read_text(), html_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted((md_path.parent / unquote(link)).resolve() for link in links) == sorted(p.resolve() for p in pngs)
    assert not any(link.startswith("/") for link in links)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert not re.search(r"<link|<script|src=\"(?!data:)|https?://", page)
    return page


def test_report_of_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    config = nup.train.TrainConfig(data="teacher", depth=3, m=2, steps=5, eval_every=5, batch_size=32)
    summary = nup.train.run_training(config, run_dir, progress=False)
    pngs = sorted(run_dir.glob("*.png"))
    assert pngs

    assert _cli(str(run_dir)) == 0
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# Run run\n")
    assert "| depth | 3 |" in md and "| data | teacher |" in md and "| m | 2 |" in md
    assert f"| test_acc | {summary['test_acc']:.4g} |" in md
    assert f"| train_loss | {summary['train_loss']:.4g} |" in md
    page = _check_links_and_embeds(run_dir / "report.md", run_dir / "report.html", pngs)
    assert "<td>depth</td><td>3</td>" in page and f"<td>test_acc</td><td>{summary['test_acc']:.4g}</td>" in page

    # --out elsewhere: the links still resolve from the report's directory
    md_path, html_path = report.write_report(run_dir, tmp_path / "elsewhere" / "r.md")
    assert html_path == tmp_path / "elsewhere" / "r.html"
    _check_links_and_embeds(md_path, html_path, pngs)


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """A finished sweep of the fake trainer: loss |ln(lr·depth/0.3)|, lowest at lr = 0.3/depth; lr 1 fails."""

    def run_training(config, out_dir, progress=True, **checkpointing):
        if config.lr >= 1:
            raise RuntimeError("lr 1 > limit <boom>")
        loss = abs(math.log(config.lr * config.depth / 0.3)) + 0.01 * config.seed
        summary = {"status": "ok", "train_loss": loss, "train_acc": 0.5, "test_loss": loss, "test_acc": 0.5,
                   "wall_time_s": 0.1}
        write_json_atomic(Path(out_dir) / "summary.json", summary)
        return summary

    monkeypatch.setattr(nup.train, "run_training", run_training)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("name = 'lr-transfer'\n[base]\nsteps = 5\n[grid]\nparameterization = ['nup', 'sp']\n"
                   "depth = [3, 10]\nlr = [0.01, 0.03, 0.1, 1.0]\nseed = [0, 1]\n")
    out = tmp_path / "sweep"
    nsweep.run_sweep(nsweep.load_sweep(cfg), out, progress=False)
    return out


def test_report_of_a_sweep(fake_sweep):
    assert _cli(str(fake_sweep)) == 0
    figure = fake_sweep / report.LR_FIGURE
    assert figure.read_bytes().startswith(b"\x89PNG")
    md = (fake_sweep / "report.md").read_text()
    assert md.startswith("# Sweep lr-transfer\n") and "32 runs: 8 failed, 24 finished" in md
    rows = nsweep.read_results(fake_sweep / "results.csv")
    assert all(f"| {r['run_id']} | {r['parameterization']} | {r['depth']} |" in md for r in rows)
    for p in ("nup", "sp"):  # the best lr is 0.3/depth, the loss there the mean over seeds 0 and 1
        assert f"| {p} | 3 | 0.1 | 0.005 | 3 |" in md and f"| {p} | 10 | 0.03 | 0.005 | 3 |" in md
    assert "## Failed runs" in md and md.count("RuntimeError: lr 1 &gt; limit &lt;boom&gt;") == 8 and "<boom>" not in md
    page = _check_links_and_embeds(fake_sweep / "report.md", fake_sweep / "report.html", [figure])
    assert "RuntimeError: lr 1 &gt; limit &lt;boom&gt;" in page and "<boom>" not in page
    assert page.count("<table>") == 4  # configuration, results, best lr, failed runs
    assert page.count("<tr>") == (1 + 5) + (1 + 32) + (1 + 4) + (1 + 8)


def test_sweep_report_without_lr_axis_has_no_lr_plot(tmp_path, monkeypatch):
    def run_training(config, out_dir, progress=True, **checkpointing):
        summary = {"status": "ok", "train_loss": 1.0 / config.depth}
        write_json_atomic(Path(out_dir) / "summary.json", summary)
        return summary

    monkeypatch.setattr(nup.train, "run_training", run_training)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[grid]\ndepth = [3, 4]\nlr = [0.1]\n")
    nsweep.run_sweep(nsweep.load_sweep(cfg), tmp_path / "s", progress=False)
    md_path, _ = report.write_report(tmp_path / "s")
    assert not (tmp_path / "s" / report.LR_FIGURE).exists()
    assert "Best learning rate" not in md_path.read_text() and "| 0.25 |" in md_path.read_text()
    meta = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert f"# Sweep {meta['name']}" in md_path.read_text()


def test_report_refuses_other_directories(tmp_path):
    with pytest.raises(CLIError, match="neither a run directory .no summary.json. nor a sweep directory"):
        _cli(str(tmp_path))
    with pytest.raises(CLIError, match="neither"):
        report.write_report(tmp_path / "missing")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(CLIError, match="names the Markdown file"):
        report.write_report(tmp_path, tmp_path / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
