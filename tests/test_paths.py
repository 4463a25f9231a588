"""Issue #13, failures 11 and 12: nup never writes through a planted symlink, never lets a name from
a config or a results file pick a path outside its directory, and never embeds a file behind a link."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

import nup.train
from nup import io as nio
from nup import report
from nup import sweep as nsweep
from nup.io import write_json_atomic
from nup.train import TrainConfig, run_training


# ---- the helpers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", " ", ".", "..", "a/b", "a\\b", "/abs", "x\x00", "new\nline"])
def test_safe_name_refuses_anything_but_one_file_name(name):
    with pytest.raises(ValueError, match="run id .* must be one plain file name"):
        nio.safe_name(name, "run id")


def test_safe_name_accepts_plain_names():
    for name in ("depth=4_lr=0.1-1a2b3c4d", "a..b", ".hidden", "x y", "νP"):
        assert nio.safe_name(name, "run id") == name


def test_inside_refuses_links_below_the_base(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "base" / "runs").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "base" / "runs" / "r1")
    assert nio.inside(tmp_path / "base", "runs", "r2", "error.json") == tmp_path / "base" / "runs" / "r2" / "error.json"
    with pytest.raises(ValueError, match=r"runs/r1 is a symbolic link; nup does not follow links inside"):
        nio.inside(tmp_path / "base", "runs", "r1", "error.json")
    with pytest.raises(ValueError, match="must be one plain file name"):
        nio.inside(tmp_path / "base", "runs", "..", "error.json")


def test_writers_replace_a_planted_link_and_never_touch_its_target(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    for i, write in enumerate((lambda p: nio.write_text_atomic(p, "new"),
                               lambda p: nio.write_bytes_atomic(p, b"new"),
                               lambda p: nio.open_new_text(p).close())):
        link = tmp_path / f"link{i}"
        os.symlink(target, link)
        write(link)
        assert not link.is_symlink() and target.read_text() == "keep me"


def test_read_bytes_no_follow_refuses_a_link(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    assert nio.read_bytes_no_follow(tmp_path / "a.png") == b"x"
    with pytest.raises(OSError, match="b.png is a symbolic link"):
        nio.read_bytes_no_follow(tmp_path / "b.png")


# ---- nup train ----------------------------------------------------------------------------------
def test_train_does_not_follow_planted_links(tmp_path):
    out, target = tmp_path / "run", tmp_path / "precious"
    out.mkdir()
    target.write_text("keep me")
    for name in ("metrics.jsonl", "loss.png", "summary.json"):
        os.symlink(target, out / name)
    config = TrainConfig(data="teacher", depth=3, m=2, steps=3, eval_every=3, batch_size=16)
    run_training(config, out, progress=False)
    assert target.read_text() == "keep me"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


# ---- nup sweep ----------------------------------------------------------------------------------
@pytest.fixture
def fake_train(monkeypatch):
    def run_training(config, out_dir, progress=True, **checkpointing):
        summary = {"status": "ok", "train_loss": config.lr}
        write_json_atomic(Path(out_dir) / "summary.json", summary)
        return summary

    monkeypatch.setattr(nup.train, "run_training", run_training)


def test_sweep_does_not_follow_planted_links(tmp_path, fake_train):
    cfg, out, target = tmp_path / "cfg.toml", tmp_path / "out", tmp_path / "precious"
    cfg.write_text("[grid]\nlr = [0.1, 0.2]\n")
    target.write_text("keep me")
    (tmp_path / "elsewhere").mkdir()
    specs = nsweep.expand_grid(nsweep.load_sweep(cfg))
    (out / "runs").mkdir(parents=True)
    for name in (".sweep.lock", "results.csv", "sweep.json"):
        os.symlink(target, out / name)
    os.symlink(tmp_path / "elsewhere", out / "runs" / specs[0].run_id)  # a planted run directory
    nsweep.run_sweep(nsweep.load_sweep(cfg), out, progress=False)
    assert target.read_text() == "keep me" and list((tmp_path / "elsewhere").iterdir()) == []
    assert all(r["status"] == "finished" for r in nsweep.read_results(out / "results.csv"))
    assert not any(p.is_symlink() for p in [*out.iterdir(), *(out / "runs").iterdir()])


def test_sweep_refuses_a_linked_runs_directory(tmp_path, fake_train):
    cfg, out = tmp_path / "cfg.toml", tmp_path / "out"
    cfg.write_text("[grid]\nlr = [0.1]\n")
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    os.symlink(tmp_path / "elsewhere", out / "runs")
    with pytest.raises(ValueError, match="runs is a symbolic link"):
        nsweep.run_sweep(nsweep.load_sweep(cfg), out, progress=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ---- nup report ---------------------------------------------------------------------------------
def test_report_refuses_a_run_id_that_escapes(tmp_path):
    sweep_dir = tmp_path / "a" / "b"
    sweep_dir.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    write_json_atomic(tmp_path / "outside" / "error.json", {"error": "SECRET"})
    (sweep_dir / "results.csv").write_text("run_id,status\n../../outside,failed\n")
    with pytest.raises(ValueError, match=r"results.csv line 2: run id '\.\./\.\./outside' must be one plain file"):
        report.write_report(sweep_dir)
    assert not (sweep_dir / "report.md").exists()


def test_report_does_not_read_through_a_linked_run_directory(tmp_path):
    sweep_dir = tmp_path / "s"
    (sweep_dir / "runs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    write_json_atomic(tmp_path / "outside" / "error.json", {"error": "SECRET"})
    os.symlink(tmp_path / "outside", sweep_dir / "runs" / "r1")
    (sweep_dir / "results.csv").write_text("run_id,status\nr1,failed\n")
    with pytest.raises(ValueError, match="runs/r1 is a symbolic link"):
        report.write_report(sweep_dir)


def test_report_does_not_embed_files_behind_links(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET KEY")
    (run_dir / "real.png").write_bytes(b"\x89PNG real")
    os.symlink(secret, run_dir / "stolen.png")
    write_json_atomic(run_dir / "summary.json", {"status": "ok"})
    md_path, html_path = report.write_report(run_dir)
    page, md = html_path.read_text(), md_path.read_text()
    assert base64.b64encode(b"SECRET KEY").decode() not in page and "stolen.png" not in md.split("Skipped")[0]
    assert base64.b64encode(b"\x89PNG real").decode() in page
    assert "Skipped stolen.png: a symbolic link" in md


def test_report_does_not_write_through_planted_links(tmp_path):
    run_dir, target = tmp_path / "run", tmp_path / "precious"
    run_dir.mkdir()
    target.write_text("keep me")
    write_json_atomic(run_dir / "summary.json", {"status": "ok"})
    for name in ("report.md", "report.html"):
        os.symlink(target, run_dir / name)
    report.write_report(run_dir)
    assert target.read_text() == "keep me"


# ---- nup bench ----------------------------------------------------------------------------------
def test_bench_results_do_not_write_through_planted_links(tmp_path):
    from nup import bench

    out, target = tmp_path / "out", tmp_path / "precious"
    out.mkdir()
    target.write_text("keep me")
    names = ("results.json", "results.csv", "results.md", "results.png", "pytest-benchmark.json")
    for name in names:
        os.symlink(target, out / name)
    result = bench.summarize({"benchmarks": []}, [], suite="kernels", quick=True, command=[])
    bench.write_results(result, out, {"benchmarks": []})
    assert target.read_text() == "keep me"
    assert not any((out / name).is_symlink() for name in names) and (out / "results.csv").read_text()
