"""``--width-offset`` and ``--depth-normalizer``: train flags, sweep keys, summary.json, one-line errors."""

import json

import pytest

from nup import cli
from nup import sweep as nsweep
from nup.train import TrainConfig


def test_train_flags_reach_the_model_and_summary(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", "teacher", "--depth", "4", "--m", "2", "--steps", "3", "--eval-every", "3",
            "--width-offset", "2", "--depth-normalizer", "harmonic", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["width_offset"] == 2 and summary["config"]["depth_normalizer"] == "harmonic"
    assert summary["widths"] == [32, 2 * 3**2, 2 * 4**2, 2 * 5**2, 10]


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("--width-offset", "-1", "width_offset must be an integer >= 0"),
    ("--depth-normalizer", "log", "unknown depth_normalizer 'log'"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, flag, value, match):
    argv = ["train", "--data", "teacher", "--steps", "1", flag, value, "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "\n" not in err.strip() and "Traceback" not in err


def test_sweep_grid_over_offset_and_normalizer(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[base]\ndata = "teacher"\nsteps = 2\n[grid]\nwidth_offset = [0, 3]\n'
                    'depth_normalizer = ["none", "harmonic"]\n')
    specs = nsweep.expand_grid(nsweep.load_sweep(path))
    got = {(s.config.width_offset, s.config.depth_normalizer) for s in specs}
    assert got == {(0, "none"), (0, "harmonic"), (3, "none"), (3, "harmonic")}
    assert all(isinstance(s.config, TrainConfig) for s in specs)
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\ndepth_normalizer = ["harmonic", "cubic"]\n')
    with pytest.raises(ValueError, match="depth_normalizer"):
        nsweep.expand_grid(nsweep.load_sweep(bad))
