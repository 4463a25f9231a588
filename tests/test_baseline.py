"""nup baseline: scikit-learn baselines on nup train's digits split."""

import json

import pytest

from nup.baseline import run_baseline
from nup.cli import main


def test_logreg_baseline_on_the_train_split(tmp_path, capsys):
    assert main(["baseline", "--model", "logreg", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert (summary["n_train"], summary["n_test"]) == (1438, 359)  # nup train's split of the 1,797 digits
    assert 0.93 < summary["test_acc"] < 0.99 and summary["train_acc"] >= summary["test_acc"]
    assert f"logreg: test acc {summary['test_acc']:.4f}" in capsys.readouterr().out


def test_mlp_baseline_is_seeded():
    a, b = run_baseline("mlp", seed=1, hidden=(16,)), run_baseline("mlp", seed=1, hidden=(16,))
    assert a["test_acc"] == b["test_acc"] and a["hidden"] == [16] and a["test_acc"] > 0.9


def test_unknown_baseline_is_a_one_line_error(capsys):
    assert main(["baseline", "--model", "svm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown baseline 'svm'" in err
    with pytest.raises(ValueError, match="logreg"):
        run_baseline("tree")
