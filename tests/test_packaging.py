"""Packaging: triton is optional (the reference path runs without it), nup --version, the LICENSE,
the example sweep config, and nup_kernels.traffic(...) callable as the README writes it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nup
import nup_kernels
from nup import cli
from nup.sweep import expand_grid, load_sweep

REPO = Path(__file__).resolve().parents[1]

WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # `import triton` now raises ImportError
import torch, nup
from nup_kernels import backend
from nup_kernels.linear_act_autograd import linear_act
assert not backend.triton_available()
torch.manual_seed(0)
x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
for fused in (False, True):
    model = nup.NuMLP(8, 3, depth=3, m=2)
    opt = nup.NuP(model.named_parameters(), lr=0.1, fused=fused, schedule=nup.make_schedule("geometry"))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert int(opt.stat_vectors()["skipped"].sum()) == 0 and float(opt.stat_vectors()["c_norm"][0]) > 0
import os
os.environ["NUP_BACKEND"] = "triton"
try:
    backend.use_triton(x)
except RuntimeError as err:
    print("refused:", err)
from nup import cli
sys.exit(cli.main(["train", "--data", "teacher", "--depth", "2", "--m", "4", "--steps", "3", "--quiet",
                   "--out", sys.argv[1]]) if os.environ.pop("NUP_BACKEND") else 1)
"""


def test_the_reference_path_runs_without_triton(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(tmp_path / "run")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: NUP_BACKEND=triton: triton is not installed: pip install triton" in out.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_setup_keeps_triton_an_extra_and_one_version():
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    requires = text.split("install_requires=[")[1].split("]")[0]
    assert "triton" not in requires and "torch" in requires
    assert '"triton": ["triton' in text and '"frameworks": [' in text
    assert re.search(r'^__version__ = "([^"]+)"', (REPO / "nup" / "__init__.py").read_text(), re.M)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nup {nup.__version__}"


def test_license_is_mit():
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_example_sweep_config_is_valid():
    sweep = load_sweep(REPO / "examples" / "sweep.toml")
    specs = expand_grid(sweep)
    assert len(specs) == 16 and {s.config.parameterization for s in specs} == {"nup", "sp"}


def test_traffic_is_callable_as_the_readme_writes_it():
    row = nup_kernels.traffic(1000, "fused_small_batch", batch=32)
    assert row["total_passes"] == 6 and row["recompute_flops"] == 2 * 32 * 1000
    assert nup_kernels.traffic.traffic(1000, "plain_sgd")["bytes"] == 6 * 1000 * 4
    table = nup_kernels.traffic.table(1000)
    assert table["unfused_stats"]["total_passes"] == 13 and len(table) == len(nup_kernels.traffic.PASSES)


def test_requested_backend_follows_every_write_to_the_environment(monkeypatch):
    from nup_kernels.backend import requested_backend

    monkeypatch.delenv("NUP_BACKEND", raising=False)
    assert requested_backend() is None
    monkeypatch.setenv("NUP_BACKEND", " Triton ")
    assert requested_backend() == "triton"
    monkeypatch.setenv("NUP_BACKEND", "reference")
    assert requested_backend() == "reference"
    monkeypatch.setenv("NUP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NUP_BACKEND='cuda' is not one of"):
        requested_backend()
    monkeypatch.setenv("NUP_BACKEND", "")
    assert requested_backend() is None


def test_env_value_reads_what_os_environ_holds(monkeypatch):
    from nup_kernels import cpu
    from nup_kernels.backend import env_value

    monkeypatch.delenv("NUP_TEST_SWITCH", raising=False)
    assert env_value("NUP_TEST_SWITCH") == "" and env_value("NUP_TEST_SWITCH", "1") == "1"
    monkeypatch.setenv("NUP_TEST_SWITCH", "ünï")
    assert env_value("NUP_TEST_SWITCH") == "ünï" == os.environ["NUP_TEST_SWITCH"]
    monkeypatch.setenv("NUP_CPU_LOOP", "0")
    assert not cpu.loop_available()
