"""``nup sweep``: grid expansion, overrides, run ids, up-front validation, failures, resume.

Most tests swap ``nup.train.run_training`` for a fast fake (runs in this process when jobs=1).
``test_sigkill_then_resume`` runs the real trainer with tiny settings in a ``python -m nup sweep``
subprocess with two worker processes, kills it with SIGKILL and resumes it (in-process runs).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nup.train
from nup import sweep as nsweep
from nup.cli import CLIError
from nup.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
name = "transfer"
[base]
data = "teacher"
m = 2
steps = 5
[grid]
parameterization = ["nup", "sp", "sp_inv_depth"]
depth = [3, 4]
lr = [0.01, 0.1]
seed = [0, 1]
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def fake_train(monkeypatch):
    """Replace run_training by a fast fake; lr >= 1 raises. Returns the list of (lr, depth, seed) run."""
    calls = []

    def run_training(config, out_dir, progress=True, **checkpointing):
        calls.append((config.parameterization, config.depth, config.lr, config.seed))
        (Path(out_dir) / "metrics.jsonl").write_text("{}\n")
        if config.lr >= 1:
            raise RuntimeError(f"diverged badly at lr {config.lr}")
        summary = {"status": "ok", "train_loss": config.lr * config.depth, "train_acc": 0.5,
                   "test_loss": 2 * config.lr, "test_acc": 0.25, "wall_time_s": 0.01}
        write_json_atomic(Path(out_dir) / "summary.json", summary)
        return summary

    monkeypatch.setattr(nup.train, "run_training", run_training)
    return calls


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    nsweep.add_arguments(parser)
    return nsweep.main(parser.parse_args(list(argv)))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_expand_grid_order_base_and_overrides(tmp_path):
    cfg = _write(tmp_path, CONFIG)
    specs = nsweep.expand_grid(nsweep.load_sweep(cfg))
    assert len(specs) == 3 * 2 * 2 * 2
    assert specs[0].params == {"parameterization": "nup", "depth": 3, "lr": 0.01, "seed": 0}
    assert specs[1].params["seed"] == 1 and specs[2].params["lr"] == 0.1  # the last key varies fastest
    assert all(s.config.data == "teacher" and s.config.m == 2 and s.config.steps == 5 for s in specs)
    points = {(s.config.parameterization, s.config.depth, s.config.lr, s.config.seed) for s in specs}
    assert points == {(p, d, lr, seed) for p in ("nup", "sp", "sp_inv_depth") for d in (3, 4)
                      for lr in (0.01, 0.1) for seed in (0, 1)}

    sweep = nsweep.load_sweep(cfg, ["grid.lr=[1, 3]", "base.steps=50", "grid.m=[2,4]", "base.seed=7",
                                    "name=other", "base.activation=tanh"])
    assert sweep.name == "other" and sweep.grid["lr"] == [1, 3] and sweep.grid["m"] == [2, 4]
    assert "m" not in sweep.base and "seed" not in sweep.grid  # an override moves a field between tables
    specs = nsweep.expand_grid(sweep)
    assert len(specs) == 3 * 2 * 2 * 2
    assert all(s.config.steps == 50 and s.config.seed == 7 and s.config.activation == "tanh" for s in specs)
    lrs = sorted({s.config.lr for s in specs})
    assert lrs == [1.0, 3.0] and all(type(lr) is float for lr in lrs)  # TOML ints coerced for float fields


def test_run_ids_stable_unique_and_safe(tmp_path):
    cfg = _write(tmp_path, CONFIG + 'activation = ["leaky_relu:0.2", "tanh"]\n')
    ids = [s.run_id for s in nsweep.expand_grid(nsweep.load_sweep(cfg))]
    assert len(ids) == 48 and len(set(ids)) == 48
    assert ids == [s.run_id for s in nsweep.expand_grid(nsweep.load_sweep(cfg))]  # stable
    assert all(re.fullmatch(r"[A-Za-z0-9._+=-]+", i) and len(i) < 120 for i in ids)
    assert ids[0] == f"parameterization=nup_depth=3_lr=0.01_seed=0_activation=leaky_relu-0.2-{ids[0][-8:]}"
    assert re.fullmatch(r"[0-9a-f]{8}", ids[0][-8:])
    # a base change keeps the readable part and changes the hash; a single-valued grid key is not shown
    other = nsweep.expand_grid(nsweep.load_sweep(cfg, ["base.steps=6", "grid.m=[2]"]))
    assert [i[:-8] for i in ids] == [s.run_id[:-8] for s in other]
    assert not set(ids) & {s.run_id for s in other}
    single = nsweep.expand_grid(nsweep.load_sweep(_write(tmp_path, "[grid]\nlr = [0.1]\n", "one.toml")))
    assert re.fullmatch(r"run-[0-9a-f]{8}", single[0].run_id)


BAD_CONFIGS = {
    "unknown grid key": ('[grid]\nlrr = [0.1]\n', "unknown key grid.lrr.*did you mean 'lr'"),
    "unknown base key": ('[base]\nsteps = 5\nwidth = 3\n[grid]\nlr = [0.1]\n', "unknown key base.width"),
    "unknown table": ('[grid]\nlr = [0.1]\n[grdi]\ndepth = [2]\n', "unknown top-level key 'grdi'"),
    "empty grid": ('[base]\nsteps = 5\n[grid]\n', "empty grid"),
    "no grid": ('name = "x"\n', "empty grid"),
    "empty list": ('[grid]\nlr = [0.1]\ndepth = []\n', "grid.depth must be a non-empty list"),
    "scalar in grid": ('[grid]\nlr = 0.1\n', "grid.lr must be a non-empty list"),
    "list in base": ('[base]\ndepth = [2, 3]\n[grid]\nlr = [0.1]\n', "base.depth must be a single value"),
    "in both tables": ('[base]\nlr = 0.1\n[grid]\nlr = [0.1]\n', "lr set in both"),
    "zero lr": ('[grid]\nlr = [0.1, 0.0]\n', "lr=0.0: lr must be a positive"),
    "negative lr": ('[grid]\ndepth = [3]\nlr = [-0.1]\n', "lr must be a positive"),
    "bad depth in one point": ('[grid]\nlr = [0.1]\ndepth = [4, 1]\n', "depth=1: depth must be >= 2"),
    "bad activation": ('[base]\nactivation = "swish9"\n[grid]\nlr = [0.1]\n', "activation|swish9"),
    "bad type": ('[base]\nsteps = 2.5\n[grid]\nlr = [0.1]\n', "steps must be an integer"),
    "duplicate point": ('[grid]\nlr = [0.1, 0.1]\n', "duplicate grid point"),
    "invalid toml": ('[grid\nlr = [0.1]\n', "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_invalid_config_fails_before_any_run(tmp_path, fake_train, case):
    text, pattern = BAD_CONFIGS[case]
    cfg = _write(tmp_path, text)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern) as info:
        _cli(str(cfg), "--out", str(out))
    assert "\n" not in str(info.value)
    assert fake_train == [] and not out.exists()


@pytest.mark.parametrize(("override", "pattern"), [
    ("grid.lr=[0.1,-1.0]", "lr must be a positive"),
    ("grid.lr=[]", "grid.lr must be a non-empty list"),
    ("grid.lrx=[0.1]", "unknown key grid.lrx"),
    ("other.lr=0.1", "the key must be name, base.FIELD or grid.FIELD"),
    ("steps", "expected KEY=VALUE"),
])
def test_invalid_override_fails_before_any_run(tmp_path, fake_train, override, pattern):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern):
        _cli(str(_write(tmp_path, CONFIG)), "--out", str(out), "--set", override)
    assert fake_train == [] and not out.exists()


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, fake_train, capsys):
    out = tmp_path / "out"
    assert _cli(str(_write(tmp_path, CONFIG)), "--out", str(out), "--dry-run", "--set", "grid.seed=[0]") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 13 and lines[-1].startswith("12 runs")
    assert lines[0].startswith("parameterization=nup_depth=3_lr=0.01-")
    assert fake_train == [] and not out.exists()


def test_sweep_records_failures_and_writes_results(tmp_path, fake_train):
    cfg = _write(tmp_path, "name = 'f'\n[base]\nsteps = 5\n[grid]\ndepth = [3, 4]\nlr = [0.1, 1.0]\n")
    out = tmp_path / "out"
    assert _cli(str(cfg), "--out", str(out)) == 1  # a failed run makes the exit code non-zero
    assert len(fake_train) == 4
    specs = nsweep.expand_grid(nsweep.load_sweep(cfg))
    rows = _rows(out / "results.csv")
    assert list(rows[0]) == ["run_id", "depth", "lr", *nsweep.METRICS, "status"]
    assert [r["run_id"] for r in rows] == [s.run_id for s in specs]
    for row, spec in zip(rows, specs, strict=True):
        run_dir = out / "runs" / spec.run_id
        assert json.loads((run_dir / "config.json").read_text()) == nsweep.config_dict(spec.config)
        if spec.config.lr >= 1:
            assert row["status"] == "failed" and row["train_loss"] == ""
            assert not (run_dir / "summary.json").exists()
            error = json.loads((run_dir / "error.json").read_text())
            assert error["error"] == "RuntimeError: diverged badly at lr 1.0"
            assert "Traceback" in error["traceback"]
        else:
            assert row["status"] == "finished"
            assert math.isclose(float(row["train_loss"]), 0.1 * spec.config.depth)
            assert (float(row["test_acc"]), row["depth"], row["lr"]) == (0.25, str(spec.config.depth), "0.1")
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["grid"] == {"depth": [3, 4], "lr": [0.1, 1.0]} and meta["base"] == {"steps": 5}
    assert [r["run_id"] for r in meta["runs"]] == [s.run_id for s in specs]


def test_resume_skips_finished_and_redoes_the_rest(tmp_path, fake_train):
    cfg = _write(tmp_path, "[base]\nsteps = 5\n[grid]\ndepth = [3, 4]\nlr = [0.1, 0.2, 1.0]\n")
    out = tmp_path / "out"
    sweep = nsweep.load_sweep(cfg)
    nsweep.run_sweep(sweep, out, progress=False)
    assert len(fake_train) == 6
    with pytest.raises(CLIError, match="--resume"):
        nsweep.run_sweep(sweep, out, progress=False)
    assert len(fake_train) == 6

    specs = nsweep.expand_grid(sweep)
    finished = {s.run_id: (out / "runs" / s.run_id / "summary.json") for s in specs if s.config.lr < 1}
    stamps = {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in finished.items()}
    # simulate a kill: one run half-done, temp files of interrupted atomic writes
    half = specs[0].run_id
    (out / "runs" / half / "summary.json").unlink()
    (out / "runs" / half / "partial.png").write_bytes(b"\x89PNG")
    (out / ".results.csv.x1y2.tmp").write_text("run_id,depth\n")
    (out / "runs" / half / ".metrics.jsonl.abcd.tmp").write_text("{")
    del stamps[half]
    fake_train.clear()

    # another sweep holding the directory's lock is refused
    with open(out / ".sweep.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CLIError, match="another nup sweep"):
            nsweep.run_sweep(sweep, out, resume=True, progress=False)
    assert fake_train == []

    nsweep.run_sweep(sweep, out, resume=True, progress=False)
    assert sorted(fake_train) == sorted([("nup", 3, 0.1, 0), ("nup", 3, 1.0, 0), ("nup", 4, 1.0, 0)])
    for run_id, (data, mtime) in stamps.items():
        assert finished[run_id].read_bytes() == data and finished[run_id].stat().st_mtime_ns == mtime
    redone = sorted(p.name for p in (out / "runs" / half).iterdir())
    assert redone == ["config.json", "metrics.jsonl", "summary.json"]
    assert not list(out.rglob("*.tmp"))
    rows = _rows(out / "results.csv")
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"] * 2


def _finished(runs: Path) -> dict[str, tuple[bytes, int]]:
    return {p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.glob("*/summary.json")}


def _state(pid: int) -> tuple[str, int, bytes] | None:
    """(state, parent pid, command line) of a live process from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None


def _workers(parent: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (s := _state(pid)) and s[1] == parent and b"spawn_main" in s[2]]


def test_sigkill_then_resume(tmp_path):
    """Kill a 2-worker sweep of the real trainer after its first finished run, then resume it (1 job)."""
    steps = 20
    cfg = _write(tmp_path, f"[base]\ndata = 'teacher'\nm = 2\nsteps = {steps}\neval_every = {steps}\n"
                           "batch_size = 16\ndepth = 2\n[grid]\nseed = [0, 1, 2]\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nup", "sweep", str(cfg), "--out", str(out), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "log1", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not _finished(out / "runs") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _workers(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log1").read_text()
    before = _finished(out / "runs")
    assert len(before) in (1, 2) and len(workers) == 2
    deadline = time.monotonic() + 10  # the workers die with the sweep: no orphan writes into a run dir
    while any((s := _state(pid)) and s[0] != "Z" for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if (s := _state(pid)) and s[0] != "Z"]
    assert _finished(out / "runs") == before

    done = subprocess.run([*cmd[:-2], "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    after = _finished(out / "runs")
    assert len(after) == 3 and all(after[k] == v for k, v in before.items())  # finished runs not rerun
    rows = _rows(out / "results.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(after) and {r["status"] for r in rows} == {"finished"}
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2]
    assert all(math.isfinite(float(r[m])) for r in rows for m in nsweep.METRICS)
    for run_id in after:  # every run trained exactly once into a clean directory
        lines = (out / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(steps))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("tmp")]
