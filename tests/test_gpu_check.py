"""benchmarks/gpu_check.py in ``--tiny`` mode on CPU, through Triton's interpreter.

The script runs once on a GPU and must work the first time, so every section is exercised here
at tiny shapes: it must exit 0, write parseable JSON, pass every check it ran, and account for
every section (ran, or skipped with a reason).
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = {
    "compile",
    "correctness_fp32",
    "correctness_tf32",
    "correctness_bf16",
    "fused_step",
    "host_sync",
    "timing_memory",
    "timing_step",
    "timing_step_compiled",
    "timing_linear",
    "timing_step_bf16",
}
CPU_SKIPPED = {"correctness_tf32", "correctness_bf16", "host_sync", "timing_step_bf16"}
KERNELS = {
    "linear_act_fwd[relu]",
    "linear_act_fwd[gelu,bias]",
    "linear_act_bwd_dx",
    "linear_act_bwd_dw",
    "linear_act_bias_grad",
    "activation_delta",
    "grad_norm_gram",
    "apply_update[materialized]",
    "apply_update[small_batch]",
    "apply_update[init]",
    "multi_tensor_reduce",
    "multi_tensor_apply",
}


def _run(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, TRITON_INTERPRET="1", NUP_BACKEND="triton", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""
    )
    env.pop("NUP_UPDATE_PATH", None)
    cmd = [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out, "--tiny")
    path = out / "gpu_check.json"
    data = json.loads(path.read_text()) if path.exists() else None
    return proc, data


def test_tiny_run_exits_0_and_writes_complete_json(tiny):
    proc, data = tiny
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert data is not None and data["complete"] is True
    assert data["mode"] == "tiny-cpu-interpreter" and data["timings_meaningful"] is False
    assert data["env"]["torch"] == torch.__version__ and data["env"]["triton"]
    assert "gpu_check summary" in proc.stdout


def test_every_section_ran_or_was_skipped_with_a_reason(tiny):
    _, data = tiny
    sections = data["sections"]
    assert set(sections) == SECTIONS
    for name, s in sections.items():
        assert s["status"] in ("ok", "skipped"), (name, s.get("error"))
        assert (s["status"] == "skipped") == (name in CPU_SKIPPED), name
        if s["status"] == "skipped":
            assert s["reason"], name
    assert sections["host_sync"]["seconds"] > 0  # its steps ran, only the sync-debug mode is CUDA-only
    assert all(item["reason"] for item in data["skipped"])


def test_every_check_that_ran_passed(tiny):
    _, data = tiny
    checks = data["checks"]
    failed = [c for c in checks if not c["passed"]]
    assert not failed, failed[:3]
    assert all(math.isfinite(c["error"]) and c["error"] <= c["tolerance"] for c in checks)
    assert {c["name"] for c in checks if c["section"] == "compile"} == KERNELS
    names = {c["name"] for c in checks}
    for expected in (
        "linear_act_fwd.h",
        "linear_act_bwd_dw.norm_sq",
        "apply_update.skip_nan",
        "multi_tensor_reduce.dot",
        "fused_vs_drop_in.cos",
        "bitwise_repeatable.fused",
        "linear_act_fwd[autotuned]",
    ):
        assert expected in names, expected
    paths = {
        c["shape"].rsplit("path=", 1)[-1] for c in checks if c["name"] == "fused_vs_drop_in.displacement"
    }
    assert paths == {"small_batch", "materialized"}


def test_timings_are_recorded_with_baselines_and_targets(tiny):
    _, data = tiny
    timings = data["timings"]
    assert all(t["ms"] is not None and t["ms"] > 0 and not t.get("error") for t in timings), timings
    names = {t["name"] for t in timings}
    for expected in (
        "device_copy",
        "apply_update[materialized]",
        "apply_update[small_batch]",
        "multi_tensor_apply",
        "linear_act_fwd",
        "linear_act_bwd_dx",
        "linear_act_bwd_dw",
        "grad_norm_gram",
        "step:plain",
        "step:unfused",
        "step:drop_in",
        "step:fused",
        "step:compiled",
        "step:fused_vs_plain",
        "step:fused_vs_unfused",
        "step:fused_vs_compiled",
    ):
        assert expected in names, expected
    targets = [t for t in timings if t["target"]]
    assert {t["target"].split()[0] for t in targets} == set(data["settings"]["targets"])
    # tiny CPU timings are not performance figures: no verdicts, but ratios against measured baselines
    assert all(t["passed"] is None and t["meaningful"] is False for t in timings)
    assert all(t["baseline_ms"] > 0 and t["ratio"] > 0 for t in targets)
    grid = {(t["shape"]) for t in timings if t["name"] == "step:fused_vs_plain"}
    assert len(grid) == 4  # depths (2, 3) x batches (4, 72)


def test_budget_and_section_selection(tmp_path):
    # the budget covers every section now (issue #10), not only the timing ones
    proc = _run(tmp_path, "--tiny", "--only", "compile,timing_memory", "--budget-s", "0", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    for name in ("compile", "timing_memory"):
        assert sections[name]["status"] == "skipped" and "budget" in sections[name]["reason"], name
    assert sections["fused_step"]["reason"].startswith("not selected")
    bad = _run(tmp_path, "--tiny", "--only", "nonsense", timeout=60)
    assert bad.returncode == 2 and "unknown section" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_and_without_tiny_it_exits_2_with_a_message(tmp_path):
    proc = _run(tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--tiny" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def _load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_wrong_kernel_fails_its_check(tmp_path, monkeypatch):
    monkeypatch.setenv("NUP_BACKEND", "triton")
    gc = _load_script(monkeypatch)
    run = gc.Run(
        argparse.Namespace(tiny=True, budget_s=60.0, out=str(tmp_path)),
        torch.device("cpu"),
        gc.load_kernels(),
    )
    forward = run.k.la.linear_act_forward

    def off_by_a_percent(*args, **kwargs):
        y, saved = forward(*args, **kwargs)
        return y * 1.01, saved

    monkeypatch.setattr(run.k.la, "linear_act_forward", off_by_a_percent)
    gc.check_linear(run, "correctness_fp32", "fp32", (9, 20, 12), "gelu", True, "pinned")
    verdicts = {c["name"]: c["passed"] for c in run.data["checks"]}
    assert verdicts["linear_act_fwd.y"] is False
    assert verdicts["linear_act_fwd.h"] and verdicts["linear_act_bwd_dx"] and verdicts["linear_act_bwd_dw.G"]
    (failed,) = [c for c in run.data["checks"] if not c["passed"]]
    assert 5e-3 < failed["error"] < 2e-2 and failed["tolerance"] == gc.TOLERANCE["fp32"]


PHASE_SECTIONS = {
    "correctness": ["compile", "correctness_fp32", "correctness_tf32", "correctness_bf16", "fused_step", "host_sync"],
    "timing": ["timing_memory", "timing_step", "timing_step_compiled", "timing_linear", "timing_step_bf16"],
}


@pytest.mark.parametrize("phase", ["correctness", "timing"])
def test_each_phase_runs_its_sections_only(tmp_path, phase):
    proc = _run(tmp_path, "--tiny", "--phase", phase)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["complete"] is True and data["phase"] == phase
    for name, s in data["sections"].items():
        if name in PHASE_SECTIONS[phase]:
            assert s["status"] == "ok" or (s["status"] == "skipped" and name in CPU_SKIPPED | {"host_sync"}), name
        else:
            assert s["reason"].startswith("not selected"), name
    assert all(c["passed"] for c in data["checks"])
    ran = [n for n in PHASE_SECTIONS[phase] if n not in CPU_SKIPPED]
    assert {p.stem for p in (tmp_path / "sections").glob("*.json")} >= set(ran)  # one record per section process


def test_a_section_over_its_time_limit_is_stopped_and_the_rest_still_run(tmp_path):
    proc = _run(tmp_path, "--tiny", "--only", "compile,correctness_fp32", "--section-limit-s", "1", timeout=300)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {n: s["status"] for n, s in data["sections"].items() if n in ("compile", "correctness_fp32")}
    # a section needs well over 1 s (torch alone takes longer to import): both are stopped, each on its own
    assert statuses == {"compile": "error", "correctness_fp32": "error"}, statuses
    assert "time limit" in data["sections"]["compile"]["reason"]
    assert proc.returncode == 1 and data["complete"] is True
