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
    assert summary["hidden_scale_divisor"] == pytest.approx(3 / 4 + 3 / 5)  # T_hidden: ρ_k = (1 + k0)/(k + k0)


def test_effective_normalizer_divides_by_the_hidden_blocks_T_e(tmp_path):
    """--depth-normalizer effective: the divisor is nup.theory.effective_divisor of the first 256 train inputs."""
    from nup.data import teacher_student
    from nup.diagnostics import pairwise_cosines
    from nup.theory import batch_efficiency_at_init, effective_divisor, rho

    out = tmp_path / "run"
    argv = ["train", "--data", "teacher", "--depth", "6", "--m", "2", "--steps", "2", "--eval-every", "2",
            "--batch-size", "32", "--width-offset", "1", "--depth-normalizer", "effective", "--quiet",
            "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["depth_normalizer"] == "effective"
    cosines = pairwise_cosines(teacher_student(seed=0)[0][:256]).numpy()
    e = batch_efficiency_at_init(cosines, 6, 32)
    by_hand = sum(ek * r for ek, r in zip(e[1:], rho(6, 2, width_offset=1)[1:]))
    assert summary["hidden_scale_divisor"] == pytest.approx(by_hand)
    assert by_hand == pytest.approx(effective_divisor(6, 2, cosines, 32, width_offset=1))
    assert by_hand < sum(rho(6, 2, width_offset=1)[1:])  # below harmonic's T_hidden: batch steps move less


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
