"""Issue #13, command-line failures: bad input gets a one-line error that says what to do, never a
traceback or a silently wrong run (activation parameters, sweep types and widths, malformed
reports, bench budgets, sweep names, nproc in a sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nup import cli, report
from nup import sweep as nsweep
from nup.io import write_json_atomic
from nup.train import TrainConfig

TINY = ["--data", "teacher", "--depth", "3", "--m", "2", "--steps", "3", "--eval-every", "3", "--quiet"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# ---- failure 4: activation parameters that are not finite -------------------------------------
@pytest.mark.parametrize("spec", ["linear_abs:nan,1", "linear_abs:1,inf", "leaky_relu:inf", "leaky_relu:nan",
                                  "linear_abs:1e200,1"])
def test_train_refuses_activation_parameters_that_are_not_finite(tmp_path, capsys, spec):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--activation", spec, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "activation linear_abs(" in err or "activation leaky_relu(" in err
    assert "must be finite" in err and "e.g. linear_abs:0.5,0.5" in err
    assert not out.exists()


# ---- failure 5 and 9 (sweep half): TOML values of the wrong type ------------------------------
@pytest.mark.parametrize(("line", "pattern"), [
    ('fused = "false"', "fused must be true or false, got 'false'"),
    ('bias = "no"', "bias must be true or false, got 'no'"),
    ("bias = 1", "bias must be true or false, got 1"),
    ("steps = true", "steps must be an integer, got True"),
    ("max_width = true", "max_width must be an integer, got True"),
    ("nproc = 1.0", "nproc must be an integer"),
    ("activation = 3", "activation must be a string, got 3"),
])
def test_sweep_type_checks_every_field(tmp_path, line, pattern):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"[base]\n{line}\n[grid]\nlr = [0.1]\n")
    with pytest.raises(ValueError, match=pattern):
        nsweep.expand_grid(nsweep.load_sweep(cfg))


def test_sweep_refuses_boolean_lr(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[grid]\nlr = [true, 0.1]\n")
    with pytest.raises(ValueError, match="lr=True: lr must be a number, got True"):
        nsweep.expand_grid(nsweep.load_sweep(cfg))


def test_train_config_refuses_boolean_lr_and_string_flags():
    with pytest.raises(ValueError, match="lr must be a number, got True"):
        TrainConfig(lr=True).validate()
    with pytest.raises(ValueError, match="fused must be true or false"):
        TrainConfig(fused="false").validate()


# ---- failure 6: the width limit, before any run -----------------------------------------------
def test_sweep_dry_run_checks_the_width_limit(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[base]\ndepth = 3\nwidth_offset = 0\n[grid]\nm = [2, 100000]\n")
    with pytest.raises(ValueError, match=r"m=100000: hidden width 400000 exceeds 65536; set max_width"):
        nsweep.main(_sweep_args(cfg, tmp_path / "out", "--dry-run"))
    assert not (tmp_path / "out").exists()
    TrainConfig(depth=3, m=100000, max_width=64).validate()  # an explicit cap is fine


def _sweep_args(cfg: Path, out: Path | None, *flags: str):
    import argparse

    parser = argparse.ArgumentParser()
    nsweep.add_arguments(parser)
    return parser.parse_args([str(cfg), *(["--out", str(out)] if out else []), *flags])


# ---- failure 13: nproc in a sweep -------------------------------------------------------------
def test_sweep_refuses_nproc(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[base]\nnproc = 2\nbatch_size = 64\n[grid]\nlr = [0.1]\n")
    with pytest.raises(ValueError, match="nproc=2: a sweep runs each grid point in one process; .*--jobs"):
        nsweep.expand_grid(nsweep.load_sweep(cfg))


# ---- failure 11: sweep names --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "a\\b", "x\x00y", "tab\there"])
def test_sweep_refuses_names_that_are_not_one_file_name(tmp_path, name, monkeypatch):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"name = {json.dumps(name)}\n[grid]\nlr = [0.1]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="sweep name .* must be one plain file name"):
        nsweep.main(_sweep_args(cfg, None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]
    with pytest.raises(ValueError, match="must be one plain file name"):
        nsweep.load_sweep(tmp_path / "cfg.toml", [f"name={json.dumps('..')}"])


# ---- failure 8: nup bench --budget ------------------------------------------------------------
@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf"])
def test_bench_refuses_a_budget_that_is_not_positive(capsys, budget):
    assert cli.main(["bench", "--suite", "kernels", "--quick", "--budget", budget]) == 2
    assert "--budget must be a positive number of seconds" in _one_line_error(capsys)


# ---- failure 7: nup report on malformed files ---------------------------------------------------
@pytest.mark.parametrize(("text", "pattern"), [
    ("[1, 2]", "summary.json: expected a JSON object, got a list"),
    ("{not json", "summary.json: invalid JSON"),
])
def test_report_refuses_a_malformed_summary(tmp_path, capsys, text, pattern):
    (tmp_path / "summary.json").write_text(text)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert pattern in err and str(tmp_path) in err


@pytest.mark.parametrize(("text", "pattern"), [
    ("run_id,lr\na,0.1\n", "results.csv: no status column"),
    ("status,lr\nok,0.1\n", "results.csv: no run_id column"),
    ("run_id,status\na,ok,extra\n", "results.csv line 2: 3 fields, the header has 2"),
    ("run_id,status,lr\na,ok\n", "results.csv line 2: 2 fields, the header has 3"),
])
def test_report_refuses_a_malformed_results_csv(tmp_path, capsys, text, pattern):
    (tmp_path / "results.csv").write_text(text)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert pattern in _one_line_error(capsys)


def test_report_refuses_a_malformed_sweep_json(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("run_id,status\na,pending\n")
    (tmp_path / "sweep.json").write_text('"a string"')
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "sweep.json: expected a JSON object, got a str" in _one_line_error(capsys)


# ---- failure 12 (report half): raw HTML in names ----------------------------------------------
def test_report_markdown_escapes_raw_html(tmp_path):
    name = "<img src=x onerror=alert(1)>"
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    write_json_atomic(tmp_path / "sweep.json", {"name": name, "grid": {"depth": [3, 4]}})
    (tmp_path / "results.csv").write_text(f"run_id,depth,status\nr1,3,pending\nr2,{name},pending\n")
    md_path, html_path = report.write_report(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "<img" not in md and f"# Sweep {escaped}\n" in md and f"| r2 | {escaped} | pending |" in md
    assert "<img" not in page and f"<h1>Sweep {escaped}</h1>" in page
