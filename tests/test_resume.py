"""Checkpoints and resume: `nup train --checkpoint-every N --resume` continues bit for bit, and
`nup sweep --resume` continues an unfinished run from its last checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import nup.train
from nup import cli
from nup.checkpoint import CHECKPOINT
from nup.train import TrainConfig, run_training

TIMES = ("train_time_s", "wall_time_s")


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a run."""


def _kill_after(monkeypatch, rows: int) -> None:
    """Make the run die right after writing its ``rows``-th metrics row."""
    written = []
    real = nup.train.append_jsonl

    def append(fh, obj):
        real(fh, obj)
        written.append(obj["step"])
        if len(written) == rows:
            raise Killed

    monkeypatch.setattr(nup.train, "append_jsonl", append)


def _same_run(a, b) -> None:
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text(encoding="utf-8")) for d in (a, b))
    for key in TIMES:
        sa.pop(key), sb.pop(key)
    assert sa == sb


@pytest.mark.parametrize("kw", [dict(schedule="geometry"), dict(base="adam", schedule="warmup_cosine"),
                                dict(base="momentum", schedule="constant", batch_size=50)])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, kw):
    config = {**dict(data="teacher", depth=3, m=4, steps=23, batch_size=64, eval_every=5), **kw}
    whole = tmp_path / "whole"
    run_training(TrainConfig(**config), whole, progress=False, checkpoint_every=4)
    assert not (whole / CHECKPOINT).exists()  # removed when the run finished

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _kill_after(m, 14)  # dies after step 13; the last checkpoint holds 12 steps
        with pytest.raises(Killed):
            run_training(TrainConfig(**config), cut, progress=False, checkpoint_every=4)
    assert torch.load(cut / CHECKPOINT, weights_only=False)["step"] == 12
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 14  # two rows past the checkpoint
    run_training(TrainConfig(**config), cut, progress=False, checkpoint_every=4, resume=True)
    _same_run(whole, cut)


def test_resume_without_a_checkpoint_starts_at_step_0(tmp_path):
    config = TrainConfig(data="teacher", depth=2, m=4, steps=6, batch_size=32)
    summary = run_training(config, tmp_path, progress=False, checkpoint_every=2, resume=True)
    assert summary["steps_done"] == 6
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    config = TrainConfig(data="teacher", depth=2, m=4, steps=4, batch_size=32)
    first = run_training(config, tmp_path, progress=False, checkpoint_every=2)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert run_training(config, tmp_path, progress=False, checkpoint_every=2, resume=True) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    again = run_training(TrainConfig(data="teacher", depth=2, m=4, steps=5, batch_size=32), tmp_path,
                         progress=False, resume=True)  # another config: trained afresh
    assert again["steps_done"] == 5


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, monkeypatch):
    config = dict(data="teacher", depth=2, m=4, steps=10, batch_size=32)
    with monkeypatch.context() as m:
        _kill_after(m, 5)
        with pytest.raises(Killed):
            run_training(TrainConfig(**config), tmp_path, progress=False, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        run_training(TrainConfig(**config, lr=0.3), tmp_path, progress=False, resume=True)


def test_cli_checkpoint_flags(tmp_path, monkeypatch, capsys):
    flags = ["train", "--data", "teacher", "--depth", "2", "--m", "4", "--steps", "9", "--batch-size", "32",
             "--quiet", "--checkpoint-every", "3"]
    with monkeypatch.context() as m:
        _kill_after(m, 7)
        with pytest.raises(Killed):
            cli.main([*flags, "--out", str(tmp_path / "cut")])
    assert cli.main([*flags, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert cli.main([*flags, "--out", str(tmp_path / "whole")]) == 0
    _same_run(tmp_path / "whole", tmp_path / "cut")
    assert cli.main([*flags, "--out", str(tmp_path / "bad"), "--checkpoint-every", "-1"]) == 2
    assert "checkpoint_every must be an integer >= 0" in capsys.readouterr().err


def test_sweep_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('name = "s"\n[base]\ndata = "teacher"\ndepth = 2\nm = 4\nsteps = 12\nbatch_size = 32\n'
                   "[grid]\nlr = [0.1]\n", encoding="utf-8")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 9)  # checkpoint at 8 steps
        with pytest.raises(Killed):
            cli.main(["sweep", str(cfg), "--out", str(out), "--checkpoint-every", "4"])
    (run_dir,) = (out / "runs").iterdir()
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["step"] == 8
    started = []
    real = nup.train.restore

    def restore(state, model, opt):
        started.append(state["step"])
        return real(state, model, opt)

    monkeypatch.setattr(nup.train, "restore", restore)
    assert cli.main(["sweep", str(cfg), "--out", str(out), "--resume", "--checkpoint-every", "4"]) == 0
    assert started == [8]
    whole = tmp_path / "whole"
    run_training(TrainConfig(data="teacher", depth=2, m=4, steps=12, batch_size=32, lr=0.1), whole, progress=False)
    _same_run(whole, run_dir)
