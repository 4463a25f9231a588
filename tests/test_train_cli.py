"""``nup train``: run_training end to end, the CLI's exit codes and one-line errors, atomic writers."""

import dataclasses
import json
import math
import os

import pytest

from nup import cli
from nup.io import append_jsonl, write_json_atomic, write_text_atomic
from nup.train import TrainConfig, run_training

PER_LAYER = ("lr", "cos", "update_norm", "c_norm")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(depth=3, m=2, steps=20, eval_every=5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("tiny")
    config = TrainConfig(**TINY)
    summary = run_training(config, out, progress=False)
    return config, out, summary


def test_metrics_jsonl_has_one_record_per_step(tiny_run):
    _, out, summary = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(20))
    for r in records:
        assert {"step", "loss", "acc", "lr_mult", *PER_LAYER} <= r.keys()
        assert all(len(r[k]) == 3 for k in PER_LAYER)
        assert math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1
        assert all(-1 <= c <= 1 for c in r["cos"]) and all(c >= 0 for c in r["c_norm"])
        assert all(u > 0 for u in r["update_norm"])
    assert records[0]["cos"] == [0.0, 0.0, 0.0]  # C_0 = 0: the cosine is defined as 0
    assert records[0]["lr_mult"] == pytest.approx(1.0)
    evals = [r["step"] for r in records if "test_loss" in r]
    assert evals == [4, 9, 14, 19]
    assert all(0 <= r["test_acc"] <= 1 for r in records if "test_acc" in r)
    # ‖C‖ after step t is at most the path length Σ u up to t (triangle inequality)
    path = [sum(r["update_norm"][i] for r in records) for i in range(3)]
    assert all(c <= p * (1 + 1e-5) for c, p in zip(records[-1]["c_norm"], path, strict=True))
    assert records[-1]["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)


def test_summary_json(tiny_run):
    config, out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("train_acc", "test_acc"):
        assert 0 <= summary[key] <= 1
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_loss"])
    assert summary["test_acc"] > 0.2  # 20 steps already beat chance (0.1) on the digits
    assert summary["status"] == "ok" and summary["steps_done"] == 20
    assert summary["widths"] == [64, 18, 32, 10] and summary["widths_capped"] is False  # 2·(k + 2)², the default offset
    assert len(summary["names"]) == 3
    assert summary["config"] == dataclasses.asdict(config)
    assert summary["versions"]["python"] and summary["versions"]["torch"]
    assert 0 < summary["train_time_s"] <= summary["wall_time_s"]


def test_plots_exist_and_summary_is_written_last(tiny_run):
    _, out, summary = tiny_run
    pngs = [name for name in summary["files"] if name.endswith(".png")]
    assert len(pngs) == 4
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    last = max((out / name).stat().st_mtime_ns for name in summary["files"] if name != "summary.json")
    assert (out / "summary.json").stat().st_mtime_ns >= last
    assert sorted(os.listdir(out)) == sorted(summary["files"])  # no temp files left behind


def test_rerun_drops_the_stale_finished_mark(tmp_path):
    from nup.train import _prepare_out_dir

    (tmp_path / "summary.json").write_text("{}")
    assert _prepare_out_dir(tmp_path) == tmp_path
    assert not (tmp_path / "summary.json").exists()


def test_capped_widths_are_reported(tmp_path):
    config = TrainConfig(data="teacher", depth=3, m=2, width_offset=0, max_width=4, steps=2)
    summary = run_training(config, tmp_path, progress=False)
    assert summary["widths"] == [32, 2, 4, 10] and summary["widths_capped"] is True


def test_cli_runs_teacher_with_mse_and_a_base_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", "teacher", "--depth", "3", "--m", "2", "--steps", "6", "--eval-every", "3",
            "--loss", "mse", "--base", "momentum", "--schedule", "warmup_cosine", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "test acc" in captured.out and "Traceback" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["loss"] == "mse" and summary["config"]["base"] == "momentum"
    assert summary["data"]["n_features"] == 32 and summary["steps_done"] == 6
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 6


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.fields():
        assert "--" + name.replace("_", "-") in text
    assert "--out" in text and "--quiet" in text
    assert text.count("(default:") >= len(TrainConfig.fields())


def test_config_fields_match_the_contract():
    assert TrainConfig.fields() == [
        "data", "depth", "m", "width_schedule", "width_offset", "depth_normalizer", "activation", "parameterization",
        "lr", "schedule", "steps",
        "batch_size", "seed", "device", "max_width", "bias", "loss", "base", "eval_every", "fused",
        "nproc",
    ]
    TrainConfig().validate()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(depth=1), "depth"),
        (dict(activation="nope"), "activation"),
        (dict(parameterization="mu"), "parameterization"),
        (dict(width_schedule="cubic"), "width schedule"),
        (dict(schedule="step"), "schedule"),
        (dict(loss="hinge"), "loss"),
        (dict(base="lion"), "base"),
        (dict(data="mnist"), "data"),
        (dict(device="tpu9"), "device"),
        (dict(max_width=0), "max_width"),
        (dict(eval_every=0), "eval_every"),
        (dict(bias=True), "bias"),  # ReLU has an EOC only at σ_b = 0
        (dict(fused=True, base="adam"), "fused"),
    ],
)
def test_validate_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**change).validate()


@pytest.mark.parametrize(
    "flags", [["--threads", "-1"], ["--lr", "-1"], ["--activation", "nope"], ["--depth", "1"], ["--base", "x"]]
)
def test_bad_flag_is_one_line_exit_2(tmp_path, capsys, flags):
    out = tmp_path / "never"
    assert cli.main(["train", *flags, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nup train: error:")
    assert "Traceback" not in err
    assert not out.exists()  # validated before anything is written


def test_unwritable_output_directory_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["train", "--depth", "3", "--m", "2", "--steps", "2", "--quiet", "--out", str(blocker / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not writable" in err and "Traceback" not in err


def test_atomic_writers_leave_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2.5], "y": None})
    write_json_atomic(tmp_path / "a.json", {"x": 3})  # overwrite
    write_text_atomic(tmp_path / "b.txt", "héllo\n")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3}
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a.json", {"bad": object()})  # fails before the temp file exists
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "a.json", b"bytes")  # fails while writing the temp file
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3}  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt"]


def test_append_jsonl_writes_one_object_per_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        append_jsonl(fh, {"step": 0, "cos": [0.0, 0.5]})
        append_jsonl(fh, {"step": 1})
        assert path.read_text().count("\n") == 2  # flushed at once
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 0, "cos": [0.0, 0.5]}, {"step": 1}]


def test_fused_run_matches_the_drop_in_path(tmp_path):
    base = dict(data="teacher", depth=3, m=2, steps=4, eval_every=2)
    plain = run_training(TrainConfig(**base), tmp_path / "plain", progress=False)
    fused = run_training(TrainConfig(**base, fused=True), tmp_path / "fused", progress=False)
    assert fused["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    for a, b in zip(*((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("plain", "fused")),
                    strict=True):
        ra, rb = json.loads(a), json.loads(b)
        assert rb["c_norm"] == pytest.approx(ra["c_norm"], rel=1e-4, abs=1e-6)
        assert rb["cos"] == pytest.approx(ra["cos"], abs=1e-4)


def test_nproc_2_matches_one_process(tmp_path):
    """`nup train --nproc 2` (torchrun, gloo) logs the same losses and statistics as one process."""
    import json
    import subprocess
    import sys

    common = ["--data", "teacher", "--depth", "3", "--m", "2", "--steps", "4", "--batch-size", "32", "--quiet"]
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        subprocess.run([sys.executable, "-m", "nup", "train", *common, "--nproc", str(n), "--out", str(out)],
                       check=True, timeout=240)
    rows = [[json.loads(line) for line in open(tmp_path / f"n{n}" / "metrics.jsonl")] for n in (1, 2)]
    assert len(rows[0]) == len(rows[1]) == 4
    for a, b in zip(*rows):
        for key in ("loss", "cos", "update_norm", "c_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert json.loads((tmp_path / "n2" / "summary.json").read_text())["config"]["nproc"] == 2
