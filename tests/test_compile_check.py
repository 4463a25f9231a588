"""benchmarks/compile_check.py: the sm_90 ahead-of-time compile check, under the installed Triton.

The full check (every config, both Triton versions) runs in ``.ci/run``; here it compiles one config of
two kernels (a matmul kernel in every dtype and the Gram kernel) and the judging rules are unit-tested.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_check_aot as aot  # noqa: E402

PTXAS_LOG = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    464 bytes stack frame, 408 bytes spill stores, 400 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 464 bytes cumulative stack size
"""


def test_ptxas_log_is_parsed():
    assert aot._parse_ptxas(PTXAS_LOG) == {"registers": 255, "spill_stores": 408, "spill_loads": 400, "stack": 464}


def _result(**kw):
    base = dict(kernel="k", dtypes="bfloat16", precision="tf32", constexprs="", config="", variant="aligned",
                registers=100, spill_stores=0, spill_loads=0, shared=1024, tensor_core="wgmma",
                matmul=True)  # fmt: skip
    return aot.Result(**(base | kw))


def test_judge_fails_each_rule_and_passes_a_clean_compile():
    assert aot.judge(_result()) == []
    assert aot.judge(_result(shared=aot.SHARED_LIMIT + 1))[0].startswith("shared")
    assert aot.judge(_result(spill_stores=8))[0].startswith("spills")
    assert aot.judge(_result(spill_stores=8, variant="unaligned")) == []  # recorded, not failed
    assert "tensor-core" in aot.judge(_result(tensor_core=""))[0]
    assert aot.judge(_result(tensor_core="", dtypes="float32")) == []  # fp32 IEEE runs on FMA
    assert aot.judge(_result(error="PTXASError: x")) == ["compile error"]


def test_quick_check_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUP_BACKEND")}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--out", str(tmp_path), "--quick",
           "--check", "--only", "_linear_act_fwd_kernel,_gram_norm_kernel"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "compile_check.json").read_text())
    results = data["results"]
    assert {r["kernel"] for r in results} == {"_linear_act_fwd_kernel", "_gram_norm_kernel"}
    assert all(r["registers"] and r["shared"] <= aot.SHARED_LIMIT and not r["failures"] for r in results)
    fwd = {r["dtypes"]: r for r in results if r["kernel"] == "_linear_act_fwd_kernel"}
    assert fwd["bfloat16"]["tensor_core"] and fwd["float16"]["tensor_core"]
    assert {r["precision"] for r in results if r["dtypes"] == "float32"} >= {"ieee", "tf32"}
    assert "| _linear_act_fwd_kernel | bf16 |" in (tmp_path / "compile_check.md").read_text()
