"""Outputs never overwrite the repository: `nup study` and `nup bench` write under runs/ by default,
the committed folders change only through an explicit --out, and quick-mode outputs say so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nup import cli
from nup.studies._common import QUICK_NOTE, figure, quick_mode, save_figure

REPO = Path(__file__).resolve().parents[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def checkout(tmp_path, monkeypatch):
    """A git checkout holding this repo's committed .gitignore, studies/ and benchmarks/results/."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of this repository")
    files = _git(REPO, "ls-files", ".gitignore", "studies", "benchmarks/results").split()
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "committed outputs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_study_quick_from_a_checkout_leaves_git_status_clean(checkout):
    assert (checkout / "studies" / "eos" / "results.json").is_file()  # the committed result is there
    before = (checkout / "studies" / "eos" / "results.json").read_bytes()
    assert cli.main(["study", "eos", "--quick", "--quiet", "--threads", "1"]) == 0
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert (checkout / "studies" / "eos" / "results.json").read_bytes() == before
    results = json.loads((checkout / "runs" / "studies" / "eos" / "results.json").read_text(encoding="utf-8"))
    assert results["quick"] is True
    readme = (checkout / "runs" / "studies" / "eos" / "README.md").read_text(encoding="utf-8")
    assert QUICK_NOTE in readme.splitlines()[2]  # right under the title


def test_study_writes_into_studies_only_when_out_names_it(checkout):
    assert cli.main(["study", "eos", "--quick", "--quiet", "--threads", "1", "--out", "studies/eos"]) == 0
    assert "studies/eos/results.json" in _git(checkout, "status", "--porcelain")


def test_bench_quick_from_a_checkout_leaves_git_status_clean(checkout):
    assert cli.main(["bench", "--quick", "--suite", "kernels"]) == 0
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    (out,) = (checkout / "runs" / "bench").iterdir()
    assert "quick mode" in (out / "results.md").read_text(encoding="utf-8").splitlines()[0]


def test_quick_figures_carry_the_note_in_their_title(tmp_path):
    for on in (False, True):
        fig = figure()
        fig.add_subplot().plot([0, 1])
        with quick_mode(on):
            save_figure(fig, tmp_path / "f.png")
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        assert (title == QUICK_NOTE) is on
