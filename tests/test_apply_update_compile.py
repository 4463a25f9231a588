"""The apply kernels compiled ahead of time for sm_90 (no GPU needed): a bf16 small-batch apply uses
tensor cores (wgmma), and no dispatched config spills registers.

The compile runs in a subprocess: this test session imported triton under its interpreter.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

SMALL = ["w_ptr", "c_ptr", "x_ptr", "d_ptr", "g_sq_ptr", "rates_ptr", "d_norm_ptr", "dot_ptr", "n_part", "g_sq_scale",
         "index", "alpha", "batch", "n_out", "n_in", "stride_wm", "stride_wn", "stride_cm", "stride_cn", "stride_xb",
         "stride_xn", "stride_db", "stride_dm"]  # fmt: skip
MAT = ["w_ptr", "c_ptr", "g_ptr", "g_sq_ptr", "rates_ptr", "d_norm_ptr", "dot_ptr", "n_part", "g_sq_scale", "index",
       "n_out", "n_in", "stride_wm", "stride_wn", "stride_cm", "stride_cn", "stride_gm", "stride_gn"]  # fmt: skip


def _compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from nup_kernels import apply_update as au

    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    out = {}
    small_extra = {"BLOCK_K": 64, "PREC": "tf32", "UPCAST": False}
    for name, fn, names, cfg, extra in (
        ("small", au._apply_small_batch_kernel, SMALL, au._SMALL_BATCH, small_extra),
        ("materialized", au._apply_materialized_kernel, MAT, au._MATERIALIZED, {}),
    ):
        for dt in ("bf16", "fp32"):
            ce = {"CUMULATIVE_IS_INIT": False, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                  "PART_BLOCK": au._PART_BLOCK, **extra}  # fmt: skip
            sig = {n: f"*{dt if n in ('w_ptr', 'x_ptr') else 'fp32'}" if n.endswith("_ptr")
                   else "fp32" if n in ("g_sq_scale", "alpha") else "i32" for n in names}  # fmt: skip
            sig |= {k: "constexpr" for k in ce}
            k = triton.compile(triton.compiler.ASTSource(fn, sig, ce), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg["num_warps"]})  # fmt: skip
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(k.asm["ptx"])
            res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            os.unlink(f.name)
            out[f"{name}-{dt}"] = {"mma": "mma" in k.asm["ptx"], "ptxas": res.stderr}
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_small_batch_apply_uses_tensor_cores_and_does_not_spill(compiled, dt):
    k = compiled[f"small-{dt}"]
    assert k["mma"], "no mma/wgmma in the small-batch apply's PTX"
    assert "0 bytes spill stores" in k["ptxas"], k["ptxas"]


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_materialized_apply_does_not_spill(compiled, dt):
    assert "0 bytes spill stores" in compiled[f"materialized-{dt}"]["ptxas"]


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
